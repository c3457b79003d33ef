# Fresh machine: `make demo` (offline end-to-end run on generated demo data) and `make test`.
# Both create .venv in the repo and install the pinned set from requirements.lock once.
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := demo
export PATH := $(BIN):$(PATH)

.PHONY: install assets test demo bench lock clean-demo image

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(MAKE) --no-print-directory assets
	touch $@

# The face detector's weights (MTCNN inside facenet-pytorch's wheel, pinned in params.yaml
# under prepare.detector) fetched from the package index at install time, so tests and the
# offline demo can run face crops without a download at run time.
ASSETS := $(VENV)/assets
DETECTOR_WHEEL := facenet_pytorch-2.6.0-py3-none-any.whl

assets: $(ASSETS)/$(DETECTOR_WHEEL)

$(ASSETS)/$(DETECTOR_WHEEL):
	$(BIN)/python -m pip download -q --no-deps --dest $(ASSETS) facenet-pytorch==2.6.0

test: $(STAMP)
	@test -x /usr/bin/chromium || bash scripts/install-system-deps.sh  # browser check of the MLflow UI
	$(BIN)/python -m pytest -q

# The demo runs the same dvc.yaml in its own DVC workspace ($(DEMO)/), whose params differ
# from params.yaml only in data.archives (the generated archives with their sha256). $(DEMO)/
# is a git repository of its own (scripts/demo-git.sh), committed after each run that changed
# it, so `dvc exp`, `dvc metrics diff` and `dvc params diff` work there.
DEMO_TRACKING_URI = $${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/$(DEMO)/mlruns/mlflow.db}

demo: $(STAMP)
	bash scripts/demo-git.sh begin $(DEMO)
	test -f $(DEMO)/params.yaml -a $(DEMO)/params.yaml -nt params.yaml || \
	  $(BIN)/ferflow demo-data --out $(DEMO)/archives --params-out $(DEMO)/params.yaml
	cp dvc.yaml .dvcignore $(DEMO)/
	ln -sfn ../src $(DEMO)/src
	test -d $(DEMO)/.dvc || (cd $(DEMO) && $(BIN)/dvc init -q)
	cd $(DEMO) && $(BIN)/dvc remote add -f -d \
	  $$(cd .. && $(BIN)/dvc remote list --project | awk 'NR==1{print $$1, $$2}')
	cd $(DEMO) && $(BIN)/ferflow parent-run --name demo -- $(BIN)/dvc repro
	bash scripts/demo-git.sh commit $(DEMO) \
	  "make demo: dvc repro (ferflow $$(git rev-parse --short HEAD 2>/dev/null || echo unknown))"
	@echo "demo done:"
	@echo "  results table   $(DEMO)/reports/results.md"
	@echo "  evaluation      $(DEMO)/evaluation/ (metrics, confusion matrices), data reports $(DEMO)/data/prepared/*/report.json"
	@echo "  MLflow store    in this shell, before any mlflow or ferflow command on the demo's models:"
	@echo "                  export MLFLOW_TRACKING_URI=$(DEMO_TRACKING_URI)"
	@echo "  MLflow UI       cd $(DEMO) && $(BIN)/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db  (models: ferflow-*@champion)"
	@echo "  experiments     cd $(DEMO) && $(BIN)/dvc exp run -S train.full_stage.epochs=20 && $(BIN)/dvc exp show  (a git repository)"

# The quick benchmarks: data layer (needs ../shared's stand-in archives) and the pipeline's
# bytes per task; the others take their own arguments (see each script's docstring).
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_pipeline.py
	$(BIN)/python benchmarks/bench_data.py

lock: $(STAMP)
	{ grep '^#' requirements.lock; $(BIN)/python -m pip freeze --exclude-editable | grep -v '^ferflow'; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean-demo:
	rm -rf $(DEMO)

# The task image, tagged with the git commit and with the digest of its inputs
# (`ferflow pipeline image-tag`), which is the image a pipeline compiled from this checkout
# runs by default. Push both: `docker push --all-tags ghcr.io/ferflow/ferflow`.
image: $(STAMP)
	@git diff --quiet HEAD -- Dockerfile requirements.lock pyproject.toml src || \
	  echo "note: uncommitted changes in the image's inputs; the commit tag will not describe them"
	docker build --build-arg FERFLOW_GIT_COMMIT=$$(git rev-parse HEAD) \
	  -t $$($(BIN)/ferflow pipeline image-tag) \
	  -t ghcr.io/ferflow/ferflow:$$(git rev-parse --short=12 HEAD) .
