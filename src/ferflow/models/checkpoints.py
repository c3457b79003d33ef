"""Read model checkpoints without running any code named in them.

A torch.save() archive (a state_dict, or a whole pickled model such as HSEmotion's timm
models, shared/design/FACTS.md "HSEmotion checkpoints") goes through the restricted
unpickler (models.unpickler), and a pickled model's tensors are named as
``model.state_dict()`` would (models.pickled_modules); a .safetensors file is read as it is.
Either way the result is a state_dict of plain CPU tensors and the architecture hints.

Sizes are checked before any tensor byte is read: unpickling only records the storages the
pickle declares, then the storages the state_dict uses must fit the file (a torch.save()
archive stores them uncompressed; a deflated record may expand at most _MAX_EXPANSION times)
and the caller's SizeLimit (derived from the model being loaded), and only then are they
read, one at a time. A .safetensors file's header is held to the same SizeLimit.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from ferflow.errors import FerflowError
from ferflow.fileio import atomic_path
from ferflow.models import unpickler
from ferflow.models.pickled_modules import MODULE_META_KEYS, extract_state_dict
from ferflow.models.unpickler import mib

# torch.save() writes tensors uncompressed, so their bytes are in the file; torch.load also
# reads a re-zipped (deflated) archive, but weights barely compress. Declared bytes beyond
# this expansion of the file's size can only be a decompression bomb.
_MAX_EXPANSION = 16
_EXPANSION_SLACK = 1 << 20  # tiny archives of zero tensors compress well and are harmless


@dataclass(frozen=True)
class SizeLimit:
    """The most tensor bytes a checkpoint may hold, checked before any of them is read."""

    max_bytes: int
    reason: str  # what the cap was derived from, for the error message

    @classmethod
    def for_model(cls, model_bytes: int, name: str) -> SizeLimit:
        # Room for another head (ImageNet's 1000 classes), float64 copies and extra buffers,
        # and a floor for tiny models; a checkpoint beyond it is not for this model.
        return cls(4 * model_bytes + (64 << 20), f"model {name} has {mib(model_bytes)} of weights")


@dataclass(frozen=True)
class Checkpoint:
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any]


def read_checkpoint(path: Path, limit: SizeLimit | None = None) -> Checkpoint:
    """Tensors and architecture hints of a torch.save() archive or a .safetensors file.

    Refused before any tensor is read: tensors the file cannot hold (a decompression bomb),
    and, given `limit`, more tensor bytes than it allows."""
    path = Path(path)
    head, sha = _fingerprint(path)
    if head.startswith(b"PK\x03\x04"):
        obj = unpickler.unpickle_zip(path)
    elif path.suffix == ".safetensors" or head[8:9] == b"{":
        return _read_safetensors(path, sha, limit)
    elif head[:1] == b"\x80":
        obj = unpickler.unpickle_raw(path)
    else:
        raise FerflowError(f"{path} is not a checkpoint: expected a torch.save() archive or .safetensors")
    try:
        state_dict, meta = extract_state_dict(obj, path)
    except (AttributeError, TypeError, RecursionError) as exc:  # malformed module state
        raise FerflowError(f"{path} is corrupt: unexpected module state ({exc})") from exc
    state_dict = strip_prefixes(state_dict)
    _check_declared(path, unpickler.declared_bytes(state_dict), limit)
    state_dict = unpickler.materialise(state_dict, path)
    return Checkpoint(_own(state_dict), {**meta, "source_sha256": sha})


def to_safetensors(path: Path, cache_dir: Path, limit: SizeLimit | None = None) -> Path:
    """Convert once to ``<cache_dir>/<source sha256>.safetensors``; later calls reuse that file.
    A checkpoint read_checkpoint refuses (`limit` included) leaves nothing in the cache."""
    path, cache_dir = Path(path), Path(cache_dir)
    target = cache_dir / f"{_fingerprint(path)[1]}.safetensors"
    if target.is_file():
        return target  # the caller reads it with its own limit
    ckpt = read_checkpoint(path, limit)
    metadata = {k: str(v) for k, v in ckpt.meta.items() if v is not None and k != "format"}
    metadata["source_format"] = ckpt.meta["format"]
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:  # a concurrent reader never sees a half-written file
        safetensors.torch.save_file(ckpt.state_dict, str(tmp), metadata=metadata)
    return target


def strip_prefixes(
    state_dict: Mapping[str, torch.Tensor], prefixes: tuple[str, ...] = ("module.", "model.")
) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes (DDP's ``module.``, ``model.``) shared by every key."""
    out = dict(state_dict)
    stripped = True
    while out and stripped:
        stripped = False
        for prefix in prefixes:
            # Only a prefix on every key is a wrapper; a child named "model" must survive.
            if all(key.startswith(prefix) for key in out):
                out = {key[len(prefix):]: value for key, value in out.items()}
                stripped = True
    return out


