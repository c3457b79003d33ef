#!/usr/bin/env bash
# The GPU figures in one go, inside a time budget: the CUDA speed paths (bench_train.py gpu),
# then the recipe-quality runs (bench_quality.py), most important first, as parallel processes
# sharing the card. Runs are kept under $FERFLOW_BENCH_WORK, so a rerun continues where the
# budget stopped the last one.
#
#   FERFLOW_STANDIN=DIR FERFLOW_FER7=FILE FERFLOW_TIMM_TRAIN=FILE benchmarks/gpu.sh OUT_DIR [SECONDS]
#
# GPU_PARTS=speed or GPU_PARTS=quality runs one part; PARALLEL (default 6) is how many recipe
# runs share the card at once. OUT_DIR gets: gpu.txt, speed.log, quality-setup.log, quality-jobs.log, quality-report.txt and
# quality-runs.tar.gz (the run records, to read back with FERFLOW_BENCH_WORK=... --report-only).
set -uo pipefail
out=${1:?usage: benchmarks/gpu.sh OUT_DIR [SECONDS]}
budget=${2:-540}
start=$(date +%s)
left() { echo $((budget - ($(date +%s) - start))); }
export PY=${PYTHON:-python3} PYTHONUNBUFFERED=1 FERFLOW_BENCH_WORK=${FERFLOW_BENCH_WORK:-/tmp/ferflow-gpu-bench}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}  # parallel runs share the CPU cores
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$out/gpu.txt" 2>&1
"$PY" -c 'import torch, timm; print("torch", torch.__version__, "timm", timm.__version__)' >>"$out/gpu.txt" 2>&1

# Speed: about a third of the budget; compilation is measured last, so a cut costs it first.
if [[ ${GPU_PARTS:-speed,quality} == *speed* ]]; then
  env -u OMP_NUM_THREADS timeout -k 5 $(($(left) * 30 / 100)) "$PY" benchmarks/bench_train.py gpu 2>&1 | tee "$out/speed.log"
fi
[[ ${GPU_PARTS:-speed,quality} == *quality* ]] || exit 0

# Quality: archives, their union and zero-shot once, then one process per (recipe, archive, seed).
# shellcheck disable=SC2086
timeout -k 5 $(($(left) - 30)) "$PY" benchmarks/bench_quality.py --recipes "new default" --setup-only ${QUALITY_ARGS:-} 2>&1 | tee "$out/quality-setup.log"
jobs=()
for recipe in "new default" "HSEmotion" "previous default"; do
  for seed in 42 43 44; do for ds in LFW-FER M-LFW-FER M-LFW-FER-face-cut; do jobs+=("$recipe|$ds|$seed"); done; done
done
for seed in 42 43 44; do
  jobs+=("new default + masks|LFW-FER|$seed" "new default, fp32|LFW-FER|$seed")
done
for seed in 42 43 44; do jobs+=("new default + masks (union)|LFW-FER|$seed" "new default (union)|LFW-FER|$seed"); done
run_job() {
  IFS='|' read -r recipe ds seed <<<"$1"
  local log
  log=$(mktemp)
  # shellcheck disable=SC2086  # QUALITY_ARGS: extra flags, word-split on purpose
  if "$PY" benchmarks/bench_quality.py --recipes "$recipe" --train-on "$ds" --seed-list "$seed" --workers 3 \
      ${QUALITY_ARGS:-} >"$log" 2>&1; then
    grep -E '^  .* \| seed ' "$log"
  else
    echo "FAILED: $recipe | $ds | $seed"; tail -n 8 "$log"
  fi
  rm -f "$log"
}
export -f run_job
# timeout signals its whole process group: every run stops at the budget's end, not only xargs
timeout -k 5 $(($(left) - 25)) xargs -d '\n' -P "${PARALLEL:-6}" -I{} bash -c 'run_job "$1"' _ {} \
  < <(printf '%s\n' "${jobs[@]}") | tee "$out/quality-jobs.log"
"$PY" benchmarks/bench_quality.py --report-only --recipes "HSEmotion" "previous default" "new default" \
  "new default + masks" "new default, fp32" "new default (union)" "new default + masks (union)" \
  >"$out/quality-report.txt" 2>&1
tar -czf "$out/quality-runs.tar.gz" -C "$FERFLOW_BENCH_WORK" --exclude=quality/work quality
echo "gpu.sh done in $(($(date +%s) - start)) s"
