"""Each training option, turned on, changes what the trainer does (issue 11).

Every test runs the real trainer in-process on a tiny hand-written cache (demo_tiny at 32 px,
a few steps) and asserts something that would not hold if the trainer silently ran with the
option off. Spies wrap the loop's methods (loop.Trainer); none replaces the behaviour under test.
"""

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ferflow import layout
from ferflow.config import load_params
from ferflow.models import zoo
from ferflow.models.preprocess import Preprocess
from ferflow.training import checkpoint as ckpt
from ferflow.training import loop, trainer

REPO = Path(__file__).resolve().parents[2]
SIZE = 32
TRAIN_COUNTS = (72, 18, 6)  # imbalanced on purpose: the balanced sampler must even it out
VAL_COUNTS = (4, 4, 4)
BATCH = 16
STEPS = 2  # optimizer steps per run unless a test says otherwise

BASE = [
    "train.models=[demo_tiny]", "train.datasets=[LFW-FER]", f"train.input_size={SIZE}", f"train.batch_size={BATCH}",
    # No head stage: one stage, all parameters, so step counts and final weights are simple to reason about.
    "train.head_stage.epochs=0", "train.full_stage.epochs=1", "train.full_stage.lr=0.01",
    f"train.max_steps_per_epoch={STEPS}", "train.workers=0", "train.threads=1", "train.device=cpu",
    "train.amp='off'", "train.early_stopping_patience=0",
    # Shared by every run, so that the optimizer tests see these values arrive and runs differ only by name.
    "train.optimizer.weight_decay=0.02", "train.optimizer.momentum=0.8",
    "tracking.enabled=false",
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepared_dir holding only LFW-FER's uint8 caches at SIZE: what the trainer reads."""
    root = tmp_path_factory.mktemp("options-prepared")
    cache = root / "LFW-FER" / "cache" / str(SIZE)
    cache.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, counts in (("train", TRAIN_COUNTS), ("val", VAL_COUNTS)):
        labels = np.repeat(np.arange(3), counts).astype(np.int64)
        images = rng.integers(0, 120, (len(labels), SIZE, SIZE, 3), dtype=np.uint8)
        images[np.arange(len(labels)), :, :, labels] += 120  # one bright channel per class: learnable
        np.save(cache / f"{split}.npy", images)
        np.save(cache / f"{split}.labels.npy", labels)
    return root


def train_run(prepared, out: Path, *extra):
    params = load_params(REPO / "params.yaml", BASE + [f"data.prepared_dir={prepared}", f"train.out_dir={out}", *extra])
    return trainer.train(params, "LFW-FER", "demo_tiny")


def final_weights(result) -> dict:
    return ckpt.load_last(result.run_dir / layout.LAST)["model"]


@functools.cache
def parameter_names() -> frozenset:
    return frozenset(n for n, _ in zoo.build_model(zoo.resolve("demo_tiny"), num_classes=3).named_parameters())


def differs(a: dict, b: dict) -> bool:
    """Learned parameters only: BN running statistics move with every training forward, so they
    would tell two runs apart even when their optimizer steps were identical."""
    return any(not torch.equal(a[k], b[k]) for k in parameter_names())


@pytest.fixture(scope="module")
def plain(prepared, tmp_path_factory):
    """Final weights of the default run (adamw, no SAM): what an ignored option would reproduce."""
    return final_weights(train_run(prepared, tmp_path_factory.mktemp("plain")))


def spy_steps(monkeypatch) -> dict:
    """Record, per epoch, the labels of every training step, and the model state before the
    first step and after each one (what EMA averages)."""
    seen = {"epochs": [], "initial": None, "states": []}
    real_epoch, real_step = loop.Trainer.train_epoch, loop.Trainer.train_step
    snapshot = lambda m: {k: v.detach().clone() for k, v in m.state_dict().items()}  # noqa: E731

    def epoch(self, *args, **kwargs):
        seen["epochs"].append([])
        return real_epoch(self, *args, **kwargs)

    def step(self, x, labels, *args, **kwargs):
        if seen["initial"] is None:
            seen["initial"] = snapshot(self.model)
        out = real_step(self, x, labels, *args, **kwargs)
        seen["epochs"][-1].append(labels.clone())
        seen["states"].append(snapshot(self.model))
        return out

    monkeypatch.setattr(loop.Trainer, "train_epoch", epoch)
    monkeypatch.setattr(loop.Trainer, "train_step", step)
    return seen


def spy_forwards(monkeypatch) -> list:
    """Output dtype of every training-mode forward of the model the trainer builds."""
    outputs = []
    real = zoo.build_model

    def build(*args, **kwargs):
        model = real(*args, **kwargs)
        model.register_forward_hook(lambda m, _inp, out: outputs.append(out.dtype) if m.training else None)
        return model

    monkeypatch.setattr(zoo, "build_model", build)
    return outputs


def spy_optimizer(monkeypatch) -> list:
    built = []
    real = loop.build_optimizer

    def build(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(loop, "build_optimizer", build)
    return built


# ---------------------------------------------------------------------------------- EMA


def test_ema_weights_are_the_ones_validated_and_saved(prepared, tmp_path, monkeypatch):
    decay = 0.5  # far from 1, so three steps leave the average well apart from the raw weights
    seen = spy_steps(monkeypatch)
    result = train_run(prepared, tmp_path, "train.ema.enabled=true", f"train.ema.decay={decay}",
                       "train.max_steps_per_epoch=3")
    assert len(seen["states"]) == 3
    expected = {k: v.clone() for k, v in seen["initial"].items()}
    for state in seen["states"]:
        for k, v in state.items():
            if v.is_floating_point():
                expected[k].mul_(decay).add_(v, alpha=1 - decay)
            else:  # step counters are copied, not averaged
                expected[k] = v.clone()
    best = ckpt.load_weights(result.run_dir / layout.WEIGHTS)  # epoch 1 is always the best of one
    raw = final_weights(result)
    assert set(best) == set(raw)
    assert differs(best, raw), "best.safetensors holds the raw weights: EMA ignored"
    for k in raw:
        torch.testing.assert_close(best[k], expected[k], rtol=1e-5, atol=1e-6, msg=k)

    # Validation ran on the averaged weights: recompute its loss from them, and from the raw ones.
    entry = zoo.resolve("demo_tiny")
    split = np.load(prepared / f"LFW-FER/cache/{SIZE}/val.npy")
    labels = torch.from_numpy(np.load(prepared / f"LFW-FER/cache/{SIZE}/val.labels.npy"))
    x = Preprocess.for_entry(entry).normalizer(torch.device("cpu"))(torch.from_numpy(split).permute(0, 3, 1, 2))

    def val_loss(state):
        model = zoo.build_model(entry, num_classes=3)
        model.load_state_dict(state)
        with torch.no_grad():
            return float(nn.functional.cross_entropy(model.eval()(x), labels))

    logged = result.history[-1]["val_loss"]
    assert logged == pytest.approx(val_loss(best), rel=1e-4)
    assert logged != pytest.approx(val_loss(raw), rel=1e-4)


# ---------------------------------------------------------------------------------- SAM


def test_sam_makes_two_passes_per_step_and_other_weights(prepared, tmp_path, monkeypatch, plain):
    forwards = spy_forwards(monkeypatch)
    seen = spy_steps(monkeypatch)
    result = train_run(prepared, tmp_path, "train.optimizer.sam=true", "train.optimizer.sam_rho=0.5")
    steps = len(seen["states"])
    assert steps == STEPS
    # One pass at w, one at the perturbed w + rho g/|g|.
    assert len(forwards) == 2 * steps
    # Two passes alone are not SAM (a base optimizer also calls the closure): the step must
    # use the gradient taken at the perturbed point.
    assert differs(final_weights(result), plain)


# ---------------------------------------------------------------------------------- sampler


def test_balanced_sampler_draws_classes_evenly_each_epoch(prepared, tmp_path, monkeypatch):
    seen = spy_steps(monkeypatch)
    train_run(prepared, tmp_path, "train.sampler=balanced", "train.max_steps_per_epoch=null", "train.full_stage.epochs=2")
    n = sum(TRAIN_COUNTS)
    assert len(seen["epochs"]) == 2
    for batches in seen["epochs"]:
        counts = np.bincount(torch.cat(batches).numpy(), minlength=3)
        assert counts.sum() == n  # n is a multiple of BATCH: whole epochs, nothing dropped
        # Shuffling would give 72/18/6; with replacement at p=1/3 each class gets 32 +- 4.6.
        assert all(n / 3 - 14 <= c <= n / 3 + 14 for c in counts), counts


# ---------------------------------------------------------------------------------- early stopping


def test_early_stopping_stops_after_patience_epochs_and_stays_stopped(prepared, tmp_path, monkeypatch):
    # A validation that never improves after epoch 1 makes the stopping epoch exact.
    monkeypatch.setattr(loop.Trainer, "validate",
                        lambda self: {"loss": 1.0, "accuracy": 0.5, "macro_f1": 0.5, "n": sum(VAL_COUNTS)})
    extra = ("train.early_stopping_patience=2", "train.head_stage.epochs=1", "train.full_stage.epochs=4",
             "train.max_steps_per_epoch=1")
    result = train_run(prepared, tmp_path, *extra)
    assert result.epochs_run == 3 and len(result.history) == 3  # of 5: best at 1, then 2 without improvement
    assert result.best_epoch == 1
    last = ckpt.load_last(result.run_dir / layout.LAST)
    assert last["stopped"] is True and last["stale"] == 2 and last["epoch"] == 3
    assert len(json.loads((result.run_dir / layout.HISTORY_JSON).read_text())) == 3
    assert json.loads((result.run_dir / layout.TRAIN_METRICS).read_text())["epochs_run"] == 3
    # The stop is part of the run's state: running again resumes into it and trains nothing.
    again = train_run(prepared, tmp_path, *extra)
    assert again.resumed_from_epoch == 3 and again.epochs_run == 3 and len(again.history) == 3


# ---------------------------------------------------------------------------------- torch.compile


def test_compile_runs_training_through_dynamo(prepared, tmp_path, monkeypatch):
    compiled, graph_calls = [], []
    real_compile = torch.compile

    def counting_backend(gm, example_inputs):
        def run(*args):
            graph_calls.append(gm)
            return gm.forward(*args)

        return run

    def compile_spy(model, *args, **kwargs):
        compiled.append(model)
        # Dynamo's real tracing, but graphs run eagerly: inductor's C++ build takes minutes on 2 cores.
        return real_compile(model, backend=counting_backend)

    monkeypatch.setattr(torch, "compile", compile_spy)
    torch._dynamo.reset()
    try:
        result = train_run(prepared, tmp_path, "train.compile=true")
    finally:
        torch._dynamo.reset()
    assert len(compiled) == 1
    # What was compiled is the model that trained, and every training forward went through dynamo's graphs.
    weights = final_weights(result)
    assert all(torch.equal(v, weights[k]) for k, v in compiled[0].state_dict().items())
    assert len(graph_calls) >= STEPS


# ---------------------------------------------------------------------------------- AMP


class _ScalerSpy(torch.amp.GradScaler):
    """The real GradScaler, recording how the trainer makes and uses it."""

    made: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = {"scale": [], "step": 0, "update": 0}
        _ScalerSpy.made.append(self)

    def scale(self, outputs):
        scaled = super().scale(outputs)
        self.calls["scale"].append(float(scaled.detach() / outputs.detach().float()))
        return scaled

    def step(self, *args, **kwargs):
        self.calls["step"] += 1
        return super().step(*args, **kwargs)

    def update(self, *args, **kwargs):
        self.calls["update"] += 1
        return super().update(*args, **kwargs)


# fp16: early steps overflow at the initial scale (65536) and are skipped, as GradScaler intends.
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")
@pytest.mark.parametrize("amp, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_amp_autocasts_the_forward_and_scales_fp16(prepared, tmp_path, monkeypatch, amp, dtype):
    forwards = spy_forwards(monkeypatch)
    monkeypatch.setattr(_ScalerSpy, "made", [])
    monkeypatch.setattr(torch.amp, "GradScaler", _ScalerSpy)
    result = train_run(prepared, tmp_path, f"train.amp={amp}")
    assert forwards == [dtype] * STEPS
    assert json.loads((result.run_dir / layout.RUN_JSON).read_text())["amp"] == str(dtype)
    [scaler] = _ScalerSpy.made
    if amp == "bf16":  # bf16 has fp32's range: nothing to scale
        assert not scaler.is_enabled()
        return
    # fp16 on this (CPU) run: the scaler works on the run's device, and every step goes through it.
    assert scaler.is_enabled()
    assert scaler.calls["scale"][0] == 2.0 ** 16  # the loss was multiplied by the initial scale
    assert len(scaler.calls["scale"]) == scaler.calls["step"] == scaler.calls["update"] == STEPS


# ---------------------------------------------------------------------------------- optimizers


@pytest.mark.parametrize("name, kind", [("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)])
def test_optimizer_choice_is_built_and_changes_training(prepared, tmp_path, monkeypatch, plain, name, kind):
    built = spy_optimizer(monkeypatch)
    result = train_run(prepared, tmp_path, f"train.optimizer.name={name}")
    [opt] = built
    assert type(opt) is kind  # exact: AdamW subclasses Adam
    groups = opt.param_groups
    assert {g["initial_lr"] for g in groups} == {0.01}  # full_stage.lr, no layer decay from scratch
    # Decay on weights (ndim > 1) only, at the configured rate.
    assert {g["weight_decay"] for g in groups if g["params"][0].ndim > 1} == {0.02}
    assert {g["weight_decay"] for g in groups if g["params"][0].ndim == 1} == {0.0}
    if name == "sgd":
        assert all(g["momentum"] == 0.8 and g["nesterov"] for g in groups)
    assert differs(final_weights(result), plain)
