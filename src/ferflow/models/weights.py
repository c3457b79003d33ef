"""Pretrained weights: none, a local file or a URI, downloaded once, pickles parsed once.

A downloaded file lands in ``<cache_dir>/downloads/<hash of the URI><suffix>``; every
checkpoint that is not already safetensors is converted once to
``<cache_dir>/safetensors/<source sha256>.safetensors`` (checkpoints.to_safetensors), so the
untrusted pickle goes through the restricted unpickler only the first time. A `size_limit`
(checkpoints.SizeLimit.for_model) refuses a checkpoint far bigger than the model it is for,
before its tensors are read or cached, and applies to the cached copy as to the original.
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


def load_pretrained(
    source: str | Path | None,
    cache_dir: Path,
    expected_sha256: str | None = None,
    fetch_settings: FetchSettings | None = None,
    size_limit: SizeLimit | None = None,
) -> PretrainedWeights | None:
    """None for random init ("none"), else the checkpoint's tensors and meta, sha256 verified when given."""
    if source is None or str(source).strip().lower() in ("", "none"):
        return None
    source = str(source).strip()
    cache_dir = Path(cache_dir).expanduser()
    path, digest = sources.resolve_file(source, cache_dir / "downloads", expected_sha256,
                                        fetch_settings or FetchSettings(), "pretrained weights")
    if _is_safetensors(path):
        ckpt = read_checkpoint(path, size_limit)
    else:
        ckpt = read_checkpoint(to_safetensors(path, cache_dir / "safetensors", size_limit), size_limit)
    return PretrainedWeights(ckpt.state_dict, ckpt.meta, redact_uri(source), digest)


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
    if source is None or str(source).strip().lower() in ("", "none"):
        return None
    return load_pretrained(source, weights_cache(), expected_sha256, fetch_settings, size_limit=size_limit_for(entry))


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with path.open("rb") as fh:
        head = fh.read(9)
    # 8-byte little-endian header length, then the JSON header.
    return len(head) == 9 and head[8:9] == b"{"
