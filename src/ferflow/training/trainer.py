"""Fine-tune one zoo model on one prepared dataset: two stages (head, then all layers),
checkpoint every epoch, resume after a crash, keep the best weights by validation metric.

Run directory (`train.out_dir/<dataset>/<model>/`):
    best.safetensors   weights of the best validation epoch (3-class head)
    last.pt            full training state after the last finished epoch (resume)
    history.json/.csv  one record per epoch
    train_metrics.json best validation metrics (a DVC metrics file)
    run.json           what was trained: model entry, input size, weights digest, params
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ferflow import __version__
from ferflow.config import Params, TrainSettings, dump_params
from ferflow.data.cache import CachedSplit
from ferflow.data.loader import CacheLoader, EpochBatchSampler
from ferflow.data.masks import mask_batch
from ferflow.errors import FerflowError
from ferflow.labels import CLASSES, source_mapping
from ferflow.redact import redact_tree
from ferflow.training import checkpoint as ckpt
from ferflow.models.inference import forward
from ferflow.models.preprocess import Preprocess
from ferflow.training.augment import augment
from ferflow.training.losses import build_criterion, class_weights
from ferflow.training.optim import build_optimizer, cosine_with_warmup, layer_decay_groups
from ferflow.training.runtime import Runtime, setup_runtime

log = logging.getLogger(__name__)
RUN_JSON = ckpt.RUN_JSON
TRAIN_METRICS = "train_metrics.json"


class TrainCallback(Protocol):
    """What tracking (MLflow) implements; training itself knows nothing of it."""

    def on_train_start(self, info: dict) -> None: ...
    def on_epoch_end(self, record: dict) -> None: ...
    def on_train_end(self, result: "TrainResult") -> None: ...


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    best_metrics: dict
    epochs_run: int
    history: list[dict] = field(default_factory=list)
    resumed_from_epoch: int = 0


# Keys of `train` that change how fast a run goes but not what it computes: left out of the
# recipe hash (a resume continues across them) and of the train stage's `params:` in dvc.yaml
# (a test holds the two equal).
NOT_RECIPE_KEYS = ("out_dir", "workers", "threads", "datasets", "models", "cpu_keep_freed_memory")


def recipe_hash(params: Params, dataset: str, model_name: str) -> str:
    """Identifies what a run computes: a resume only continues a run with the same hash."""
    train = {k: v for k, v in params.require_train().model_dump(mode="json").items() if k not in NOT_RECIPE_KEYS}
    blob = {"seed": params.seed, "dataset": dataset, "model": model_name, "train": train,
            "weights": params.weights_for(model_name).model_dump(mode="json"),
            "archive_sha256": params.data.content_sha256(dataset)}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def run_dir_for(params: Params, dataset: str, model_name: str) -> Path:
    return params.require_train().out_dir / dataset / model_name


def train(
    params: Params,
    dataset: str,
    model_name: str,
    run_dir: Optional[Path] = None,
    callbacks: Sequence[TrainCallback] = (),
) -> TrainResult:
    from ferflow.models import zoo
    from ferflow.models.weights import pretrained_for

    cfg = params.require_train()
    params.data.check_dataset(dataset)  # a clear error for an unknown dataset name
    entry = zoo.resolve(model_name)
    size = zoo.input_size(model_name, cfg.input_size)
    run_dir = Path(run_dir or run_dir_for(params, dataset, model_name))
    data_dir = params.data.prepared_dir / dataset
    rt = setup_runtime(cfg, params.seed)
    try:
        train_split = CachedSplit(data_dir, "train", size)
        val_split = _validation_split(data_dir, size)
        weights_cfg = params.weights_for(model_name)
        pretrained = pretrained_for(entry, weights_cfg.pretrained, weights_cfg.sha256, params.fetch)
        mappable = pretrained is not None and zoo.can_map_head(entry)
        head_init = "mapped" if cfg.head_init == "mapped" and mappable else "random"
        if head_init == "mapped":
            model = zoo.build_model(entry, pretrained=pretrained)
            zoo.swap_head(model, entry, len(CLASSES), source_mapping(entry.classes, params.evaluate.surprise))
        else:
            if cfg.head_init == "mapped" and entry.classes:
                log.info("%s: no pretrained weights, so the 3-class head starts random", model_name)
            model = zoo.build_model(entry, num_classes=len(CLASSES), pretrained=pretrained)
        recipe = recipe_hash(params, dataset, model_name)
        # A mapped head already predicts: its step-0 validation is the first best checkpoint,
        # so a run never ends with weights worse on val than where it started.
        loop = _Loop(cfg, params.seed, entry, model, train_split, val_split, rt, recipe,
                     pretrained=pretrained is not None, validate_start=head_init == "mapped")
        resumed_from = loop.resume(run_dir)
        info = {
            "recipe_hash": recipe,
            "dataset": dataset, "model": model_name, "arch": entry.arch, "input_size": size,
            "weights_source": pretrained.source if pretrained else "none",
            "weights_sha256": pretrained.sha256 if pretrained else None,
            "head_init": head_init, "batchnorm": cfg.batchnorm,
            "device": str(rt.device), "amp": str(rt.amp_dtype), "world_size": rt.world_size,
            "n_train": len(train_split), "n_val": len(val_split), "val_split": val_split.split,
            "ferflow_version": __version__, "run_dir": str(run_dir),
            # Epochs restored from last.pt and not trained again (0: a fresh start).
            "resumed_from_epoch": resumed_from,
        }
        if rt.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            # What serving must do to an image to give it what training saw (models.inference).
            preprocess = Preprocess.for_training(entry, size, params.prepare).as_record()
            ckpt.atomic_write_json(run_dir / RUN_JSON, {**info, "params": redact_tree(dump_params(params)), "classes": list(CLASSES),
                                                        "preprocess": preprocess})
        for cb in callbacks:
            cb.on_train_start(info)
        result = loop.run(run_dir, callbacks)
        for cb in callbacks:
            cb.on_train_end(result)
        return result
    finally:
        rt.close()


def _validation_split(data_dir: Path, size: int) -> CachedSplit:
    try:
        return CachedSplit(data_dir, "val", size)
    except FerflowError:
        log.warning("%s has no val split; selecting the best epoch on eval (set prepare.split.val_fraction)", data_dir)
        return CachedSplit(data_dir, "eval", size)


class _Loop:
    def __init__(self, cfg: TrainSettings, seed: int, entry, model: nn.Module, train_split, val_split, rt: Runtime,
                 recipe: str, pretrained: bool, validate_start: bool):
        from ferflow.models import zoo

        self.cfg, self.seed, self.entry, self.rt = cfg, seed, entry, rt
        self.recipe = recipe
        # Pretrained BN statistics are worth keeping while only the head learns; random
        # ones are not (the head would fit features that change once BN runs in train mode).
        self.pretrained, self.validate_start = pretrained, validate_start
        self.train_split, self.val_split = train_split, val_split
        self.head_params_list = zoo.head_parameters(model, entry)
        self.head_params = {id(p) for p in self.head_params_list}
        model = model.to(rt.device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.net = model
        if rt.world_size > 1:
            ids = [rt.device.index] if rt.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)
        if cfg.compile:
            self.net = torch.compile(self.net)
        self.normalize = Preprocess.for_entry(entry).normalizer(rt.device)  # validation = inference's
        self.criterion = self._criterion().to(rt.device)
        self.ema = None
        if cfg.ema.enabled:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(model, decay=cfg.ema.decay)
        weights = None
        if cfg.sampler == "balanced":
            counts = np.bincount(train_split.labels, minlength=len(CLASSES)).astype(np.float64)
            weights = 1.0 / np.maximum(counts, 1)[train_split.labels]
        drop_last = len(train_split) > cfg.batch_size * rt.world_size
        self.train_sampler = EpochBatchSampler(
            len(train_split), cfg.batch_size, True, seed, drop_last, rt.rank, rt.world_size, weights=weights
        )
        self.train_loader = CacheLoader(train_split, self.train_sampler, cfg.workers, rt.device.type == "cuda")
        val_sampler = EpochBatchSampler(len(val_split), cfg.batch_size * 2, False, seed, False, rt.rank, rt.world_size, pad=False)
        self.val_loader = CacheLoader(val_split, val_sampler, cfg.workers, rt.device.type == "cuda")
        self.stages = [("head", cfg.head_stage), ("full", cfg.full_stage)]
        self._state: Optional[dict] = None  # last.pt's, once resume() has run

    def _criterion(self) -> nn.Module:
        if self.entry.head == "dan":
            from ferflow.models.dan import DANLoss

            return DANLoss(len(CLASSES), label_smoothing=self.cfg.loss.label_smoothing,
                           class_weights=class_weights(self.cfg.loss, self.train_split.labels, len(CLASSES)))
        return build_criterion(self.cfg.loss, self.train_split.labels, len(CLASSES))

    def _loss(self, out, labels):
        if self.entry.head == "dan":
            return self.criterion(out, labels)[0]
        return self.criterion(out, labels)

    # ------------------------------------------------------------------ stages

    def _prepare_stage(self, name: str, stage) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        for p in self.model.parameters():
            p.requires_grad_(name == "full" or id(p) in self.head_params)
        # Discriminative rates protect pretrained features; a model trained from scratch has none.
        decay = self.cfg.layer_decay if name == "full" and self.pretrained else 1.0
        groups = layer_decay_groups(self.model, self.head_params_list, decay)
        # DAN's class centres live in its loss and are learned in both stages, at the head's lr.
        groups.append({"params": [p for p in self.criterion.parameters() if p.requires_grad], "lr_scale": 1.0,
                       "decay": False})
        opt = build_optimizer(groups, self.cfg.optimizer, stage.lr)
        steps = stage.epochs * self._steps_per_epoch()
        if self.cfg.schedule == "constant":
            factor = lambda _step: 1.0  # noqa: E731
        else:
            factor = cosine_with_warmup(steps, self.cfg.warmup_fraction, self.cfg.min_lr_ratio)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)

    def _steps_per_epoch(self) -> int:
        n = len(self.train_sampler)
        return min(n, self.cfg.max_steps_per_epoch) if self.cfg.max_steps_per_epoch else n

    def resume(self, run_dir: Path) -> int:
        """Restore last.pt of the same recipe, if any; the epoch training continues after."""
        self._state = self._resume(run_dir)
        return int(self._state.get("epoch", 0))

    def run(self, run_dir: Path, callbacks: Sequence[TrainCallback]) -> TrainResult:
        state = self._state if self._state is not None else self._resume(run_dir)
        history: list[dict] = state.get("history", [])
        best = state.get("best", {"metric": -1.0, "epoch": 0, "metrics": {}})
        stale = state.get("stale", 0)
        epoch = state.get("epoch", 0)
        resumed_from = epoch
        stopped = state.get("stopped", False)
        # On the run's device: a "cuda" scaler disables itself without CUDA (fp16 on CPU/MPS ran unscaled).
        scaler = torch.amp.GradScaler(self.rt.device.type, enabled=self.rt.amp_dtype == torch.float16)
        if self.validate_start and not history:
            record = self._start_record()
            history.append(record)
            best = {"metric": record[f"val_{self.cfg.monitor}"], "epoch": 0,
                    "metrics": {k: v for k, v in record.items() if k.startswith("val_")}}
            if self.rt.is_main:
                self._save_best(run_dir, 0)
                ckpt.write_history(run_dir, history)
            for cb in callbacks:
                cb.on_epoch_end(record)
        first = 0
        for stage_idx, (name, stage) in enumerate(self.stages):
            done_in_stage = max(0, min(stage.epochs, epoch - first))
            if stopped or stage.epochs == 0 or done_in_stage == stage.epochs:
                first += stage.epochs
                continue
            opt, sched = self._prepare_stage(name, stage)
            if done_in_stage:  # resuming inside this stage
                try:
                    opt.load_state_dict(state["optimizer"])
                    sched.load_state_dict(state["scheduler"])
                    scaler.load_state_dict(state["scaler"])
                except _STATE_ERRORS as exc:
                    raise ckpt.unusable_last(run_dir / ckpt.LAST, _does_not_fit(exc)) from exc
            for _ in range(done_in_stage, stage.epochs):
                epoch += 1
                record = self._epoch(epoch, name, opt, sched, scaler)
                self._check_finite(record, stage)  # before anything of this epoch is saved
                history.append(record)
                improved = record[f"val_{self.cfg.monitor}"] > best["metric"]
                if improved:
                    best = {"metric": record[f"val_{self.cfg.monitor}"], "epoch": epoch,
                            "metrics": {k: v for k, v in record.items() if k.startswith("val_")}}
                    stale = 0
                    if self.rt.is_main:
                        self._save_best(run_dir, epoch)
                else:
                    stale += 1
                patience = self.cfg.early_stopping_patience
                stopped = bool(patience and stale >= patience)
                if self.rt.is_main:
                    ckpt.write_history(run_dir, history)
                    ckpt.save_last(run_dir / ckpt.LAST, {
                        "epoch": epoch, "model": self.model.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                        "ema": self.ema.state_dict() if self.ema else None, "rng": ckpt.rng_state(),
                        "criterion": self.criterion.state_dict(), "recipe": self.recipe,
                        "history": history, "best": best, "stale": stale, "stopped": stopped,
                    })
                for cb in callbacks:
                    cb.on_epoch_end(record)
                if stopped:
                    log.info("early stopping after epoch %d (%d epochs without improvement)", epoch, stale)
                    break
            first += stage.epochs
        result = TrainResult(run_dir, best["epoch"], best["metrics"], epoch, history, resumed_from)
        self._write_params_digest()
        if self.rt.is_main:
            speeds = [h["images_per_s"] for h in history if h["images_per_s"]]  # epoch 0 trains nothing
            ckpt.atomic_write_json(run_dir / TRAIN_METRICS, {
                "best_epoch": best["epoch"], "epochs_run": epoch, **best["metrics"],
                "train_images_per_s": float(np.mean(speeds)) if speeds else 0.0,
            })
        return result

    def _resume(self, run_dir: Path) -> dict:
        path = run_dir / ckpt.LAST
        if not path.is_file():
            return {}
        state = ckpt.load_last(path)  # FerflowError naming the file when it is not ours or broken
        if state.get("recipe") != self.recipe:
            log.warning("%s was written with other params (recipe %s, now %s); training from the start",
                        path, state.get("recipe"), self.recipe)
            return {}
        epoch = state["epoch"]
        if type(epoch) is not int or epoch < 0:
            raise ckpt.unusable_last(path, f"its epoch is {epoch!r}")
        try:
            self.model.load_state_dict(state["model"])
            self.criterion.load_state_dict(state["criterion"])
            if self.ema is not None and state.get("ema") is not None:
                self.ema.load_state_dict(state["ema"])
            ckpt.set_rng_state(state["rng"])
        except _STATE_ERRORS as exc:
            raise ckpt.unusable_last(path, _does_not_fit(exc)) from exc
        if self.rt.is_main:  # logging is quiet by default; a resume must be visible
            print(f"resuming {run_dir} after epoch {epoch}: epochs 1-{epoch} are restored from {ckpt.LAST}, "
                  "not trained again", file=sys.stderr, flush=True)
        return state

    def _check_finite(self, record: dict, stage) -> None:
        """Stop a diverged run before its epoch is saved: a nan/inf loss or weight must never
        become best.safetensors (and from there a registered model) or a resume point."""
        name, epoch = record["stage"], record["epoch"]
        bad = [k for k in ("train_loss", "val_loss") if not math.isfinite(record[k])]
        params = [n for n, p in self.model.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad or params:
            what = ", ".join(f"{k} {record[k]}" for k in bad) or f"non-finite weights ({params[0]}, ...)"
            raise FerflowError(
                f"training diverged in epoch {epoch} ({name} stage): {what}; nothing of this epoch was saved. "
                f"Lower train.{name}_stage.lr (now {stage.lr:g}) or set train.grad_clip (now {self.cfg.grad_clip:g})")

    def _write_params_digest(self) -> None:
        """Test hook (FERFLOW_PARAMS_DIGEST_DIR): each rank writes a digest of its final
        parameters, so a test can prove the ranks ended equal (gradients were synchronised)."""
        out = os.environ.get("FERFLOW_PARAMS_DIGEST_DIR")
        if not out:
            return
        digest = hashlib.sha256()
        for name, p in self.model.named_parameters():
            digest.update(name.encode())
            digest.update(p.detach().cpu().contiguous().numpy().tobytes())
        Path(out).mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_json(Path(out) / f"rank{self.rt.rank}.json",
                               {"rank": self.rt.rank, "world_size": self.rt.world_size, "sha256": digest.hexdigest()})

    def _save_best(self, run_dir: Path, epoch: int) -> None:
        source = self.ema.module if self.ema is not None else self.model
        meta = {"epoch": str(epoch), "model": self.entry.name, "classes": ",".join(CLASSES), "format": "ferflow-3class"}
        ckpt.save_weights(run_dir / ckpt.BEST, source.state_dict(), meta)

    def _start_record(self) -> dict:
        """Epoch 0: the pretrained model with its mapped head, before any update."""
        val = self._validate()
        if self.rt.is_main:
            print(f"epoch   0 start | val loss {val['loss']:.4f} acc {val['accuracy']:.3f} f1 {val['macro_f1']:.3f}",
                  file=sys.stderr, flush=True)
        return {"epoch": 0, "stage": "start", "lr": 0.0, "train_loss": None, "train_accuracy": None,
                **{f"val_{k}": v for k, v in val.items()}, "images_per_s": None, "seconds": 0.0}

    # ------------------------------------------------------------------ one epoch

    def _epoch(self, epoch: int, stage: str, opt, sched, scaler) -> dict:
        self.train_loader.set_epoch(epoch)
        self.net.train()
        # Random-init statistics mean nothing: `batchnorm: frozen` applies to pretrained models.
        if self.pretrained and (self.cfg.batchnorm == "frozen" or stage == "head"):
            _freeze_batchnorm(self.model)
        total_loss, correct, seen = 0.0, 0, 0
        steps = self._steps_per_epoch()
        progress = _Progress(f"epoch {epoch} ({stage})", steps, enabled=self.rt.is_main)
        start = time.perf_counter()
        for step, (images, labels) in enumerate(self.train_loader):
            if step >= steps:
                break
            images = images.to(self.rt.device, non_blocking=True)
            labels = labels.to(self.rt.device, non_blocking=True)
            if self.cfg.augment.synthetic_mask_p > 0:  # drawn in pixel space, before normalising
                images = mask_batch(images.float(), self.cfg.augment.synthetic_mask_p, self.cfg.augment.mask_face_box)
            x = self.normalize(images)
            x = augment(x, self.cfg.augment)
            if self.cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            loss, logits = self._step(x, labels, opt, scaler)
            sched.step()
            if self.ema is not None:
                self.ema.update(self.model)
            total_loss += loss * len(labels)
            correct += int((logits.argmax(1) == labels).sum())
            seen += len(labels)
            progress.update(loss=loss, acc=correct / seen, ips=seen * self.rt.world_size / (time.perf_counter() - start))
        seconds = time.perf_counter() - start
        progress.close()
        val = self._validate()
        record = {
            "epoch": epoch, "stage": stage, "lr": opt.param_groups[0]["lr"],
            "train_loss": total_loss / max(seen, 1), "train_accuracy": correct / max(seen, 1),
            **{f"val_{k}": v for k, v in val.items()},
            "images_per_s": seen * self.rt.world_size / seconds if seconds > 0 else 0.0,
            "seconds": seconds,
        }
        if self.rt.is_main:
            print(
                f"epoch {epoch:>3} {stage:<4} loss {record['train_loss']:.4f} acc {record['train_accuracy']:.3f} "
                f"| val loss {val['loss']:.4f} acc {val['accuracy']:.3f} f1 {val['macro_f1']:.3f} "
                f"| {record['images_per_s']:.0f} img/s",
                file=sys.stderr, flush=True,
            )
        return record

    def _step(self, x, labels, opt, scaler) -> tuple[float, torch.Tensor]:
        def forward_backward():
            with torch.autocast(self.rt.device.type, dtype=self.rt.amp_dtype, enabled=self.rt.amp_dtype is not None):
                logits, out = forward(self.net, x)
                loss = self._loss(out, labels)
            scaler.scale(loss).backward()
            if self.cfg.grad_clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.cfg.grad_clip)
            return loss, logits

        opt.zero_grad(set_to_none=True)
        loss, logits = forward_backward()
        if self.cfg.optimizer.sam:
            def closure():
                opt.zero_grad(set_to_none=True)
                return forward_backward()[0]

            opt.step(closure)
        else:
            scaler.step(opt)
            scaler.update()
        return float(loss.detach()), logits.detach()

    @torch.no_grad()
    def _validate(self) -> dict:
        model = self.ema.module if self.ema is not None else self.model
        model.eval()
        k = len(CLASSES)
        cm = torch.zeros(k, k, dtype=torch.float64, device=self.rt.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.rt.device)
        ce = nn.CrossEntropyLoss(reduction="sum")
        for images, labels in self.val_loader:
            images = images.to(self.rt.device, non_blocking=True)
            labels = labels.to(self.rt.device, non_blocking=True)
            x = self.normalize(images)
            with torch.autocast(self.rt.device.type, dtype=self.rt.amp_dtype, enabled=self.rt.amp_dtype is not None):
                logits, _ = forward(model, x)
            loss_sum += ce(logits.float(), labels)
            cm += torch.bincount(labels * k + logits.argmax(1), minlength=k * k).view(k, k)
        if self.rt.world_size > 1:  # exact: each rank saw a disjoint shard
            dist.all_reduce(cm)
            dist.all_reduce(loss_sum)
        return _metrics_from_confusion(cm.cpu().numpy(), float(loss_sum))


# What loading a state of the wrong shape, type or structure raises (torch and our own code).
_STATE_ERRORS = (RuntimeError, TypeError, ValueError, KeyError, IndexError, AttributeError)


def _does_not_fit(exc: BaseException) -> str:
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"its saved state does not fit this run ({type(exc).__name__}: {first[:160]})"


def _metrics_from_confusion(cm: np.ndarray, loss_sum: float) -> dict:
    n = cm.sum()
    tp = np.diag(cm)
    precision = np.divide(tp, cm.sum(0), out=np.zeros_like(tp), where=cm.sum(0) > 0)
    recall = np.divide(tp, cm.sum(1), out=np.zeros_like(tp), where=cm.sum(1) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0)
    # Plain Python numbers: records go into JSON and into the weights-only resume file.
    return {"loss": float(loss_sum / max(n, 1)), "accuracy": float(tp.sum() / max(n, 1)),
            "macro_f1": float(f1.mean()), "n": int(n)}


def _freeze_batchnorm(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


class _Progress:
    """A rich progress bar on a terminal; silent otherwise (epoch lines are printed anyway)."""

    def __init__(self, title: str, total: int, enabled: bool):
        self.bar = None
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn(title), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                                TimeRemainingColumn(), transient=True)
            self.bar.start()
            self.task = self.bar.add_task(title, total=total, info="")

    def update(self, loss: float, acc: float, ips: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1, info=f"loss {loss:.3f} acc {acc:.3f} {ips:.0f} img/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
