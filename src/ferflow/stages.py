"""Stage entry points: the one implementation that the CLI, dvc.yaml and KFP components call."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional

import yaml

from ferflow import layout
from ferflow.config import ArchiveSpec, Params, apply_override, dump_params, parse_override, validate
from ferflow.errors import ConfigError, FerflowError
from ferflow.fileio import atomic_write_text


def check_names(params: Params, datasets: Iterable[str] = (), models: Iterable[str] = ()) -> None:
    """Every dataset and model name that arrives from the CLI or a KFP task, checked against
    data.archives/data.unions and the zoo before any path is built from it (so `../x` never
    becomes a directory)."""
    check_datasets(params, datasets)
    check_models(models)


def check_datasets(params: Params, names: Iterable[str]) -> None:
    for name in names:
        params.data.check_dataset(name)


def check_models(names: Iterable[str]) -> list[str]:
    """The zoo names of `names` (`timm-<arch>`, its folder name, is `timm:<arch>`)."""
    return [check_model(name) for name in names]


def check_model(name: str) -> str:
    """The zoo name of a model given on the command line, refused (ConfigError) when unknown
    or when it would name another folder than the model's own."""
    from ferflow.models import zoo

    try:
        entry = zoo.resolve(name)
    except FerflowError as exc:
        raise ConfigError(str(exc)) from None
    folder = layout.model_dir_name(entry.name)
    if layout.model_dir_name(name) != folder:  # " demo_tiny" resolves, but would name another folder
        raise ConfigError(f"model name {name!r}: use {entry.name!r}")
    if name != folder and os.environ.get("DVC_STAGE"):
        # dvc.yaml's outs put the name itself in paths; the run folder is `folder`.
        raise ConfigError(f"model name {name!r}: dvc.yaml builds paths from it, so list it as {folder!r} "
                          f"(the same model, named as its folder) in train.models")
    return entry.name


def with_digests(params: Params, datasets: Iterable[str] = ()) -> Params:
    """`params` with the digests `ferflow fetch` recorded for local sources that params leave
    without a sha256, required for `datasets` (ferflow.data.digests)."""
    from ferflow.data.digests import with_recorded_digests

    return with_recorded_digests(params, datasets)


def select_archives(params: Params, names: Optional[Iterable[str]]) -> list[ArchiveSpec]:
    names = list(names or [])
    if not names:
        return params.data.specs
    return [params.data.archive(n) for n in names]


def fetch(params: Params, names: Optional[Iterable[str]] = None, dvc_lock=None, dvc_remote: str = ""):
    """Download (or reuse) and verify the archives named in params (default: all), each
    held to its dvc.lock pin (a file, its text or parsed) and fetched by md5 from the DVC
    remote `dvc_remote` when one is given."""
    from ferflow.data.dvc_remote import fetch_archives

    specs = select_archives(params, names)  # names checked before any path is built
    params.data.raw_dir.mkdir(parents=True, exist_ok=True)
    return fetch_archives(specs, params.data.raw_dir, params.fetch, dvc_lock, dvc_remote)


def prepare(params: Params, names: Optional[Iterable[str]] = None):
    """Extract, validate and cache each dataset (manifest + report + uint8 caches); a union
    (data.unions) is gathered from its members' prepared data. Default: every archive."""
    from ferflow.data.prepare import prepare_dataset
    from ferflow.data.union import prepare_union

    names = list(names or params.data.archives)
    check_datasets(params, names)
    data = with_digests(params, names).data
    results = []
    for name in names:
        if name in data.unions:
            members = [data.archive(m) for m in data.members(name)]
            results.append(prepare_union(name, members, data.raw_dir, data.prepared_dir, params.prepare, params.fetch))
        else:
            spec = data.archive(name)  # checked above
            results.append(prepare_dataset(spec, data.raw_dir, data.prepared_dir, params.prepare, params.fetch))
    return results