# --- sizes, and tensors of their own ----------------------------------------------------


def _check_declared(path: Path, declared: int, limit: SizeLimit | None) -> None:
    """Tensor bytes a torch archive declares: refused beyond what the file can hold, or `limit`."""
    on_disk = path.stat().st_size
    if declared > max(_MAX_EXPANSION * on_disk, _EXPANSION_SLACK):
        raise FerflowError(
            f"refusing to load {path}: its tensors declare {mib(declared)} but the file is {mib(on_disk)} "
            f"(compressed {declared / max(on_disk, 1):.0f}x, which torch.save() never does): a decompression bomb "
            "or a damaged file; get it from a trusted source")
    _check_limit(path, declared, limit)


def _check_limit(path: Path, declared: int, limit: SizeLimit | None) -> None:
    if limit is not None and declared > limit.max_bytes:
        raise FerflowError(
            f"refusing to load {path}: its tensors take {mib(declared)}, more than the {mib(limit.max_bytes)} "
            f"allowed ({limit.reason}); it is not a checkpoint of this model, or a crafted file")


def _own(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached tensors, none sharing memory (tied weights appear at two keys)."""
    seen: set[int] = set()
    out = {}
    for key, tensor in state_dict.items():
        tensor = tensor.detach()
        if tensor.untyped_storage().data_ptr() in seen or not tensor.is_contiguous():
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


# --- safetensors and file helpers ----------------------------------------------------------


def _safetensors_bytes(path: Path) -> int | None:
    """Tensor bytes a .safetensors header declares (safe_open checks they fit the file);
    None when the header cannot be parsed (safe_open then says why)."""
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > unpickler.MAX_PICKLE_BYTES:
                return None
            header = json.loads(f.read(length))
        return sum(int(v["data_offsets"][1]) - int(v["data_offsets"][0])
                   for k, v in header.items() if k != "__metadata__")
    except (OSError, ValueError, struct.error, KeyError, TypeError, IndexError, AttributeError):
        return None


def _read_safetensors(path: Path, sha: str, limit: SizeLimit | None = None) -> Checkpoint:
    if limit is not None:  # before get_tensor copies anything out of the file
        declared = _safetensors_bytes(path)
        if declared is not None:
            _check_limit(path, declared, limit)
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            stored = f.metadata() or {}
            state_dict = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise FerflowError(f"{path} is not a readable .safetensors file ({exc})") from exc
    # Files written by to_safetensors carry the source's meta as strings.
    meta: dict[str, Any] = {"format": "safetensors", **{k: stored.get(k) for k in MODULE_META_KEYS}}
    meta["bn_eps"] = float(meta["bn_eps"]) if meta["bn_eps"] else None
    meta["source_sha256"] = stored.get("source_sha256") or sha
    return Checkpoint(_own(state_dict), meta)


def _fingerprint(path: Path) -> tuple[bytes, str]:
    """First bytes (to tell the format) and sha256 of a file."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            head = f.read(16)
            digest.update(head)
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise FerflowError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from exc
    if not head:
        raise FerflowError(f"{path} is empty; download the checkpoint again")
    return head, digest.hexdigest()
