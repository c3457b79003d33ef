"""Pretrained weights: none, a local file or a URI, downloaded once, pickles parsed once.

A downloaded file lands in ``<cache_dir>/downloads/<hash of the URI><suffix>``; every
checkpoint that is not already safetensors is converted once to
``<cache_dir>/safetensors/<source sha256>.safetensors`` (checkpoints.to_safetensors), so the
untrusted pickle goes through the restricted unpickler only the first time. A `size_limit`
(checkpoints.SizeLimit.for_model) refuses a checkpoint far bigger than the model it is for,
before its tensors are read or cached, and applies to the cached copy as to the original.

A `timm:<arch>` model with no `models.<name>` entry starts from timm's own pretrained
weights when they sit in the local Hugging Face (or torch hub) cache; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ferflow.config import FetchSettings
from ferflow.data import sources
from ferflow.errors import FerflowError
from ferflow.models.checkpoints import SizeLimit, read_checkpoint, to_safetensors
from ferflow.redact import redact_uri

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainedWeights:
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any]  # checkpoints meta: format, pool_type, stem_class, bn_eps, ...
    source: str  # the URI or path, credentials and query removed
    sha256: str  # of the file as downloaded / given (the pickle, not its safetensors copy)
    init: str = "pretrained"  # how a training starts (run.json `init`): pretrained | timm-pretrained


RANDOM_INIT = "random"  # run.json `init` of a model that starts from no weights
TIMM_PRETRAINED = "timm-pretrained"  # timm's own weights, found in the local cache
_warned_random: set[str] = set()  # architectures already warned about (once per process)


def is_none(source: str | Path | None) -> bool:
    """Whether a `pretrained` setting means random init."""
    return source is None or str(source).strip().lower() in ("", "none")


def fetch_pretrained(source: str | Path | None, expected_sha256: str | None = None,
                     fetch_settings: FetchSettings | None = None,
                     cache_dir: Path | None = None) -> tuple[Path, str] | None:
    """(local file, sha256) of pretrained weights, downloaded once into the cache and
    verified when `expected_sha256` is given; None for random init. Training calls it before
    opening an MLflow run, so a missing file or an unreachable URI fails before any work."""
    if is_none(source):
        return None
    folder = Path(cache_dir or weights_cache()).expanduser() / "downloads"
    return sources.resolve_file(str(source).strip(), folder, expected_sha256, fetch_settings or FetchSettings(),
                                "pretrained weights")


def load_pretrained(
    source: str | Path | None,
    cache_dir: Path,
    expected_sha256: str | None = None,
    fetch_settings: FetchSettings | None = None,
    size_limit: SizeLimit | None = None,
) -> PretrainedWeights | None:
    """None for random init ("none"), else the checkpoint's tensors and meta, sha256 verified when given."""
    found = fetch_pretrained(source, expected_sha256, fetch_settings, cache_dir)
    if found is None:
        return None
    path, digest = found
    cache_dir = Path(cache_dir).expanduser()
    if _is_safetensors(path):
        ckpt = read_checkpoint(path, size_limit)
    else:
        ckpt = read_checkpoint(to_safetensors(path, cache_dir / "safetensors", size_limit), size_limit)
    return PretrainedWeights(ckpt.state_dict, ckpt.meta, redact_uri(str(source).strip()), digest)


def tensors_sha256(named) -> str:
    """One digest of named tensors (name, dtype, shape and bytes), in name order: the same
    weights give the same digest whatever device or memory layout they sit in."""
    digest = hashlib.sha256()
    for key, value in sorted(named, key=lambda kv: kv[0]):
        tensor = value.detach().cpu().contiguous().reshape(-1)  # 0-d tensors cannot change dtype view
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def weights_cache() -> Path:
    """Where downloaded and converted pretrained weights are kept (`FERFLOW_CACHE`/weights)."""
    return sources.cache_root() / "weights"


def size_limit_for(entry) -> SizeLimit | None:
    """How big a pretrained checkpoint for a zoo `entry` may be, from the model's own size
    (built on the meta device: no memory, no init cost), so a crafted file is refused unread."""
    from ferflow.labels import CLASSES
    from ferflow.models import zoo

    try:
        with torch.device("meta"):
            model = zoo.build_model(entry, num_classes=len(CLASSES))
    except Exception as exc:  # an architecture that cannot be built on meta: the file-size checks remain
        log.debug("no size limit for %s's pretrained weights: %s", entry.name, exc)
        return None
    return SizeLimit.for_model(sum(t.numel() * t.element_size() for t in model.state_dict().values()), entry.name)


def pretrained_for(entry, source: str | None, expected_sha256: str | None,
                   fetch_settings: FetchSettings | None = None) -> PretrainedWeights | None:
    """`load_pretrained` for a zoo model: the shared cache, and a size limit from the model."""
    if is_none(source):
        return None
    return load_pretrained(source, weights_cache(), expected_sha256, fetch_settings, size_limit=size_limit_for(entry))


def timm_cached_file(entry) -> tuple[str, Path] | None:
    """(source, file) of timm's pretrained weights for a `timm:<arch>` entry where they are
    already on this machine: the Hugging Face hub cache (HF_HOME / HF_HUB_CACHE) for weights
    timm publishes there, else torch hub's checkpoints folder for URL weights. Looks, never
    downloads; None when absent. `source` names the file and its hub snapshot."""
    import timm

    cfg = timm.get_pretrained_cfg(entry.arch) if entry.head == "timm" else None
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        # timm's order (timm.models._hub.load_state_dict_from_hf): safetensors first.
        for filename in [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]:
            found = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(found, str):  # else None (not cached) or a cached "does not exist"
                path = Path(found)
                return f"hf-hub:{cfg.hf_hub_id}@{path.parent.name}/{filename}", path
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url.split("?")[0]).name
        if path.is_file():
            return redact_uri(cfg.url), path
    return None


def timm_weights(entry) -> PretrainedWeights | None:
    """timm's pretrained weights of a `timm:<arch>` entry from the local cache (read like any
    checkpoint: no code runs, size-limited), or None after one warning per architecture that
    the model starts from random init."""
    found = timm_cached_file(entry)
    if found is None:
        if entry.arch not in _warned_random:
            _warned_random.add(entry.arch)
            log.warning("model %s: timm's pretrained weights are not in the local Hugging Face cache, so it starts "
                        "from random init (download them once with timm.create_model(%r, pretrained=True), or set "
                        "models.%s.pretrained)", entry.name, entry.arch, entry.name)
        return None
    source, path = found
    ckpt = read_checkpoint(path, size_limit_for(entry))
    log.info("model %s: starting from timm's pretrained weights %s", entry.name, source)
    return PretrainedWeights(ckpt.state_dict, ckpt.meta, source, ckpt.meta["source_sha256"], init=TIMM_PRETRAINED)


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with path.open("rb") as fh:
        head = fh.read(9)
    # 8-byte little-endian header length, then the JSON header.
    return len(head) == 9 and head[8:9] == b"{"
