"""P5 tracking overhead: MLflow logging cost per training epoch, tracking on vs off, one run.

The same tiny training (demo data generated into benchmarks/out/p5, model demo_tiny,
deterministic, fixed threads) is repeated in rounds; each round trains once per mode:

    off     tracking.enabled=false (mlflow is never imported)
    sqlite  the embedded store, sqlite:///benchmarks/out/p5/mlruns/mlflow.db
    server  a local `mlflow server` on 127.0.0.1 (sqlite backend, artifacts proxied by the
            server to a local folder), started and stopped here; --no-server skips it

The order inside a round rotates so that drift on a shared machine hits every mode alike.
One discarded warm-up run per mode first (imports, schema migration, first experiment).
Tracking uses the defaults, system metrics included (a background thread sampling every
10 s): its CPU shows in "bg cpu", and its contention in the epoch times.

Measured per training (`stages.train`, the function the CLI and DVC call), means over rounds:
  wall      the whole call: start of the MLflow run, epochs, artifacts, end of the run
  epoch     steady-state wall seconds per epoch: the interval between successive epoch
            ends, which includes the tracker's per-epoch logging (a probe callback runs
            before the tracker, so each interval holds one log_batch)
  loop      the training loop alone (history `seconds`): tracking never runs inside it
  log/ep    foreground time inside the tracker's on_epoch_end (timed directly)
  fixed     foreground time of the tracker outside epochs (create run, params, inputs,
            artifacts, end of run): once per training, not per epoch
  bg cpu    CPU seconds of threads other than the main one (system metrics, HTTP)

Overhead per epoch, goal <= 2 %: [Δ(epoch - loop) + bg cpu / epochs] / epoch_off, Δ paired
with the untracked run of the same round. Subtracting the loop takes the training compute,
whose run-to-run noise on a shared machine is several %, out of the difference; the plain
Δ epoch % is printed beside it. Logging costs a constant time per epoch, so the % depends
on the epoch length: --per-class / --size set it.

    python benchmarks/bench_tracking.py [--rounds 3] [--epochs 6] [--per-class 200] [--size 48]
                                        [--threads 1] [--no-server]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "benchmarks" / "out" / "p5"
DATASET, MODEL = "LFW-FER", "demo_tiny"


# ---------------------------------------------------------------------------- data


def prepare_workspace(per_class: int, size: int) -> Path:
    """Demo archives fetched and prepared once (kept between runs of this script)."""
    from ferflow import stages
    from ferflow.config import load_params

    ws = WORK / f"data-{per_class}-{size}"
    params_file = ws / "params.yaml"
    if (ws / "data" / "prepared" / DATASET / "manifest.parquet").is_file() and params_file.is_file():
        return params_file
    shutil.rmtree(ws, ignore_errors=True)
    base = load_params(REPO / "params.yaml", [
        f"demo.out_dir={ws / 'archives'}", f"demo.images_per_class={per_class}", f"demo.image_size={size}",
        f"data.raw_dir={ws / 'data' / 'raw'}", f"data.prepared_dir={ws / 'data' / 'prepared'}",
        f"prepare.image_sizes=[{size}]", "prepare.workers=1", "fetch.progress=false", "demo.overrides=[]",
    ])
    stages.demo_data(base, params_out=params_file)
    params = load_params(params_file)
    stages.fetch(params, [DATASET])
    stages.prepare(params, [DATASET])
    return params_file


# ---------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow server` as tests/conftest.py starts it, with a local artifact folder instead of S3."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    port = free_port()
    bin_dir = Path(sys.executable).parent
    # Job execution off: 2 processes (~0.5 GB) instead of ~9 (FACTS.md).
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [str(bin_dir / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts", "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root,
        start_new_session=True,  # its uvicorn children stop with it (killpg below)
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
                if resp.status == 200:
                    return proc, uri
        except OSError:
            time.sleep(0.3)
    stop_server(proc)
    raise SystemExit(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ---------------------------------------------------------------------------- measuring


class Probe:
    """Runs before the tracker in stages.train's callback list: epoch end timestamps."""

    def __init__(self) -> None:
        self.marks: list[float] = []
        self.loop_seconds: list[float] = []

    def on_train_start(self, info: dict) -> None:
        pass

    def on_epoch_end(self, record: dict) -> None:
        self.marks.append(time.perf_counter())
        self.loop_seconds.append(float(record["seconds"]))

    def on_train_end(self, result) -> None:
        pass


