"""The training loop of one run: two stages (head, then all layers), an epoch = steps then
validation, the per-epoch files (history, last.pt, best weights), resume and early stopping.
What the run is (model, data, run.json, train_metrics.json) is ferflow.training.trainer's.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ferflow import fileio, layout
from ferflow.config import TrainSettings
from ferflow.data.cache import CachedSplit
from ferflow.data.loader import CacheLoader, EpochBatchSampler
from ferflow.data.masks import mask_batch
from ferflow.errors import FerflowError
from ferflow.labels import CLASSES
from ferflow.models.inference import forward
from ferflow.models.preprocess import Preprocess
from ferflow.models.weights import tensors_sha256
from ferflow.training import checkpoint as ckpt
from ferflow.training.augment import augment
from ferflow.training.callbacks import CallbackList
from ferflow.training.losses import build_criterion, loss_function
from ferflow.training.optim import build_optimizer, build_scheduler, layer_decay_groups
from ferflow.training.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    best_metrics: dict
    epochs_run: int
    history: list[dict] = field(default_factory=list)
    resumed_from_epoch: int = 0


class Trainer:
    """Trains `model` in `run_dir`, continuing its last.pt when that has the same `recipe`.

    Everything is set up here, the resume included (`resumed_from_epoch`); `run` trains.
    """

    def __init__(self, cfg: TrainSettings, seed: int, entry, model: nn.Module, train_split: CachedSplit,
                 val_split: CachedSplit, rt: Runtime, recipe: str, run_dir: Path, *, pretrained: bool,
                 validate_start: bool):
        from ferflow.models import zoo

        self.cfg, self.seed, self.entry, self.rt = cfg, seed, entry, rt
        self.recipe, self.run_dir = recipe, Path(run_dir)
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
        # The model's own objective where it has one (DAN), else cross-entropy on its logits.
        self.criterion = build_criterion(model, cfg.loss, train_split.labels, len(CLASSES)).to(rt.device)
        self.loss_fn = loss_function(model)
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
        # Last, once model, criterion and EMA exist: they (and the RNG) take last.pt's state.
        self.resume_state = self._resume()  # {} for a fresh start
        self.resumed_from_epoch = int(self.resume_state.get("epoch", 0))

    # ------------------------------------------------------------------ stages

    def _prepare_stage(self, name: str, stage) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        for p in self.model.parameters():
            p.requires_grad_(name == "full" or id(p) in self.head_params)
        # Discriminative rates protect pretrained features; a model trained from scratch has none.
        decay = self.cfg.layer_decay if name == "full" and self.pretrained else 1.0
        groups = layer_decay_groups(self.model, self.head_params_list, decay)
        # A model's own criterion may learn too (DAN's class centres): in both stages, at the head's lr.
        groups.append({"params": [p for p in self.criterion.parameters() if p.requires_grad], "lr_scale": 1.0,
                       "decay": False})
        opt = build_optimizer(groups, self.cfg.optimizer, stage.lr)
        return opt, build_scheduler(opt, self.cfg, stage.epochs * self._steps_per_epoch())

    def _steps_per_epoch(self) -> int:
        n = len(self.train_sampler)
        return min(n, self.cfg.max_steps_per_epoch) if self.cfg.max_steps_per_epoch else n

    def run(self, callbacks: CallbackList) -> TrainResult:
        state, run_dir = self.resume_state, self.run_dir
        history: list[dict] = state.get("history", [])
        best = state.get("best", {"metric": -1.0, "epoch": 0, "metrics": {}})
        stale = state.get("stale", 0)
        epoch = state.get("epoch", 0)
        stopped = state.get("stopped", False)
        # On the run's device: a "cuda" scaler disables itself without CUDA (fp16 on CPU/MPS ran unscaled).
        scaler = torch.amp.GradScaler(self.rt.device.type, enabled=self.rt.amp_dtype == torch.float16)
        if self.validate_start and not history:
            record = self._start_record()
            callbacks.on_validation_end(record)
            history.append(record)
            best = {"metric": record[f"val_{self.cfg.monitor}"], "epoch": 0,
                    "metrics": {k: v for k, v in record.items() if k.startswith("val_")}}
            if self.rt.is_main:
                self._save_best(0)
                ckpt.write_history(run_dir, history)
            callbacks.on_epoch_end(record)
        first = 0
        for name, stage in self.stages:
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
                    raise ckpt.unusable_last(run_dir / layout.LAST, _does_not_fit(exc)) from exc
            for _ in range(done_in_stage, stage.epochs):
                epoch += 1
                record = self.train_epoch(epoch, name, opt, sched, scaler, callbacks)
                callbacks.on_validation_end(record)
                self._check_finite(record, stage)  # before anything of this epoch is saved
                history.append(record)
                improved = record[f"val_{self.cfg.monitor}"] > best["metric"]
                if improved:
                    best = {"metric": record[f"val_{self.cfg.monitor}"], "epoch": epoch,
                            "metrics": {k: v for k, v in record.items() if k.startswith("val_")}}
                    stale = 0
                    if self.rt.is_main:
                        self._save_best(epoch)
                else:
                    stale += 1
                patience = self.cfg.early_stopping_patience
                stopped = bool(patience and stale >= patience)
                if self.rt.is_main:
                    ckpt.write_history(run_dir, history)
                    ckpt.save_last(run_dir / layout.LAST, {
                        "epoch": epoch, "model": self.model.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                        "ema": self.ema.state_dict() if self.ema else None, "rng": ckpt.rng_state(),
                        "criterion": self.criterion.state_dict(), "recipe": self.recipe,
                        "history": history, "best": best, "stale": stale, "stopped": stopped,
                    })
                callbacks.on_epoch_end(record)
                if stopped:
                    log.info("early stopping after epoch %d (%d epochs without improvement)", epoch, stale)
                    break
            first += stage.epochs
        if self.rt.is_main and history:  # also after a resume with nothing left: DVC removed the file
            ckpt.write_history(run_dir, history)
        result = TrainResult(run_dir, best["epoch"], best["metrics"], epoch, history, self.resumed_from_epoch)
        self._write_params_digest()
        return result

    def _resume(self) -> dict:
        path = self.run_dir / layout.LAST
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
        if (state.get("best") or {}).get("metric", -1.0) > -1.0 and not (self.run_dir / layout.WEIGHTS).is_file():
            # The best epoch's weights are only in best.safetensors (DVC removes a stage's
            # outputs before it reruns it): resuming would end without them.
            log.warning("%s: %s is missing, so the run cannot be resumed; training from the start",
                        path, layout.WEIGHTS)
            return {}
        try:
            self.model.load_state_dict(state["model"])
            self.criterion.load_state_dict(state["criterion"])
            if self.ema is not None and state.get("ema") is not None:
                self.ema.load_state_dict(state["ema"])
            ckpt.set_rng_state(state["rng"])
        except _STATE_ERRORS as exc:
            raise ckpt.unusable_last(path, _does_not_fit(exc)) from exc
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
        # Parameters only: BatchNorm's running stats are updated locally after DDP's broadcast.
        digest = tensors_sha256(self.model.named_parameters())
        fileio.atomic_write_json(Path(out) / f"rank{self.rt.rank}.json",
                                 {"rank": self.rt.rank, "world_size": self.rt.world_size, "sha256": digest})

    def _save_best(self, epoch: int) -> None:
        source = self.ema.module if self.ema is not None else self.model
        meta = {"epoch": str(epoch), "model": self.entry.name, "classes": ",".join(CLASSES), "format": "ferflow-3class"}
        ckpt.save_weights(self.run_dir / layout.WEIGHTS, source.state_dict(), meta)

    def _start_record(self) -> dict:
        """Epoch 0: the pretrained model with its mapped head, before any update."""
        val = self.validate()
        return {"epoch": 0, "stage": "start", "lr": 0.0, "train_loss": None, "train_accuracy": None,
                **{f"val_{k}": v for k, v in val.items()}, "images_per_s": None, "seconds": 0.0}

    # ------------------------------------------------------------------ one epoch

    def train_epoch(self, epoch: int, stage: str, opt, sched, scaler, callbacks: CallbackList) -> dict:
        """One epoch's steps, then validation; its history record."""
        self.train_loader.set_epoch(epoch)
        self.net.train()
        # Random-init statistics mean nothing: `batchnorm: frozen` applies to pretrained models.
        if self.pretrained and (self.cfg.batchnorm == "frozen" or stage == "head"):
            _freeze_batchnorm(self.model)
        total_loss, correct, seen = 0.0, 0, 0
        steps = self._steps_per_epoch()
        callbacks.on_epoch_start(epoch, stage, steps)
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
            loss, logits = self.train_step(x, labels, opt, scaler)
            sched.step()
            if self.ema is not None:
                self.ema.update(self.model)
            total_loss += loss * len(labels)
            correct += int((logits.argmax(1) == labels).sum())
            seen += len(labels)
            callbacks.on_step_end(loss, correct / seen, seen * self.rt.world_size / (time.perf_counter() - start))
        seconds = time.perf_counter() - start
        callbacks.on_validation_start()
        val = self.validate()
        return {
            "epoch": epoch, "stage": stage, "lr": opt.param_groups[0]["lr"],
            "train_loss": total_loss / max(seen, 1), "train_accuracy": correct / max(seen, 1),
            **{f"val_{k}": v for k, v in val.items()},
            "images_per_s": seen * self.rt.world_size / seconds if seconds > 0 else 0.0,
            "seconds": seconds,
        }

    def train_step(self, x, labels, opt, scaler) -> tuple[float, torch.Tensor]:
        """One optimizer step (two forward/backward passes with SAM); (loss, logits)."""
        def forward_backward():
            with torch.autocast(self.rt.device.type, dtype=self.rt.amp_dtype, enabled=self.rt.amp_dtype is not None):
                logits, out = forward(self.net, x)
                loss = self.loss_fn(self.criterion, logits, out, labels)
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
    def validate(self) -> dict:
        """Loss, accuracy and macro-F1 on the validation split (EMA weights when on), all ranks reduced."""
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
    """Why a last.pt's state does not load into this run, in one line (for ckpt.unusable_last)."""
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