def synthesize_masks(params: Params, dataset: str, out: Path, styles=None, colours=None, seed: int = 0,
                     placement: str = "auto", face_box=(0.0, 0.0, 1.0, 1.0), face_cut: bool = True):
    """Masked and masked face-cut variants of a dataset's archive, in the layout prepare reads."""
    from ferflow.data.masks import COLOURS, STYLES
    from ferflow.data.synthesize import synthesize_masks as synthesize

    check_datasets(params, [dataset])
    params = with_digests(params, [dataset])
    return synthesize(params.data.archive(dataset), params.data.raw_dir, Path(out), params.prepare, params.fetch,
                      styles or STYLES, colours or COLOURS, seed, placement, tuple(face_box), face_cut)


def demo_data(params: Params, out_dir: Optional[Path] = None, params_out: Optional[Path] = None):
    """Generate the offline demo archives; optionally write a params file that uses them.

    The written params differ from the input only in `data.archives`, which then point at
    the generated files with their sha256, so the demo runs through the normal fetch path.
    """
    from ferflow.data.demo import demo_sources, generate_demo_archives

    out_dir = Path(out_dir or params.demo.out_dir)
    archives = generate_demo_archives(params.demo, out_dir)
    if params_out is not None:
        tree = dump_params(params)
        for text in params.demo.overrides:
            keys, value = parse_override(text)
            apply_override(tree, keys, value, origin=f"demo.overrides: {text}")
        sources = demo_sources(archives)
        if not out_dir.is_absolute():
            # Relative paths in a params file are read from where its stages run: its folder.
            base = params_out.parent.resolve()
            for src in sources:
                src["uri"] = _relative_to(Path(src["uri"]).resolve(), base)
        tree["data"]["archives"] = {src.pop("name"): src for src in sources}
        validate(tree, origin=str(params_out))  # never write a params file that would not load
        write_yaml_atomic(params_out, tree)
    return archives


