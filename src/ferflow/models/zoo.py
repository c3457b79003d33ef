"""The model zoo: HSEmotion's AffectNet checkpoints, the FER stand-in, DAN, a tiny demo model
and any timm architecture (`timm:<arch>`), built fresh in current timm and loaded strictly.

Facts behind the entries: shared/design/FACTS.md, "HSEmotion checkpoints" and "DAN".
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

from ferflow.errors import FerflowError
from ferflow.layout import model_dir_name
from ferflow.models.dan import DAN, FEAT_DIM, load_trunk
from ferflow.models.heads import MEMBER_KEY, MappedHead
from ferflow.models.weights import PretrainedWeights

log = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_MEAN)
IMAGENET_STD: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_STD)
HSEMOTION_7 = ("Anger", "Disgust", "Fear", "Happiness", "Neutral", "Sadness", "Surprise")
HSEMOTION_8 = ("Anger", "Contempt", "Disgust", "Fear", "Happiness", "Neutral", "Sadness", "Surprise")
HSEMOTION_URL = (
    "https://github.com/HSE-asavchenko/face-emotion-recognition/blob/main/models/affectnet_emotions/{}.pt?raw=true"
)
TIMM_PREFIX = "timm:"
HEADS = ("sequential", "linear", "dan", "timm")
DAN_DEFAULT_CLASSES = 7  # DAN's RAF-DB head width, used when nothing else decides it


@dataclass(frozen=True)
class ZooEntry:
    name: str
    arch: str  # timm architecture name, or "dan"
    input_size: int
    pooling: str | None  # "avg" | "max" | None = what the checkpoint says, else timm's default
    head: str  # "sequential" (classifier.0.*) | "linear" (classifier.*) | "dan" | "timm" (timm's own head)
    classes: tuple[str, ...]  # class order of the pretrained head; () for ImageNet/random heads
    extra_outputs: int = 0  # va_mtl: valence and arousal after the logits
    source_url: str | None = None
    bn_eps: float | None = None  # passed to timm when set
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"  # HSEmotion and DAN resize with torchvision's default
    timm_kwargs: tuple[tuple[str, Any], ...] = ()  # further create_model arguments


def _hsemotion(name: str, arch: str, size: int, head: str, classes: tuple[str, ...], extra: int = 0) -> ZooEntry:
    # Pooling None: the B2 file was printed with max pooling once, the re-saved files are
    # unverified; the pickle's own pool_type decides (and is checked where an entry is sure).
    return ZooEntry(name, arch, size, None, head, classes, extra, HSEMOTION_URL.format(name), bn_eps=1e-3)


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        # enet_b0_7 was pickled with timm 0.6.x; its head layout is read from the keys anyway.
        _hsemotion("enet_b0_7", "tf_efficientnet_b0", 224, "sequential", HSEMOTION_7),
        _hsemotion("enet_b0_8_best_afew", "tf_efficientnet_b0", 224, "sequential", HSEMOTION_8),
        _hsemotion("enet_b0_8_best_vgaf", "tf_efficientnet_b0", 224, "sequential", HSEMOTION_8),
        _hsemotion("enet_b0_8_va_mtl", "tf_efficientnet_b0", 224, "linear", HSEMOTION_8, extra=2),
        _hsemotion("enet_b2_8", "tf_efficientnet_b2", 260, "linear", HSEMOTION_8),
        # The stand-in of shared/models/fer7-b0-112 (its README); no URL: a local file.
        ZooEntry("fer7_b0_112", "tf_efficientnet_b0", 112, "avg", "sequential", HSEMOTION_7, bn_eps=1e-3),
        # DAN's trained heads are not reachable; only the MS-Celeb trunk can be loaded.
        ZooEntry("dan", "dan", 224, None, "dan", ()),
        # Random init, for the offline quick start.
        ZooEntry("demo_tiny", "test_efficientnet", 64, "avg", "linear", ()),
    )
}


def resolve(name: str) -> ZooEntry:
    """The zoo entry of a model name; `timm-<arch>` (its folder name, layout.model_dir_name,
    which dvc.yaml's paths spell) is the same model as `timm:<arch>`."""
    name = name.strip()
    if name in ZOO:
        return ZOO[name]
    prefix = next((p for p in (TIMM_PREFIX, model_dir_name(TIMM_PREFIX)) if name.startswith(p)), None)
    if prefix is not None:
        arch = name[len(prefix):]
        name = TIMM_PREFIX + arch
        if not timm.is_model(arch):
            raise FerflowError(f"model {name!r}: timm {timm.__version__} has no architecture {arch!r}")
        cfg = timm.get_pretrained_cfg(arch)
        return ZooEntry(
            name, arch, int(cfg.input_size[-1]), None, "timm", (),
            mean=tuple(cfg.mean), std=tuple(cfg.std), interpolation=cfg.interpolation or "bicubic",
        )
    raise FerflowError(f"unknown model {name!r}; known: {', '.join(ZOO)}, or timm:<arch> for any timm architecture")


def input_size(name: str, override: int | None = None) -> int:
    """The side a model trains and is evaluated at: train.input_size when set, else the zoo's."""
    return int(override or resolve(name).input_size)


# ------------------------------------------------------------------------------ building


def build_model(
    entry: ZooEntry, num_classes: int | None = None, pretrained: PretrainedWeights | None = None
) -> nn.Module:
    """Build in current timm (never downloads), load `pretrained` strictly, then give it a
    `num_classes` head if that differs from the pretrained one."""
    sd = pretrained.state_dict if pretrained is not None else None
    if entry.head == "dan":
        model, width = _build_dan(entry, num_classes, pretrained)
    else:
        head_key = _classifier_path(entry)
        layout = entry.head if entry.head != "timm" else "linear"
        if sd is not None:
            layout = "sequential" if f"{head_key}.0.weight" in sd else "linear"
        width = _pretrained_width(entry, sd, f"{head_key}.0.weight" if layout == "sequential" else f"{head_key}.weight")
        if width is None:
            # A pretrained entry keeps its own head shape even at random init, so that a
            # requested num_classes always ends as swap_head's plain Linear.
            width = len(entry.classes) + entry.extra_outputs if entry.classes else num_classes
        kwargs = dict(entry.timm_kwargs)
        pool = _pooling(entry, pretrained)
        if pool is not None:
            kwargs["global_pool"] = pool
        if entry.bn_eps is not None:
            kwargs["bn_eps"] = entry.bn_eps
        if width is not None:
            kwargs["num_classes"] = width
        model = timm.create_model(entry.arch, pretrained=False, **kwargs)
        if layout == "sequential":
            old = model.get_submodule(head_key)
            model.set_submodule(head_key, nn.Sequential(nn.Linear(old.in_features, old.out_features)))
        if pretrained is not None:
            _check_meta(entry, model, pretrained)
            _load_strict(entry, model, sd)
        width = model.num_classes if width is None else width
    if num_classes is not None and num_classes != width:
        swap_head(model, entry, num_classes)
    return model


def _build_dan(entry: ZooEntry, num_classes: int | None, pretrained: PretrainedWeights | None) -> tuple[DAN, int]:
    sd = pretrained.state_dict if pretrained is not None else None
    whole = sd is not None and any(k.startswith(("trunk.", "heads.")) for k in sd)
    width = _pretrained_width(entry, sd if whole else None, "fc.weight") or num_classes or DAN_DEFAULT_CLASSES
    model = DAN(num_classes=width)
    if whole:
        _load_strict(entry, model, sd)
    elif sd is not None:
        load_trunk(model, sd)  # e.g. resnet18_msceleb.pth: the heads stay random
    return model, width


def _pretrained_width(entry: ZooEntry, sd: dict[str, Tensor] | None, key: str) -> int | None:
    if sd is None or key not in sd:
        return None  # strict loading reports a headless checkpoint
    width = int(sd[key].shape[0])
    expected = len(entry.classes) + entry.extra_outputs
    if entry.classes and width != expected:
        raise FerflowError(
            f"model {entry.name}: checkpoint head has {width} outputs, the zoo entry expects {expected} "
            f"(classes {', '.join(entry.classes)}" + (f" + {entry.extra_outputs} extra" if entry.extra_outputs else "")
            + "); is this the right checkpoint for this model?"
        )
    return width


def _pooling(entry: ZooEntry, pretrained: PretrainedWeights | None) -> str | None:
    found = pretrained.meta.get("pool_type") if pretrained is not None else None
    if entry.pooling is not None:
        return entry.pooling  # a different `found` is refused by _check_meta
    if pretrained is not None and found is None and entry.classes:
        log.warning("model %s: checkpoint does not record its pooling; using timm's default", entry.name)
    return found


def _check_meta(entry: ZooEntry, model: nn.Module, pretrained: PretrainedWeights) -> None:
    """Refuse a checkpoint whose recorded architecture differs from what was built."""
    meta = pretrained.meta
    pool = getattr(getattr(model, "global_pool", None), "pool_type", None)
    stem = getattr(model, "conv_stem", None)
    norm = getattr(model, "bn1", None)
    if norm is None:
        norm = next((m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)), None)
    checks = [
        ("pool_type", meta.get("pool_type"), entry.pooling or pool, lambda a, b: a == b),
        ("stem_class", meta.get("stem_class"), type(stem).__name__ if stem is not None else None, lambda a, b: a == b),
        ("bn_eps", meta.get("bn_eps"), getattr(norm, "eps", None),
         lambda a, b: math.isclose(float(a), float(b), rel_tol=1e-6)),
    ]
    for field, found, expected, same in checks:
        if found is not None and expected is not None and not same(found, expected):
            raise FerflowError(
                f"model {entry.name}: checkpoint {pretrained.source} has {field}={found!r}, but the zoo entry "
                f"({entry.arch}) expects {field}={expected!r}; wrong checkpoint or wrong model name"
            )


