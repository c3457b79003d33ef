"""Pretrained weights: none, a local file or a URI, downloaded once, pickles parsed once.

A downloaded file lands in ``<cache_dir>/downloads/<hash of the URI><suffix>``; every
checkpoint that is not already safetensors is converted once to
``<cache_dir>/safetensors/<source sha256>.safetensors`` (checkpoints.to_safetensors), so the
untrusted pickle goes through the restricted unpickler only the first time.
"""

from __future__ import annotations

import hashlib
import logging
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ferflow.config import FetchSettings
from ferflow.data import sources
from ferflow.errors import FerflowError
from ferflow.models.checkpoints import read_checkpoint, to_safetensors

log = logging.getLogger(__name__)

_REMOTE_SCHEMES = ("http", "https", "s3", "gdrive")


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
    expected = expected_sha256.strip().lower() if expected_sha256 else None
    if _scheme(source) in _REMOTE_SCHEMES:
        path, digest = _download_cached(source, cache_dir / "downloads", expected, fetch_settings or FetchSettings())
    else:
        path = sources.local_path(source)  # also unwraps file:// URIs
        if not path.is_file():
            raise FerflowError(f"pretrained weights not found: {path.resolve()} (from {source!r})")
        digest = sources.sha256_file(path)
        if expected is not None and digest != expected:
            raise FerflowError(
                f"pretrained weights {path}: sha256 mismatch: expected {expected}, got {digest}; "
                "check the file or the sha256 given for this model in params.yaml"
            )
    if _is_safetensors(path):
        ckpt = read_checkpoint(path)
    else:
        ckpt = read_checkpoint(to_safetensors(path, cache_dir / "safetensors"))
    return PretrainedWeights(ckpt.state_dict, ckpt.meta, sources.redact(source), digest)


def _scheme(source: str) -> str:
    return urllib.parse.urlsplit(source).scheme.lower() if "://" in source else ""


def _download_cached(uri: str, folder: Path, expected: str | None, settings: FetchSettings) -> tuple[Path, str]:
    # Named by the URI (tokens included, so two signed URLs of one file do not collide on
    # a wrong cached copy); the suffix only helps a human reading the cache.
    suffix = Path(urllib.parse.urlsplit(uri).path).suffix
    suffix = suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,12}", suffix) else ".bin"
    dest = folder / f"{hashlib.sha256(uri.encode()).hexdigest()[:24]}{suffix}"
    if dest.is_file():
        digest = sources.sha256_file(dest)
        if expected is None or digest == expected:
            log.info("pretrained weights: using cached %s for %s", dest, sources.redact(uri))
            return dest, digest
        log.warning("cached %s does not match sha256 %s; downloading it again", dest, expected)
        dest.unlink()
    digest = sources.download(uri, dest, settings, expected)
    return dest, digest


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with path.open("rb") as fh:
        head = fh.read(9)
    # 8-byte little-endian header length, then the JSON header.
    return len(head) == 9 and head[8:9] == b"{"