def _relative_to(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


def write_yaml_atomic(path: Path, tree: dict) -> None:
    atomic_write_text(path, yaml.safe_dump(tree, sort_keys=False))


@contextmanager
def tracking_session(params: Params, dataset: str, model: str) -> Iterator[Optional[object]]:
    """The MLflow callback of one training run, started before any compute (so a down or
    refusing server fails in seconds) and closed FAILED if training raises; None when
    `tracking.enabled` is false (mlflow is then never imported) or on ranks other than 0."""
    if not params.tracking.enabled:
        yield None
        return
    from ferflow.tracking import service
    from ferflow.tracking.runs import MlflowTrainCallback

    callback = MlflowTrainCallback(params, dataset, model)
    if not callback.enabled:  # DDP rank > 0: fail like rank 0 would, record nothing
        service.check_reachable(service.resolve_tracking_uri(params.tracking), min(params.tracking.timeout_s, 5.0))
        yield None
        return
    with callback:
        yield callback


def train(params: Params, dataset: str, model: str, callbacks=()):
    """Fine-tune one zoo model on one prepared dataset (resumes a run dir with last.pt),
    recorded in MLflow when `tracking.enabled`."""
    from ferflow.training.trainer import preflight, train as train_model

    check_datasets(params, [dataset])
    params = with_digests(params, [dataset])  # the recipe hash and lineage name the data's digest
    model = check_model(model)
    preflight(params, dataset, model)  # before the MLflow run: a usage error leaves none
    with tracking_session(params, dataset, model) as tracker:
        all_callbacks = [*callbacks, tracker] if tracker is not None else list(callbacks)
        return train_model(params, dataset, model, callbacks=all_callbacks)


def evaluate(params: Params, dataset: str, model: str, eval_datasets: Optional[Iterable[str]] = None) -> dict:
    """Cross-dataset evaluation of the run trained on `dataset`; logged into that training's
    MLflow run when it recorded one (`mlflow_run.json`) and `tracking.enabled`."""
    from ferflow.evaluation.evaluate import evaluate_run, preflight_run

    eval_datasets = None if eval_datasets is None else list(eval_datasets)
    check_datasets(params, [dataset, *(eval_datasets or [])])
    model = check_model(model)
    eval_datasets = preflight_run(params, dataset, model, eval_datasets)  # default: the prepared ones
    run_dir = layout.run_dir(params.require_train().out_dir, dataset, model)
    tracked = params.tracking.enabled and (run_dir / layout.MLFLOW_RUN).is_file()
    if tracked:  # fail before computing anything when the server is down
        params = with_digests(params, [dataset])  # lineage names the training data's digest
        from ferflow.tracking import service

        service.check_reachable(service.resolve_tracking_uri(params.tracking), min(params.tracking.timeout_s, 5.0))
    summary = evaluate_run(params, dataset, model, eval_datasets)
    if tracked:
        from ferflow.tracking.eval_logging import log_evaluation_run

        eval_dir = layout.eval_dir(params.evaluate.out_dir, dataset, model)
        log_evaluation_run(params, dataset, model, summary, eval_dir, run_dir=run_dir)
    return summary


def zero_shot(params: Params, model: str, eval_datasets: Optional[Iterable[str]] = None) -> dict:
    """The pretrained expression head mapped to 3 classes: the 'before fine-tuning' row."""
    from ferflow.evaluation.evaluate import evaluate_zero_shot

    check_datasets(params, eval_datasets or [])
    return evaluate_zero_shot(params, check_model(model), eval_datasets)


def report(params: Params, from_registry: bool = False):
    """The models x datasets table beside the seed's published numbers; from the registry,
    with a note wherever a version's figures differ from the local evaluation files."""
    from ferflow.evaluation.report import collect_results, compare_with_files, write_report

    if from_registry:
        from ferflow.tracking.queries import registry_results
        from ferflow.tracking.service import configure

        configure(params)
        results = registry_results(params)
        return results, write_report(results, params.report.out_dir,
                                     compare_with_files(results, params.evaluate.out_dir))
    results = collect_results(params.evaluate.out_dir)
    return results, write_report(results, params.report.out_dir)


def register(params: Params, dataset: str, model: str, run_dir: Optional[Path] = None):
    """Log the fine-tuned model to MLflow and register it as a new version (alias challenger);
    the same run, weights and eval data registered before return that version (`created` false)."""
    from ferflow.tracking.versioning import register as register_version
    from ferflow.fileio import atomic_write_json

    check_datasets(params, [dataset])
    params = with_digests(params, [dataset])  # lineage names the training data's digest
    model = check_model(model)
    run_dir = Path(run_dir) if run_dir else layout.run_dir(params.require_train().out_dir, dataset, model)
    version = register_version(params, dataset, run_dir)  # checks what it needs before any MLflow run
    atomic_write_json(layout.registry_record(params.registry.records_dir, dataset, model), {
        "name": version.name, "version": str(version.version), "run_id": version.run_id,
        "source": version.source, "aliases": sorted(version.aliases or []), "created": version.created,
    })
    return version


def promote(params: Params, dataset: str, metric: Optional[str] = None, min_delta: Optional[float] = None,
            rollback: bool = False, force: bool = False):
    """Move `champion` to the best challenger of a dataset's registered model, by the gate
    (better than the champion, and not below the zero-shot start; `force` skips both).
    The decision goes to the registry's promotion log and, the latest one, to
    `<registry.records_dir>/promotions/<dataset>.json`."""
    from ferflow.tracking import aliases
    from ferflow.fileio import atomic_write_json

    check_datasets(params, [dataset])
    name = params.registry.name_for(dataset)
    path = layout.promotion_record(params.registry.records_dir, dataset)

    def record(decision) -> None:
        atomic_write_json(path, decision.as_dict())

    if rollback:
        return aliases.rollback(params, name, record=record)
    return aliases.promote(
        params, name,
        metric=metric or params.registry.metric,
        min_delta=params.registry.min_delta if min_delta is None else min_delta,
        force=force, record=record,
    )
