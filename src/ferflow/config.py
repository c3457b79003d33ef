"""params.yaml as frozen pydantic models: a bad file or override fails before any work.

Every stage (CLI, DVC, KFP) reads its configuration through `load_params`, so there is a
single source of truth and a single place where keys are validated.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Iterable, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from ferflow.errors import ConfigError

DEFAULT_PARAMS = Path("params.yaml")

# Real archive names become directory names; keep them portable.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _optional_sha256(v: Optional[str]) -> Optional[str]:
    if v is not None and not re.fullmatch(r"[0-9a-f]{64}", v.strip().lower()):
        raise ValueError("must be a sha256 digest: 64 hexadecimal digits")
    return v.strip().lower() if v else v


# What numpy's legacy seeding (np.random.seed) and torch.manual_seed both take.
SEED_MAX = 2**32 - 1


def _seed_field(default: int) -> Any:
    return Field(default=default, ge=0, le=SEED_MAX, description=f"0..{SEED_MAX} (numpy and torch seed range)")


def _number_leaves(annotation: Any) -> set:
    """The plain types inside an annotation: Optional[int] -> {int, NoneType}, tuple[float, float] -> {float}."""
    if get_origin(annotation) in (Union, list, tuple, dict, set) or type(annotation).__name__ == "UnionType":
        return set().union(*(_number_leaves(a) for a in get_args(annotation) if a is not Ellipsis))
    return {annotation} if isinstance(annotation, type) else set()


def _holds_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, (list, tuple)):
        return any(_holds_bool(v) for v in value)
    return isinstance(value, dict) and any(_holds_bool(v) for v in value.values())


class _Frozen(BaseModel):
    # No inf/nan in any float field: `lr: .inf` would validate, then train to `loss nan`.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads `true` as 1 for int and float fields (batch_size=true ->
        # 1); a number is never meant as a boolean. A validator on every field of every model,
        # rather than StrictInt on each, also covers fields added later; ints and numeric
        # strings (PyYAML reads `1e-3` as a string) stay accepted for floats.
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and _holds_bool(value):
            leaves = _number_leaves(field.annotation)
            if leaves & {int, float} and bool not in leaves:
                raise ValueError("expected a number, not a boolean (true/false)")
        return value


class ArchiveSource(_Frozen):
    """Where one archive lives and the digest it must have (a value of data.archives)."""

    uri: str = Field(description="https://, Google Drive link, s3://bucket/key, file:// or a path")
    sha256: str = Field(description="expected sha256 of the archive, 64 hex digits")
    size: Optional[int] = Field(default=None, ge=0, description="expected size in bytes")
    images: Optional[int] = Field(default=None, ge=0, description="images it holds: sizes the pipeline's disks")

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, v: str) -> str:
        v = v.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", v):
            raise ValueError("must be a sha256 digest: 64 hexadecimal digits")
        return v


class ArchiveSpec(ArchiveSource):
    """An archive source with its dataset name (the key it has in data.archives)."""

    name: str


class DataSettings(_Frozen):
    raw_dir: Path = Path("data/raw")
    prepared_dir: Path = Path("data/prepared")
    # Keyed by dataset name: DVC stages are named after the keys (fetch@LFW-FER) and
    # overrides read naturally (--set data.archives.LFW-FER.uri=...).
    archives: dict[str, ArchiveSource] = Field(min_length=1)
    # Datasets made of several archives (one model for all of them), prepared from the
    # members' prepared data with identity-grouped splits over the union.
    unions: dict[str, list[str]] = {}

    @field_validator("archives", "unions")
    @classmethod
    def _portable_names(cls, v: dict) -> dict:
        for name in v:
            if not _NAME_RE.match(name):
                raise ValueError(
                    f"dataset name {name!r} must be letters, digits, '.', '_' or '-' (it names a directory)"
                )
        return v

    @model_validator(mode="after")
    def _union_members(self) -> "DataSettings":
        for name, members in self.unions.items():
            if name in self.archives:
                raise ValueError(f"unions.{name}: the name is already an archive in data.archives")
            unknown = [m for m in members if m not in self.archives]
            if unknown or len(set(members)) < 2 or len(set(members)) != len(members):
                raise ValueError(f"unions.{name}: needs two or more different names from data.archives "
                                 f"({', '.join(self.archives)}); got {members}")
        return self

    @property
    def datasets(self) -> list[str]:
        """Every dataset that can be prepared and trained on: archives, then unions."""
        return [*self.archives, *self.unions]

    def check_dataset(self, name: str) -> str:
        if name not in self.archives and name not in self.unions:
            raise ConfigError(f"no dataset named {name!r} in data.archives or data.unions "
                              f"(known: {', '.join(self.datasets)})")
        return name

    def members(self, name: str) -> list[str]:
        """The archives a dataset is made of: itself, or a union's members."""
        self.check_dataset(name)
        return list(self.unions.get(name, [name]))

    def content_sha256(self, name: str) -> str:
        """The archive's sha256, or for a union one digest over its members' (in order)."""
        if name in self.archives:
            return self.archives[name].sha256
        joined = ",".join(f"{m}:{self.archives[m].sha256}" for m in self.members(name))
        return hashlib.sha256(joined.encode()).hexdigest()

    @property
    def specs(self) -> list[ArchiveSpec]:
        return [ArchiveSpec(name=name, **src.model_dump()) for name, src in self.archives.items()]

    def archive(self, name: str) -> ArchiveSpec:
        if name not in self.archives:
            known = ", ".join(self.archives)
            raise ConfigError(f"no archive named {name!r} in data.archives (known: {known})")
        return ArchiveSpec(name=name, **self.archives[name].model_dump())