TRACKER = {"fixed": 0.0, "epoch": []}


def instrument_tracker() -> None:
    """Time MlflowTrainCallback's foreground work (wrappers cost well under a microsecond)."""
    from ferflow.tracking.runs import MlflowTrainCallback

    def timed(fn, bucket: str):
        @functools.wraps(fn)
        def wrapper(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(self, *args, **kwargs)
            finally:
                spent = time.perf_counter() - start
                if bucket == "epoch":
                    TRACKER["epoch"].append(spent)
                else:
                    TRACKER["fixed"] += spent

        return wrapper

    # on_train_end includes _log_result and close (the system metrics thread's join and flush).
    for name, bucket in (("start", "fixed"), ("on_train_start", "fixed"), ("on_epoch_end", "epoch"),
                         ("on_train_end", "fixed")):
        setattr(MlflowTrainCallback, name, timed(getattr(MlflowTrainCallback, name), bucket))


def train_once(params_file: Path, mode: str, uri: str, args) -> dict:
    from ferflow import stages
    from ferflow.config import load_params

    out = WORK / "runs" / mode
    shutil.rmtree(out, ignore_errors=True)  # never a resume
    overrides = [
        "train.models=[demo_tiny]", f"train.datasets=[{DATASET}]", f"train.input_size={args.size}",
        "train.batch_size=32", "train.head_stage.epochs=1", f"train.full_stage.epochs={args.epochs - 1}",
        "train.full_stage.lr=0.002", "train.workers=0", f"train.threads={args.threads}",
        "train.early_stopping_patience=0", "train.device=cpu", "train.deterministic=true", f"train.out_dir={out}",
    ]
    if mode == "off":
        overrides.append("tracking.enabled=false")
    else:
        overrides += ["tracking.enabled=true", f"tracking.tracking_uri={uri}", "tracking.experiment=p5",
                      f"tracking.artifact_location={WORK / 'mlruns' / 'artifacts'}"]
    params = load_params(params_file, overrides)
    TRACKER["fixed"], TRACKER["epoch"] = 0.0, []
    probe = Probe()
    main_cpu, all_cpu = time.thread_time(), time.process_time()
    start = time.perf_counter()
    result = stages.train(params, DATASET, MODEL, callbacks=[probe])
    wall = time.perf_counter() - start
    background = max(0.0, (time.process_time() - all_cpu) - (time.thread_time() - main_cpu))  # clock granularity
    assert result.epochs_run == args.epochs, result.epochs_run
    intervals = [b - a for a, b in zip(probe.marks, probe.marks[1:])]
    return {
        "mode": mode, "wall": wall, "epoch": statistics.fmean(intervals),
        "loop": statistics.fmean(probe.loop_seconds[1:]),
        "log_epoch": statistics.fmean(TRACKER["epoch"]) if TRACKER["epoch"] else 0.0,
        "fixed": TRACKER["fixed"], "bg_cpu": background,
        "val_accuracy": result.history[-1]["val_accuracy"],
    }


# ---------------------------------------------------------------------------- report


def summarise(runs: list[dict], modes: list[str], epochs: int) -> list[dict]:
    """Means over rounds; on/off differences paired within a round."""
    rows = []
    off = {r["round"]: r for r in runs if r["mode"] == "off"}

    def paired(values: list[float]) -> tuple[float, float]:
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    for mode in modes:
        mine = [r for r in runs if r["mode"] == mode]
        row = {"mode": mode, "n": len(mine)}
        for key in ("wall", "epoch", "loop", "log_epoch", "fixed", "bg_cpu"):
            row[key] = statistics.fmean(r[key] for r in mine)
        if mode != "off":
            base = [off[r["round"]] for r in mine]
            row["d_epoch_pct"], row["d_epoch_sd"] = paired(
                [100 * (r["epoch"] / b["epoch"] - 1) for r, b in zip(mine, base)])
            # Outside the training loop (validation, checkpoints, callbacks): where logging
            # happens, without the loop's machine noise. Plus the background threads' CPU.
            row["d_outside_ms"], row["d_outside_sd"] = paired(
                [1000 * ((r["epoch"] - r["loop"]) - (b["epoch"] - b["loop"])) for r, b in zip(mine, base)])
            row["overhead_pct"] = 100 * (row["d_outside_ms"] / 1000 + row["bg_cpu"] / epochs) / statistics.fmean(
                b["epoch"] for b in base)
            row["d_wall_pct"], _ = paired([100 * (r["wall"] / b["wall"] - 1) for r, b in zip(mine, base)])
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    print("\n| mode | runs | wall s | epoch s | loop s | log/epoch ms | Δ outside loop ms/epoch (sd) "
          "| bg cpu s/run | **overhead/epoch %** | Δ epoch % measured (sd) | fixed s/run | Δ wall % |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["mode"] == "off":
            mid, tail = "— | " + f"{r['bg_cpu']:.2f} | —", "— | — | —"
        else:
            mid = f"{r['d_outside_ms']:+.1f} ({r['d_outside_sd']:.1f}) | {r['bg_cpu']:.2f} | **{r['overhead_pct']:.2f}**"
            tail = f"{r['d_epoch_pct']:+.2f} ({r['d_epoch_sd']:.2f}) | {r['fixed']:.2f} | {r['d_wall_pct']:+.1f}"
        print(f"| {r['mode']} | {r['n']} | {r['wall']:.2f} | {r['epoch']:.3f} | {r['loop']:.3f} | "
              f"{1000 * r['log_epoch']:.1f} | {mid} | {tail} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="measured rounds (one run per mode each)")
    ap.add_argument("--epochs", type=int, default=6, help="1 head epoch + the rest full")
    ap.add_argument("--per-class", type=int, default=200, help="demo images per class and split group")
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (fixed for every run)")
    ap.add_argument("--no-server", action="store_true", help="skip the local mlflow server mode")
    args = ap.parse_args(argv)
    if args.epochs < 3:
        ap.error("--epochs must be at least 3 (steady-state intervals)")

    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # The params name the store; an inherited variable would silently win over them.
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID",
                "FERFLOW_PARENT_RUN_ID"):
        os.environ.pop(key, None)
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # "View run at ..." per run
    WORK.mkdir(parents=True, exist_ok=True)
    params_file = prepare_workspace(args.per_class, args.size)
    shutil.rmtree(WORK / "mlruns", ignore_errors=True)
    (WORK / "mlruns").mkdir()
    instrument_tracker()

    import mlflow
    import torch

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # per-run INFO lines would bury the table

    uris = {"off": "", "sqlite": f"sqlite:///{WORK / 'mlruns' / 'mlflow.db'}"}
    server = None
    if not args.no_server:
        server, uris["server"] = start_server(WORK / "server")
    modes = list(uris)
    print(f"P5 tracking overhead: {MODEL} on {DATASET} demo data ({args.per_class}/class, {args.size}px), "
          f"{args.epochs} epochs, batch 32, threads {args.threads}, deterministic; "
          f"{args.rounds} rounds x {modes}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"torch {torch.__version__}, mlflow {mlflow.__version__}")
    runs = []
    try:
        for mode in modes:  # warm-up, discarded
            train_once(params_file, mode, uris[mode], args)
        for rnd in range(args.rounds):
            order = modes[rnd % len(modes):] + modes[: rnd % len(modes)]
            for mode in order:
                run = {**train_once(params_file, mode, uris[mode], args), "round": rnd}
                runs.append(run)
                print(f"  round {rnd} {mode:6s} wall {run['wall']:6.2f}s  epoch {run['epoch']:.3f}s  "
                      f"log/epoch {1000 * run['log_epoch']:5.1f}ms  fixed {run['fixed']:.2f}s  "
                      f"bg cpu {run['bg_cpu']:.2f}s", flush=True)
    finally:
        if server is not None:
            stop_server(server)
    rows = summarise(runs, modes, args.epochs)
    print_table(rows)
    worst = max(r["overhead_pct"] for r in rows[1:])
    print(f"\nworst overhead per epoch {worst:.2f} % (goal <= 2 %): {'met' if worst <= 2 else 'NOT met'} "
          f"at {rows[0]['epoch']:.2f} s per untracked epoch")
    (WORK / "p5.json").write_text(json.dumps({"args": vars(args), "runs": runs, "summary": rows}, indent=2))
    print(f"raw numbers: {WORK / 'p5.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
