"""Fine-tuning on generated data, CPU, tiny model: learning, determinism, resume, DDP."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ferflow import stages
from ferflow.config import AugmentSettings
from ferflow.models.preprocess import Normalize
from ferflow.training.augment import augment
from ferflow.training.losses import inverse_frequency_weights
from ferflow.training.optim import SAM, cosine_with_warmup

from .conftest import load, read_json, write_params

BIN = Path(sys.executable).parent


def test_train_then_evaluate_learns_above_chance(demo_workspace, tmp_path):
    params = load(demo_workspace, f"train.out_dir={tmp_path / 'models'}", "train.full_stage.epochs=14",
                  f"evaluate.out_dir={tmp_path / 'evaluation'}")
    result = stages.train(params, "LFW-FER", "demo_tiny")
    run = result.run_dir
    for name in ("best.safetensors", "last.pt", "history.json", "history.csv", "train_metrics.json", "run.json"):
        assert (run / name).is_file(), name
    history = read_json(run / "history.json")
    assert [h["stage"] for h in history] == ["head"] + ["full"] * 14
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    summary = stages.evaluate(params, "LFW-FER", "demo_tiny")
    assert set(summary) == {"LFW-FER", "M-LFW-FER", "M-LFW-FER-face-cut"}
    assert summary["LFW-FER"]["accuracy"] > 0.6, summary  # chance is 1/3
    cell = tmp_path / "evaluation/fine-tuned/LFW-FER/demo_tiny/LFW-FER"
    assert {"metrics.json", "confusion.png", "confusion.json", "predictions.csv"} <= {p.name for p in cell.iterdir()}


def test_same_params_same_metrics(demo_workspace, tmp_path):
    runs = []
    for name in ("a", "b"):
        params = load(demo_workspace, f"train.out_dir={tmp_path / name}", "train.deterministic=true")
        runs.append(stages.train(params, "LFW-FER", "demo_tiny").history)
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in h]  # noqa: E731
    assert strip(runs[0]) == strip(runs[1])


def _train_cmd(params_file):
    return [str(BIN / "ferflow"), "train", "--dataset", "LFW-FER", "--model", "demo_tiny", "--params", str(params_file)]


def test_kill_9_then_resume_equals_uninterrupted(demo_workspace, tmp_path):
    extra = ("train.deterministic=true", "train.full_stage.epochs=6")
    ref_params = write_params(tmp_path / "ref.yaml", demo_workspace, f"train.out_dir={tmp_path / 'ref'}", *extra)
    cut_params = write_params(tmp_path / "cut.yaml", demo_workspace, f"train.out_dir={tmp_path / 'cut'}", *extra)
    subprocess.run(_train_cmd(ref_params), check=True, capture_output=True, timeout=600)

    proc = subprocess.Popen(_train_cmd(cut_params), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    history = tmp_path / "cut/LFW-FER/demo_tiny/history.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if history.is_file() and len(read_json(history)) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "training finished before it could be killed; make the run longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = len(read_json(history))
    assert killed_at < 7
    resumed = subprocess.run(_train_cmd(cut_params), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    ref = read_json(tmp_path / "ref/LFW-FER/demo_tiny/history.json")
    cut = read_json(history)
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in h]  # noqa: E731
    assert strip(cut) == strip(ref)
    final = lambda d: {k: v for k, v in read_json(d / "LFW-FER/demo_tiny/train_metrics.json").items() if k != "train_images_per_s"}  # noqa: E731
    assert final(tmp_path / "cut") == final(tmp_path / "ref")


def test_ddp_on_gloo_with_two_processes(demo_workspace, tmp_path):
    params_file = write_params(tmp_path / "ddp.yaml", demo_workspace, f"train.out_dir={tmp_path / 'ddp'}",
                               "train.full_stage.epochs=1")
    port = str(29500 + os.getpid() % 1000)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", "-m", "ferflow.cli", "train", "--dataset", "LFW-FER", "--model", "demo_tiny",
           "--params", str(params_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "ddp/LFW-FER/demo_tiny"
    info = read_json(run / "run.json")
    assert info["world_size"] == 2
    history = read_json(run / "history.json")
    assert len(history) == 2
    # validation was reduced over both ranks: every val image counted exactly once
    assert history[-1]["val_n"] == info["n_val"]


def test_augment_keeps_shape_and_changes_pixels():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    y = augment(x, AugmentSettings())
    assert y.shape == x.shape and y.dtype == x.dtype and not torch.equal(x, y)
    off = AugmentSettings(hflip=False, rotate_deg=0, translate=0, scale=(1.0, 1.0), erasing_p=0)
    assert torch.equal(augment(x, off), x)


def test_flip_folded_into_the_affine_is_a_plain_flip():
    x = torch.randn(16, 3, 12, 10)
    identity_affine = AugmentSettings(rotate_deg=0, translate=0, scale=(1.0, 1.0 + 1e-7), erasing_p=0)
    torch.manual_seed(3)
    folded = augment(x, identity_affine)
    torch.manual_seed(3)
    flip = torch.rand(16) < 0.5
    assert 0 < int(flip.sum()) < 16
    torch.testing.assert_close(folded, torch.where(flip.view(16, 1, 1, 1), x.flip(3), x), atol=1e-5, rtol=0)


def test_normalize_matches_reference():
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    expected = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(Normalize(mean, std, torch.device("cpu"))(images), expected, atol=1e-5)


def test_class_weights_and_schedule():
    w = inverse_frequency_weights(np.array([0, 0, 0, 1]), 3)
    assert w[1] == pytest.approx(3 * w[0]) and w[2] > 0
    f = cosine_with_warmup(100, 0.1, 0.01)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(99) == pytest.approx(0.01, abs=1e-3)


def test_sam_reduces_a_quadratic():
    w = torch.nn.Parameter(torch.tensor([3.0, -2.0]))
    opt = SAM(torch.optim.SGD([w], lr=0.1), rho=0.05)
    for _ in range(50):
        opt.zero_grad()
        (w ** 2).sum().backward()

        def closure():
            opt.zero_grad()
            loss = (w ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
    assert float((w.detach() ** 2).sum()) < 1e-3


def test_resume_only_continues_the_same_recipe(demo_workspace, tmp_path):
    out = f"train.out_dir={tmp_path / 'm'}"
    first = stages.train(load(demo_workspace, out, "train.full_stage.epochs=1"), "LFW-FER", "demo_tiny")
    assert first.epochs_run == 2
    # same recipe, nothing left to do: resumes after epoch 2 and stops
    again = stages.train(load(demo_workspace, out, "train.full_stage.epochs=1"), "LFW-FER", "demo_tiny")
    assert again.resumed_from_epoch == 2 and again.epochs_run == 2
    # another learning rate is another recipe: last.pt is not trusted, training restarts
    changed = stages.train(load(demo_workspace, out, "train.full_stage.epochs=1", "train.full_stage.lr=0.0005"),
                           "LFW-FER", "demo_tiny")
    assert changed.resumed_from_epoch == 0 and changed.epochs_run == 2


def test_keep_freed_memory_serves_big_buffers_from_the_heap_and_keeps_them():
    """Under glibc's defaults a 64 MB buffer is its own mmap, unmapped on free (so every step
    faults its pages in again); with keep_freed_memory it comes from the heap and stays there
    once freed. Read from glibc's own accounting (mallinfo2), in a subprocess: it is per process."""
    import json
    import subprocess
    import sys

    code = """
import ctypes, json, sys, torch
from ferflow.training.runtime import keep_freed_memory
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
if sys.argv[1] == "keep":
    assert keep_freed_memory()
x = torch.ones(16 * 1024 * 1024)  # 64 MB
alive = libc.mallinfo2()
del x
freed = libc.mallinfo2()
print(json.dumps({"mmapped_alive": alive.hblkhd, "mmapped_freed": freed.hblkhd, "heap_free_after": freed.fordblks}))
"""
    mb = 1 << 20
    result = {}
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True)
        result[mode] = json.loads(out.stdout)
    default, keep = result["default"], result["keep"]
    # default: the buffer is an mmap of its own, gone from the process once freed
    assert default["mmapped_alive"] >= 64 * mb and default["mmapped_freed"] < 64 * mb
    assert default["heap_free_after"] < 64 * mb
    # keep: no mmap for it; the freed 64 MB stay in the heap for the next step's buffers
    assert keep["mmapped_alive"] < 64 * mb
    assert keep["heap_free_after"] >= 64 * mb