class FetchSettings(_Frozen):
    retries: int = Field(default=4, ge=0, le=20, description="attempts after the first")
    backoff_s: float = Field(default=1.0, ge=0, description="first retry delay, doubled each time")
    max_backoff_s: float = Field(default=30.0, ge=0)
    timeout_s: float = Field(default=30.0, gt=0, description="connect/read timeout per request")
    chunk_bytes: int = Field(default=1 << 20, ge=1024)
    progress: bool = True


class SplitSettings(_Frozen):
    """How splits are made when an archive lacks them (grouped by identity, stratified)."""

    val_fraction: float = Field(default=0.1, ge=0, lt=1, description="carved from train when no val split")
    eval_fraction: float = Field(default=0.2, ge=0, lt=1, description="used only when no split folders")
    seed: int = _seed_field(13)


# prepare.face_crop: none | center:<fraction> | detect | detect:<fallback centre fraction>
FACE_CROP_SYNTAX = re.compile(r"^(?:none|center:(?P<fraction>[0-9.]+)|detect(?::(?P<fallback>[0-9.]+))?)$")


def check_face_crop(spec: str) -> str:
    """A prepare.face_crop value (none, center:<f>, detect, detect:<f>, fractions in (0, 1]);
    ValueError otherwise."""
    spec = spec.strip()
    m = FACE_CROP_SYNTAX.match(spec)
    number = m and (m.group("fraction") or m.group("fallback"))
    try:
        ok = m is not None and (number is None or 0 < float(number) <= 1)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError("expected none, center:<fraction in (0, 1]>, detect or detect:<fallback fraction in (0, 1]>")
    return spec


class DetectorSettings(_Frozen):
    """MTCNN weights for prepare.face_crop=detect (and mask placement): facenet-pytorch's
    wheel on PyPI, pinned by sha256, downloaded once into the ferflow cache."""

    weights: str = Field(description="https URI, local path to the wheel, or a folder with pnet/rnet/onet.pt")
    sha256: Optional[str] = Field(default=None, description="verified when given")

    _hex = field_validator("sha256")(classmethod(lambda cls, v: _optional_sha256(v)))


