"""Pretrained weights: none, a local file or a URI, downloaded once, pickles parsed once.

A downloaded file lands in ``<cache_dir>/downloads/<hash of the URI><suffix>``; every
checkpoint that is not already safetensors is converted once to
``<cache_dir>/safetensors/<source sha256>.safetensors`` (checkpoints.to_safetensors), so the
untrusted pickle goes through the restricted unpickler only the first time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ferflow.config import FetchSettings
from ferflow.data import sources
from ferflow.errors import FerflowError
from ferflow.models.checkpoints import read_checkpoint, to_safetensors

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
) -> PretrainedWeights | None:
    """None for random init ("none"), else the checkpoint's tensors and meta, sha256 verified when given."""
    if source is None or str(source).strip().lower() in ("", "none"):
        return None
    source = str(source).strip()
    cache_dir = Path(cache_dir).expanduser()
    path, digest = sources.resolve_file(source, cache_dir / "downloads", expected_sha256,
                                        fetch_settings or FetchSettings(), "pretrained weights")
    if _is_safetensors(path):
        ckpt = read_checkpoint(path)
    else:
        ckpt = read_checkpoint(to_safetensors(path, cache_dir / "safetensors"))
    return PretrainedWeights(ckpt.state_dict, ckpt.meta, sources.redact(source), digest)


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with path.open("rb") as fh:
        head = fh.read(9)
    # 8-byte little-endian header length, then the JSON header.
    return len(head) == 9 and head[8:9] == b"{"
