"""Params sections for training: pretrained weights per zoo model (models) and the
fine-tuning recipe (train: stages, optimizer, loss, augmentation, EMA, runtime)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from ferflow.config.base import Frozen, optional_sha256


class ModelWeights(Frozen):
    """Where a zoo model's pretrained weights come from (a value of `models`)."""

    pretrained: str = Field(default="none", description="none | local path | https/s3/gdrive/file URI")
    sha256: Optional[str] = Field(default=None, description="verified when given; recorded always")

    _hex = field_validator("sha256")(classmethod(lambda cls, v: optional_sha256(v)))


class StageSettings(Frozen):
    epochs: int = Field(ge=0, le=1000)
    lr: float = Field(gt=0)


class AugmentSettings(Frozen):
    """Batch augmentation on the training device; all off = HSEmotion's plain recipe."""

    hflip: bool = True
    rotate_deg: float = Field(default=10.0, ge=0, le=45)
    translate: float = Field(default=0.05, ge=0, le=0.5, description="fraction of the image size")
    scale: tuple[float, float] = (0.9, 1.1)
    erasing_p: float = Field(default=0.25, ge=0, le=1, description="random erasing probability")
    synthetic_mask_p: float = Field(default=0.0, ge=0, le=1, description="share of images given a drawn face mask")
    # Where faces sit in the cached images, for placing those masks: the whole image for
    # face crops (prepare.face_crop, FER-style archives); a smaller box for full frames.
    mask_face_box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)

    @field_validator("mask_face_box")
    @classmethod
    def _box(cls, v: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        x0, y0, x1, y1 = v
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise ValueError("expected [x0, y0, x1, y1] fractions with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
        return v


class OptimizerSettings(Frozen):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    weight_decay: float = Field(default=0.05, ge=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    sam: bool = False
    sam_rho: float = Field(default=0.05, gt=0)


class LossSettings(Frozen):
    label_smoothing: float = Field(default=0.1, ge=0, lt=1)
    # sqrt_inverse_frequency: half-way (in log space) between none and inverse_frequency.
    class_weights: Literal["inverse_frequency", "sqrt_inverse_frequency", "none"] = "inverse_frequency"


class EmaSettings(Frozen):
    enabled: bool = False
    decay: float = Field(default=0.999, gt=0, lt=1)


class TrainSettings(Frozen):
    datasets: list[str] = Field(min_length=1, description="names from data.archives to fine-tune on")
    models: list[str] = Field(min_length=1, description="zoo names (see `ferflow models`) or timm:<arch> "
                                                        "(timm-<arch> in dvc.yaml runs)")
    out_dir: Path = Path("models")
    input_size: Optional[int] = Field(default=None, ge=16, le=1024, description="override the zoo's size")
    batch_size: int = Field(default=32, ge=1)
    head_init: Literal["mapped", "random"] = Field(
        default="mapped", description="mapped: 3-class head from the pretrained head's rows (where it has "
        "expression classes), so step 0 predicts what zero-shot does; random: a fresh Linear")
    head_stage: StageSettings = StageSettings(epochs=1, lr=1e-3)
    full_stage: StageSettings = StageSettings(epochs=6, lr=2e-4)
    layer_decay: float = Field(default=1.0, gt=0, le=1,
                               description="full stage of a pretrained model: lr x layer_decay^depth below the head")
    batchnorm: Literal["train", "frozen"] = Field(
        default="train", description="frozen: a pretrained model's BatchNorm keeps its running statistics "
        "(affine weights still learn)")
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_fraction: float = Field(default=0.1, ge=0, lt=1, description="of each stage's steps")
    min_lr_ratio: float = Field(default=0.01, ge=0, le=1)
    optimizer: OptimizerSettings = OptimizerSettings()
    loss: LossSettings = LossSettings()
    sampler: Literal["shuffle", "balanced"] = "shuffle"
    augment: AugmentSettings = AugmentSettings()
    ema: EmaSettings = EmaSettings()
    monitor: Literal["accuracy", "macro_f1"] = "accuracy"
    early_stopping_patience: int = Field(default=3, ge=0, description="epochs without improvement; 0 = off")
    grad_clip: float = Field(default=1.0, ge=0, description="max grad norm; 0 = off")
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    channels_last: bool = True
    compile: bool = False
    deterministic: bool = False
    threads: int = Field(default=0, ge=0, description="CPU threads; 0 = torch default")
    cpu_keep_freed_memory: bool = Field(
        default=True, description="CPU: glibc malloc keeps freed buffers (no per-step page faults; ~2x faster "
        "steps measured), at the price of holding peak memory")
    workers: int = Field(default=2, ge=0, description="cache prefetch threads")
    max_steps_per_epoch: Optional[int] = Field(default=None, ge=1, description="cap, for smoke runs")

    @model_validator(mode="after")
    def _sam_needs_no_scaler(self) -> "TrainSettings":
        if self.optimizer.sam and self.amp == "fp16":
            raise ValueError("optimizer.sam does not combine with amp=fp16 (grad scaling); use bf16 or off")
        return self