class PrepareSettings(_Frozen):
    image_sizes: list[int] = Field(default=[224], min_length=1)
    face_crop: str = Field(default="none", description="none | center:<fraction> | detect | detect:<fallback fraction>")
    face_margin: float = Field(default=1.3, ge=1.0, le=4.0, description="detect: crop side / face box side")
    detector: Optional[DetectorSettings] = None
    max_uncompressed_bytes: int = Field(default=4 << 30, gt=0, description="zip-bomb cap per archive")
    max_image_pixels: int = Field(default=50_000_000, gt=0,
                                  description="larger images are quarantined from their header, never decoded")
    max_bad_fraction: float = Field(default=0.01, ge=0, le=1)
    allow_duplicates_across_splits: bool = False
    workers: int = Field(default=0, ge=0, le=64, description="decode processes; 0 = one per available CPU (FERFLOW_CPUS, else affinity)")
    split: SplitSettings = SplitSettings()

    @field_validator("image_sizes")
    @classmethod
    def _sizes(cls, v: list[int]) -> list[int]:
        if any(s < 8 or s > 1024 for s in v):
            raise ValueError("each size must be between 8 and 1024 pixels")
        return sorted(set(v))

    @field_validator("face_crop")
    @classmethod
    def _face_crop(cls, v: str) -> str:
        return check_face_crop(v)

    @model_validator(mode="after")
    def _detector_given(self) -> "PrepareSettings":
        if self.face_crop.startswith("detect") and self.detector is None:
            raise ValueError("face_crop=detect needs prepare.detector (weights and sha256)")
        return self


class DemoSettings(_Frozen):
    """Offline demo archives: procedurally drawn faces with visible expressions."""

    # Applied by `ferflow demo-data --params-out` besides pointing data.archives at the
    # generated archives: a tiny model and size so the quick start runs in minutes.
    overrides: list[str] = []

    out_dir: Path = Path("data/demo")
    images_per_class: int = Field(default=100, ge=3, le=100_000, description="per class per archive")
    image_size: int = Field(default=112, ge=32, le=512)
    eval_fraction: float = Field(default=0.25, gt=0, lt=1)
    seed: int = _seed_field(0)


class ModelWeights(_Frozen):
    """Where a zoo model's pretrained weights come from (a value of `models`)."""

    pretrained: str = Field(default="none", description="none | local path | https/s3/gdrive/file URI")
    sha256: Optional[str] = Field(default=None, description="verified when given; recorded always")

    _hex = field_validator("sha256")(classmethod(lambda cls, v: _optional_sha256(v)))


class StageSettings(_Frozen):
    epochs: int = Field(ge=0, le=1000)
    lr: float = Field(gt=0)


class AugmentSettings(_Frozen):
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


