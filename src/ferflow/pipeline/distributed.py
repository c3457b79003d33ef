"""Training on more than one GPU of one machine: the train stage under torchrun.

`launch_train` runs the train stage with N processes on this machine (torchrun, one rank per
GPU; gloo on CPU) and reads its result back from the run directory. Across several nodes,
`ferflow.pipeline.trainjob` describes the same stage as a Kubeflow Trainer v2 `TrainJob`.
Both start the one `ferflow train` CLI (`train_argv`), so DDP itself stays where it is
(ferflow.training.runtime and trainer).

Global batch (what ferflow.training.trainer does with `world_size` N):
    `train.batch_size` is the batch of ONE process. Each rank draws a disjoint 1/N share of
    every epoch's shuffled order (EpochBatchSampler: padded by wrapping, then strided), so a
    step consumes batch_size x N images, an epoch has ~1/N as many steps, and DDP averages
    the gradients over the ranks: one step equals a single-process step at batch_size x N
    (exactly so when nothing depends on the batch's composition: frozen BatchNorm, no
    augmentation, unweighted loss; with BatchNorm in train mode each rank normalises over
    its own batch_size images, no SyncBatchNorm). The learning rate is NOT scaled with N
    (`*_stage.lr` is used as written) and the warmup/cosine schedule spans the stage's
    actual (fewer) steps; `max_steps_per_epoch` counts steps, so it covers N x the images.
    To keep a recipe's optimisation unchanged on N GPUs, divide train.batch_size by N.
    Validation is sharded and all-reduced, so val metrics count every image once; the
    `train_loss`/`train_accuracy` in history are rank 0's shard only.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Optional, Sequence

from ferflow import layout
from ferflow.config import Params, dump_params, load_params
from ferflow.errors import FerflowError

_OUTPUT_TAIL = 15  # lines of the failed command's output repeated in the error


def torchrun_command(params_file: Path, dataset: str, model: str, nproc: int) -> list[str]:
    """`ferflow train` under torchrun with `nproc` ranks on this machine (--standalone: a
    local rendezvous on a free port, so concurrent launches never collide)."""
    launcher = ["--standalone", f"--nproc_per_node={int(nproc)}"]
    return train_argv(sys.executable, launcher, str(params_file), dataset, model)


def train_argv(python: str, launcher: Sequence[str], params_file: str, dataset: str, model: str) -> list[str]:
    """`ferflow train` under `python -m torch.distributed.run` with the `launcher` flags
    (rendezvous, ranks per node): the one command of one node and of every TrainJob pod."""
    # `-m ferflow.cli` is the `ferflow` console script, run by the interpreter `python` names.
    return [python, "-m", "torch.distributed.run", *launcher, "-m", "ferflow.cli", "train",
            "--dataset", dataset, "--model", model, "--params", params_file]


def launch_train(params: Params, params_file: Path, dataset: str, model: str, nproc: int):
    """Train `model` on `dataset` with `nproc` processes; returns a TrainResult.

    nproc <= 1: `ferflow.stages.train` in this process. nproc > 1: `torchrun_command` as a
    child (cwd: the params file's folder, where its relative paths point; output streamed
    to this process's stderr, the task log), then the result read back from the run
    directory. `params` must be what `params_file` loads: the children read the file.

    Global batch: each of the nproc ranks takes `train.batch_size` images per step, so a
    step sees batch_size x nproc images (gradients averaged by DDP) and an epoch has
    ~1/nproc as many steps; the learning rate is not scaled. See the module docstring.
    Each rank gets OMP_NUM_THREADS = cpus // nproc (at least 1) unless the variable is set;
    a non-zero `train.threads` still wins inside each rank.
    """
    if nproc <= 1:
        from ferflow import stages

        return stages.train(params, dataset, model)
    params_file = Path(params_file).resolve()
    _check_same_params(params, params_file)
    _check_devices(params, nproc)
    workdir = params_file.parent
    run_dir = _run_dir(params, dataset, model, workdir)
    resumed_from = resume_epoch(params, dataset, model, run_dir)
    cmd = torchrun_command(params_file, dataset, model, nproc)
    run_streamed(cmd, cwd=workdir, env=child_env(nproc))
    return read_result(run_dir, resumed_from)


def child_env(nproc: int, base: Optional[dict] = None) -> dict:
    """The environment of torchrun's ranks: the CPUs shared fairly, output unbuffered."""
    env = dict(os.environ if base is None else base)
    env.setdefault("OMP_NUM_THREADS", str(max(1, _cpu_count() // max(1, nproc))))
    env.setdefault("PYTHONUNBUFFERED", "1")  # epoch lines reach the task log as they happen
    return env


def _cpu_count() -> int:
    from ferflow.cpus import available_cpus

    return available_cpus()  # the pod's CPU request (FERFLOW_CPUS), else this process's affinity


def run_streamed(cmd: Sequence[str], cwd: Path, env: dict) -> None:
    """Run `cmd`, copying its merged output line by line to stderr; FerflowError on failure."""
    tail: deque = deque(maxlen=_OUTPUT_TAIL)
    errors: dict = {}  # the ranks' one-line CLI errors, deduplicated: torchrun's report buries them
    shown = shlex.join(cmd)
    try:
        proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", bufsize=1)
    except OSError as exc:
        raise FerflowError(f"cannot start `{shown}`: {exc}") from None
    try:
        for line in proc.stdout:
            sys.stderr.write(line)
            tail.append(line.rstrip("\n"))
            if line.startswith("error: ") and len(errors) < 5:
                errors[line.strip()] = None
        code = proc.wait()
    except BaseException:
        # Interrupted (Ctrl-C, task cancelled): torchrun passes SIGTERM on to its ranks.
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    finally:
        proc.stdout.close()
    if code != 0:
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        detail = "\n".join(errors) if errors else "last output:\n" + "\n".join(tail)
        raise FerflowError(f"distributed training failed: `{shown}` (in {cwd}) {how}; {detail}")


def _check_same_params(params: Params, params_file: Path) -> None:
    if dump_params(load_params(params_file)) != dump_params(params):
        raise FerflowError(f"the params given differ from {params_file}, which the torchrun ranks read; "
                           "write the resolved params to that file first (ferflow.config.dump_params)")


def _check_devices(params: Params, nproc: int) -> None:
    """One rank per GPU: more ranks than visible GPUs would fail in every rank's set_device."""
    import torch

    if params.require_train().device in ("auto", "cuda") and torch.cuda.is_available():
        visible = torch.cuda.device_count()
        if nproc > visible:
            raise FerflowError(f"{nproc} training processes but only {visible} GPU(s) visible; "
                               f"use at most {visible} (one rank per GPU)")


def _run_dir(params: Params, dataset: str, model: str, workdir: Path) -> Path:
    run_dir = layout.run_dir(params.require_train().out_dir, dataset, model)
    return run_dir if run_dir.is_absolute() else workdir / run_dir


def resume_epoch(params: Params, dataset: str, model: str, run_dir: Path) -> int:
    """The epoch a training of (dataset, model) with `params` in `run_dir` resumes after, by
    the trainer's own rule: that of its last.pt when it holds the same recipe, else 0."""
    from ferflow.data.digests import with_recorded_digests
    from ferflow.training import checkpoint as ckpt
    from ferflow.training.trainer import recipe_hash

    path = run_dir / layout.LAST
    if not path.is_file():
        return 0
    try:
        state = ckpt.load_last(path)
    except Exception:  # unreadable: the trainer will fail or restart on it, not us
        return 0
    recipe = recipe_hash(with_recorded_digests(params, [dataset]), dataset, model)
    return int(state.get("epoch", 0)) if state.get("recipe") == recipe else 0


def read_result(run_dir: Path, resumed_from_epoch: int = 0):
    """The TrainResult `trainer.train` returned in rank 0, rebuilt from the files it wrote:
    train_metrics.json (best epoch, epochs run, the best epoch's val_* metrics) and
    history.json (one record per epoch)."""
    from ferflow.training.trainer import TrainResult

    run_dir = Path(run_dir)
    try:
        summary = json.loads((run_dir / layout.TRAIN_METRICS).read_text(encoding="utf-8"))
        history = json.loads((run_dir / layout.HISTORY_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FerflowError(f"training finished but its results in {run_dir} cannot be read: {exc}") from None
    best_metrics = {k: v for k, v in summary.items() if k.startswith("val_")}
    return TrainResult(run_dir, int(summary["best_epoch"]), best_metrics, int(summary["epochs_run"]), history,
                       resumed_from_epoch)