def _load_strict(entry: ZooEntry, model: nn.Module, sd: dict[str, Tensor]) -> None:
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise FerflowError(
            f"model {entry.name}: checkpoint keys do not match {entry.arch}: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:  # shape mismatches
        detail = " ".join(str(exc).split())[:600]
        raise FerflowError(f"model {entry.name}: checkpoint does not fit {entry.arch}: {detail}") from exc


# ------------------------------------------------------------------------------ heads


def _classifier_path(entry: ZooEntry) -> str:
    if entry.head in ("sequential", "linear"):
        return "classifier"  # timm EfficientNet
    cfg = timm.get_pretrained_cfg(entry.arch)
    if cfg is None or not cfg.classifier:
        raise FerflowError(f"model {entry.name}: timm does not name the classifier of {entry.arch}")
    return cfg.classifier


def _head(model: nn.Module, entry: ZooEntry) -> nn.Linear:
    """The Linear producing the logits (inside the Sequential for the B0 layout)."""
    module = model.fc if entry.head == "dan" else model.get_submodule(_classifier_path(entry))
    if isinstance(module, nn.Sequential) and len(module) == 1:
        module = module[0]
    if not isinstance(module, nn.Linear):
        raise FerflowError(f"model {entry.name}: its classifier is a {type(module).__name__}, not a Linear layer")
    return module


def swap_head(model: nn.Module, entry: ZooEntry, num_classes: int = 3,
              mapping: dict[int, int | None] | None = None) -> nn.Module:
    """Replace the classifier by a fresh plain Linear (va_mtl's valence/arousal go with the
    old one), or, given the source -> target `mapping`, by a `MappedHead` made of the
    pretrained rows, whose predictions equal the zero-shot ones."""
    old = _head(model, entry)
    like = dict(device=old.weight.device, dtype=old.weight.dtype)
    if entry.head == "dan":
        if mapping is not None:
            raise FerflowError(f"model {entry.name}: a mapped head needs a pretrained expression head; DAN has none")
        model.fc = nn.Linear(FEAT_DIM, num_classes, **like)
        model.bn = nn.BatchNorm1d(num_classes, **like)
    elif mapping is not None:
        model.set_submodule(_classifier_path(entry), MappedHead.from_linear(old, mapping, num_classes))
    else:
        model.set_submodule(_classifier_path(entry), nn.Linear(old.in_features, num_classes, **like))
    model.num_classes = num_classes
    return model


def build_finetuned(entry: ZooEntry, state_dict: dict[str, Tensor], num_classes: int) -> nn.Module:
    """The architecture of a fine-tuned checkpoint, read from its own keys (plain or mapped
    head), with its weights loaded strictly."""
    model = build_model(entry, num_classes=num_classes)
    if entry.head != "dan":
        prefix = f"{_classifier_path(entry)}."
        if f"{prefix}{MEMBER_KEY}" in state_dict:
            model.set_submodule(prefix[:-1], MappedHead.from_state_dict(state_dict, prefix))
    _load_strict(entry, model, state_dict)
    return model


def can_map_head(entry: ZooEntry) -> bool:
    """Whether the pretrained head's classes can initialise the 3-class head (`head_init: mapped`)."""
    return bool(entry.classes) and entry.head != "dan"


def head_parameters(model: nn.Module, entry: ZooEntry) -> list[nn.Parameter]:
    """Parameters of the classifier alone (stage 1 trains only these)."""
    if entry.head == "dan":
        return [*model.fc.parameters(), *model.bn.parameters()]
    return list(model.get_submodule(_classifier_path(entry)).parameters())


def zero_shot_forward(model: nn.Module, entry: ZooEntry, images: Tensor) -> Tensor:
    """Logits over entry.classes only (va_mtl: the first 8 of its 10 outputs)."""
    if not entry.classes:
        raise FerflowError(f"model {entry.name} has no pretrained expression classes: zero-shot needs one")
    from ferflow.models.inference import forward

    out, _ = forward(model, images)
    expected = len(entry.classes) + entry.extra_outputs
    if out.shape[-1] != expected:
        raise FerflowError(
            f"model {entry.name}: head gives {out.shape[-1]} outputs, not the pretrained {expected}; "
            "zero-shot needs the original head (was it swapped?)"
        )
    return out[..., : len(entry.classes)]


def data_config(entry: ZooEntry) -> dict[str, Any]:
    return {"input_size": entry.input_size, "mean": tuple(entry.mean), "std": tuple(entry.std),
            "interpolation": entry.interpolation}