class OptimizerSettings(_Frozen):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    weight_decay: float = Field(default=0.05, ge=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    sam: bool = False
    sam_rho: float = Field(default=0.05, gt=0)


class LossSettings(_Frozen):
    label_smoothing: float = Field(default=0.1, ge=0, lt=1)
    # sqrt_inverse_frequency: half-way (in log space) between none and inverse_frequency.
    class_weights: Literal["inverse_frequency", "sqrt_inverse_frequency", "none"] = "inverse_frequency"


class EmaSettings(_Frozen):
    enabled: bool = False
    decay: float = Field(default=0.999, gt=0, lt=1)


class TrainSettings(_Frozen):
    datasets: list[str] = Field(min_length=1, description="names from data.archives to fine-tune on")
    models: list[str] = Field(min_length=1, description="zoo names (see `ferflow models`) or timm:<arch>")
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


class EvaluateSettings(_Frozen):
    out_dir: Path = Path("evaluation")
    split: Literal["eval", "val", "train"] = "eval"
    batch_size: int = Field(default=64, ge=1)
    zero_shot: bool = True
    surprise: Literal["ignore", "negative", "neutral", "positive"] = "ignore"


class ReportSettings(_Frozen):
    out_dir: Path = Path("reports")


class TrackingSettings(_Frozen):
    """MLflow. MLFLOW_TRACKING_URI (and the standard MLflow auth variables) override the
    embedded default; credentials never belong here."""

    enabled: bool = True
    tracking_uri: str = "sqlite:///mlruns/mlflow.db"
    artifact_location: str = Field(default="mlruns/artifacts", description="for experiments created on the embedded store")
    experiment: str = "ferflow"
    timeout_s: float = Field(default=10.0, gt=0, description="per MLflow HTTP request")
    max_retries: int = Field(default=2, ge=0, le=10)
    log_system_metrics: bool = True
    log_model: bool = Field(default=True, description="false: `register` refuses (a version is a logged model)")


class RegistrySettings(_Frozen):
    """One registered model per dataset; promotion moves the `champion` alias by a gate."""

    names: dict[str, str] = Field(default_factory=dict, description="dataset -> registered model name")
    records_dir: Path = Field(default=Path("registry"), description="what register/promote did, as files (DVC outs)")
    metric: str = "eval_accuracy"
    min_delta: float = Field(default=0.0, ge=0)
    promote_in_experiments: bool = Field(
        default=False, description="`dvc exp run` trials register (tagged dvc.experiment) but move champion only if true")

    def name_for(self, dataset: str) -> str:
        return self.names.get(dataset) or f"ferflow-{dataset.lower()}"


class ServeSettings(_Frozen):
    """The registered model's runtime. Every version carries model.onnx either way; the
    engine is recorded in its MLmodel (model_config) and can be overridden when loading."""

    engine: Literal["torch", "onnx"] = Field(
        default="torch", description="torch: the weights on PyTorch; onnx: model.onnx on onnxruntime")


class Params(_Frozen):
    seed: int = _seed_field(42)
    data: DataSettings
    fetch: FetchSettings = FetchSettings()
    prepare: PrepareSettings = PrepareSettings()
    demo: DemoSettings = DemoSettings()
    models: dict[str, ModelWeights] = {}
    train: Optional[TrainSettings] = None
    evaluate: EvaluateSettings = EvaluateSettings()
    report: ReportSettings = ReportSettings()
    tracking: TrackingSettings = TrackingSettings()
    registry: RegistrySettings = RegistrySettings()
    serve: ServeSettings = ServeSettings()

    @model_validator(mode="after")
    def _train_names_known(self) -> "Params":
        if self.train is not None:
            unknown = [d for d in self.train.datasets if d not in self.data.datasets]
            if unknown:
                raise ValueError(f"train.datasets names {unknown} not in data.archives or data.unions "
                                 f"({', '.join(self.data.datasets)})")
        return self

    def weights_for(self, model: str) -> ModelWeights:
        return self.models.get(model, ModelWeights())

    def require_train(self) -> TrainSettings:
        if self.train is None:
            raise ConfigError("params have no `train` section; see params.yaml in the repository")
        return self.train


# ---------------------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.0.c=value` -> (['a','b','0','c'], value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value is not valid YAML: {exc}") from None
    return key.split("."), value


def apply_override(tree: dict, path: list[str], value: Any, origin: str) -> None:
    """Set `value` at `path` inside nested dicts/lists; list items are addressed by index."""
    node: Any = tree
    for depth, part in enumerate(path[:-1]):
        here = ".".join(path[: depth + 1])
        if isinstance(node, list):
            node = node[_index(part, node, here, origin)]
        elif isinstance(node, dict):
            if part not in node or node[part] is None:
                node[part] = {}
            node = node[part]
        else:
            raise ConfigError(f"{origin}: {here} is a {type(node).__name__}, cannot set a key below it")
    last = path[-1]
    if isinstance(node, list):
        node[_index(last, node, ".".join(path), origin)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"{origin}: {'.'.join(path[:-1])} is not a mapping")


def _index(part: str, seq: list, key: str, origin: str) -> int:
    if not part.isdigit() or int(part) >= len(seq):
        raise ConfigError(f"{origin}: {key}: list index must be 0..{len(seq) - 1}")
    return int(part)


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"params file not found: {path} (pass --params FILE)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                          "save the params file as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"cannot read params file {path}: {exc.strerror or exc}") from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(tree).__name__}")
    return tree


def validate(tree: dict, origin: str) -> Params:
    try:
        return Params.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, origin)) from None


def load_params(path: Path | str = DEFAULT_PARAMS, overrides: Iterable[str] = ()) -> Params:
    """Read, override and validate params; raise ConfigError naming the key on any problem."""
    path = Path(path)
    tree = read_yaml(path)
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(tree, keys, value, origin=f"--set {'.'.join(keys)}")
    return validate(tree, origin=str(path))


def describe_validation_error(exc: ValidationError, origin: str) -> str:
    """One readable line per problem: `file: key.path: what was expected (got X)`."""
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see params.yaml for the known keys)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = err["msg"]
            if "input" in err and not isinstance(err["input"], (dict, list)):
                msg += f" (got {err['input']!r})"
        lines.append(f"{origin}: {key}: {msg}")
    return "; ".join(lines)


def dump_params(params: Params) -> dict:
    """Plain-YAML form of resolved params (paths as strings), for writing files."""
    return params.model_dump(mode="json")
