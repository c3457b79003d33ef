"""Fine-tuning on generated data, CPU, tiny model: learning, determinism, resume, DDP."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ferflow import stages
from ferflow.config import AugmentSettings
from ferflow.models.preprocess import Normalize
from ferflow.training.augment import augment
from ferflow.training.losses import inverse_frequency_weights
from ferflow.training.checkpoint import load_weights
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

    # It did resume: last.pt (written after history.json, so at most one epoch behind it)
    # was restored, and only the epochs after it were trained again. Deterministic training
    # from scratch would give the same history, so equality alone proves nothing.
    assert read_json(tmp_path / "ref/LFW-FER/demo_tiny/run.json")["resumed_from_epoch"] == 0
    resumed_from = read_json(tmp_path / "cut/LFW-FER/demo_tiny/run.json")["resumed_from_epoch"]
    assert 2 <= resumed_from and killed_at - 1 <= resumed_from <= killed_at, (resumed_from, killed_at)
    assert f"after epoch {resumed_from}:" in resumed.stderr
    trained = [int(m) for m in re.findall(r"^epoch +(\d+) (?:head|full) ", resumed.stderr, re.MULTILINE)]
    assert trained == list(range(resumed_from + 1, 8)), resumed.stderr[-3000:]

    ref = read_json(tmp_path / "ref/LFW-FER/demo_tiny/history.json")
    cut = read_json(history)
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in h]  # noqa: E731
    assert strip(cut) == strip(ref)
    final = lambda d: {k: v for k, v in read_json(d / "LFW-FER/demo_tiny/train_metrics.json").items() if k != "train_images_per_s"}  # noqa: E731
    assert final(tmp_path / "cut") == final(tmp_path / "ref")


def test_ddp_on_gloo_with_two_processes(demo_workspace, tmp_path, monkeypatch):
    """2 gloo ranks x batch 16 under torchrun against 1 process x batch 32. Frozen BatchNorm
    ("pretrained" weights) and no augmentation, so one DDP step averages the same 32 per-image
    gradients as the single-process step. Each rank reports a digest of its final weights
    (FERFLOW_PARAMS_DIGEST_DIR): equal digests prove the gradients were synchronised, equal
    weights to the single run (float reordering aside) prove the global batch is right.
    Without the DistributedDataParallel wrap the digests differ and the weights move apart."""
    import timm
    from safetensors.torch import save_file

    from ferflow.training.checkpoint import load_last

    torch.manual_seed(0)
    weights = tmp_path / "start.safetensors"
    model = timm.create_model("test_efficientnet", num_classes=3, global_pool="avg")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    same = (f"models.demo_tiny.pretrained={weights}", "train.full_stage.epochs=1", "train.max_steps_per_epoch=8",
            "train.augment.hflip=false", "train.augment.rotate_deg=0", "train.augment.translate=0",
            "train.augment.scale=[1.0,1.0]", "train.augment.erasing_p=0")
    single = stages.train(load(demo_workspace, f"train.out_dir={tmp_path / 'one'}", *same), "LFW-FER", "demo_tiny")

    params_file = write_params(tmp_path / "ddp.yaml", demo_workspace, f"train.out_dir={tmp_path / 'ddp'}",
                               "train.batch_size=16", *same)
    # --standalone: torchrun's own agent binds a free port (port 0) for its rendezvous store and
    # the ranks reuse that store, so no port is picked and released in between; concurrent
    # test runs cannot collide (a fixed or pid-derived --master_port can).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "ferflow.cli", "train", "--dataset", "LFW-FER", "--model", "demo_tiny", "--params", str(params_file)]
    digests = tmp_path / "digests"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FERFLOW_PARAMS_DIGEST_DIR": str(digests)}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "ddp/LFW-FER/demo_tiny"
    info = read_json(run / "run.json")
    assert info["world_size"] == 2
    history = read_json(run / "history.json")
    assert [h["stage"] for h in history] == [h["stage"] for h in single.history] == ["head", "full"]
    # validation was reduced over both ranks: every val image counted exactly once
    assert history[-1]["val_n"] == info["n_val"] == single.best_metrics["val_n"]

    ranks = [read_json(digests / f"rank{r}.json") for r in (0, 1)]
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
    assert ranks[0]["sha256"] == ranks[1]["sha256"], "the ranks ended with different weights: no gradient sync"

    w1, w2 = load_last(single.run_dir / "last.pt")["model"], load_last(run / "last.pt")["model"]
    assert w1.keys() == w2.keys()
    start = {k: v for k, v in load_weights(weights).items()}
    diff = max(float((w1[k].double() - w2[k].double()).abs().max()) for k in w1 if w1[k].is_floating_point())
    moved = max(float((w1[k].double() - start[k].double()).abs().max()) for k in start if "classifier" not in k)
    assert diff < 1e-4 < moved, (diff, moved)  # the same weights, and not because nothing trained


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


def test_a_run_without_its_best_weights_is_trained_again_not_resumed(demo_workspace, tmp_path):
    """`dvc repro` deletes best.safetensors before rerunning train but keeps last.pt: resuming
    a finished run would then end with no best weights at all."""
    out = f"train.out_dir={tmp_path / 'm'}"
    first = stages.train(load(demo_workspace, out, "train.full_stage.epochs=1"), "LFW-FER", "demo_tiny")
    best = first.run_dir / "best.safetensors"
    expected = load_file(best)
    best.unlink()
    again = stages.train(load(demo_workspace, out, "train.full_stage.epochs=1"), "LFW-FER", "demo_tiny")
    assert again.resumed_from_epoch == 0 and again.epochs_run == 2
    got = load_file(best)  # deterministic: the same best weights as the first run
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


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


class _Hostile:
    def __init__(self, canary):
        self.canary = canary

    def __reduce__(self):
        return os.system, (f"touch {self.canary}",)


def test_unreadable_last_pt_is_one_line_naming_the_file(demo_workspace, tmp_path):
    """A corrupt, empty, hostile or foreign last.pt: `ferflow train` says which file and how
    to restart (move it away) in one line, no traceback, exit non-zero; nothing runs."""
    from ferflow.config import load_params
    from ferflow.training.trainer import recipe_hash

    params_file = write_params(tmp_path / "p.yaml", demo_workspace, f"train.out_dir={tmp_path / 'm'}")
    recipe = recipe_hash(load_params(params_file), "LFW-FER", "demo_tiny")
    last = tmp_path / "m/LFW-FER/demo_tiny/last.pt"
    last.parent.mkdir(parents=True)
    canary = tmp_path / "canary"
    cases = {
        "garbage": lambda: last.write_bytes(os.urandom(4096)),
        "empty": lambda: last.write_bytes(b""),
        "truncated": lambda: (torch.save({"epoch": 1, "model": {"w": torch.zeros(1000)}}, last),
                              last.write_bytes(last.read_bytes()[:700])),
        "hostile": lambda: torch.save({"epoch": 1, "recipe": recipe, "hook": _Hostile(canary)}, last),
        "not_a_dict": lambda: torch.save([1, 2, 3], last),
        "same_recipe_missing_keys": lambda: torch.save({"epoch": 1, "recipe": recipe}, last),
        "same_recipe_other_model": lambda: torch.save(
            {"epoch": 1, "recipe": recipe, "model": {"w": torch.zeros(1)}, "optimizer": {}, "scheduler": {},
             "scaler": {}, "rng": {}, "criterion": {}}, last),
    }
    for name, write in cases.items():
        write()
        done = subprocess.run(_train_cmd(params_file), capture_output=True, text=True, timeout=600)
        lines = done.stderr.strip().splitlines()
        assert done.returncode != 0, (name, done.stderr[-2000:])
        assert "Traceback" not in done.stderr and len(lines) == 1, (name, done.stderr[-3000:])
        assert str(last) in lines[0] and "move it away" in lines[0], (name, lines)
        assert "weights_only=False" not in lines[0], (name, lines)
        assert not canary.exists()
        assert not (last.parent / "history.json").exists(), name  # refused before training


def test_a_diverging_run_stops_naming_the_epoch_and_saves_nothing_non_finite(demo_workspace, tmp_path):
    """lr 1e30 (finite, so params accept it) blows the weights up to inf in the full stage:
    the run stops with an error naming the epoch and stage; best.safetensors and last.pt
    hold the last finite epoch, never the diverged one."""
    from ferflow.errors import FerflowError
    from ferflow.training.checkpoint import load_last, load_weights

    params = load(demo_workspace, f"train.out_dir={tmp_path / 'm'}", "train.full_stage.lr=1e30",
                  "train.grad_clip=0", "train.max_steps_per_epoch=4")
    with pytest.raises(FerflowError, match=r"diverged in epoch 2 \(full stage\).*train\.full_stage\.lr"):
        stages.train(params, "LFW-FER", "demo_tiny")
    run = tmp_path / "m/LFW-FER/demo_tiny"
    history = read_json(run / "history.json")
    assert [h["epoch"] for h in history] == [1]  # the head epoch; the diverged one is not recorded
    last = load_last(run / "last.pt")
    assert last["epoch"] == 1
    for weights in (load_weights(run / "best.safetensors"), last["model"]):
        assert all(bool(torch.isfinite(t).all()) for t in weights.values() if t.is_floating_point())


def test_pretrained_far_bigger_than_the_model_is_refused_unread(demo_workspace, tmp_path, monkeypatch):
    """models.<name>.pretrained pointing at a 256 MiB checkpoint (a sparse file, so the test
    stays cheap) for demo_tiny (0.4 MiB of weights): refused against the model's size before
    a tensor is read, and nothing lands in the weights cache."""
    import importlib.util

    from ferflow.errors import FerflowError

    spec = importlib.util.spec_from_file_location("bombs", Path(__file__).parents[1] / "models/bombs.py")
    bombs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bombs)
    monkeypatch.setenv("FERFLOW_CACHE", str(tmp_path / "cache"))
    bomb = bombs.write_sparse(tmp_path / "huge.pt", 256 << 20)
    params = load(demo_workspace, f"train.out_dir={tmp_path / 'm'}", f"models.demo_tiny.pretrained={bomb}")
    with pytest.raises(FerflowError, match=r"refusing to load .*huge\.pt.*256\.0 MiB.*model demo_tiny"):
        stages.train(params, "LFW-FER", "demo_tiny")
    assert not list((tmp_path / "cache").rglob("*.safetensors"))
    assert not (tmp_path / "m/LFW-FER/demo_tiny/history.json").exists()
