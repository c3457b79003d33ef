"""Read model checkpoints without running any code named in them.

HSEmotion ships whole pickled timm models (``torch.save(model)``) written by timm 0.4.5, 0.6.x
and 0.9.7, whose class paths current timm lacks (shared/design/FACTS.md, "HSEmotion
checkpoints"). A restricted unpickler resolves only tensor-rebuild functions, storages, dtypes
and plain containers, turns every ``timm.*``/``torch.nn.*`` class into an inert placeholder and
refuses anything else; the placeholders' tensors are then named as ``model.state_dict()`` would,
ready for ``load_state_dict(strict=True)`` into a model built fresh by current timm.

Sizes are checked before any tensor byte is read: unpickling only records the storages the
pickle declares (tensors are built on the meta device), then the storages the state_dict
uses must fit the file (a torch.save() archive stores them uncompressed; a deflated record
may expand at most _MAX_EXPANSION times) and the caller's SizeLimit (derived from the model
being loaded), and only then are they read, one at a time.
"""

from __future__ import annotations

import _compat_pickle
import builtins
import collections
import hashlib
import io
import json
import pickle
import struct
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import safetensors
import safetensors.torch
import torch

from ferflow.errors import FerflowError
from ferflow.fileio import atomic_path

_PLACEHOLDER_PACKAGES = ("timm", "torch.nn")
_STORAGE_MODULES = ("torch", "torch.storage", "torch.cuda")  # torch<2 named GPU storages torch.cuda.*
_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "UntypedStorage": torch.uint8, "ByteStorage": torch.uint8, "CharStorage": torch.int8,
    "ShortStorage": torch.int16, "IntStorage": torch.int32, "LongStorage": torch.int64,
    "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of the pre-1.6 (non-zip) torch format
_MODULE_META_KEYS = ("root_class", "pool_type", "stem_class", "bn_eps", "timm_module_layout")
_NESTED_KEYS = ("state_dict", "model_state_dict", "model")
# torch.save() writes tensors uncompressed, so their bytes are in the file; torch.load also
# reads a re-zipped (deflated) archive, but weights barely compress. Declared bytes beyond
# this expansion of the file's size can only be a decompression bomb.
_MAX_EXPANSION = 16
_EXPANSION_SLACK = 1 << 20  # tiny archives of zero tensors compress well and are harmless
_MAX_PICKLE_BYTES = 64 << 20  # data.pkl describes tensors, it does not hold them
_READ_CHUNK = 8 << 20


@dataclass(frozen=True)
class SizeLimit:
    """The most tensor bytes a checkpoint may hold, checked before any of them is read."""

    max_bytes: int
    reason: str  # what the cap was derived from, for the error message

    @classmethod
    def for_model(cls, model_bytes: int, name: str) -> SizeLimit:
        # Room for another head (ImageNet's 1000 classes), float64 copies and extra buffers,
        # and a floor for tiny models; a checkpoint beyond it is not for this model.
        return cls(4 * model_bytes + (64 << 20), f"model {name} has {_mib(model_bytes)} of weights")


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
        obj = _unpickle_zip(path)
    elif path.suffix == ".safetensors" or head[8:9] == b"{":
        return _read_safetensors(path, sha, limit)
    elif head[:1] == b"\x80":
        obj = _unpickle_raw(path)
    else:
        raise FerflowError(f"{path} is not a checkpoint: expected a torch.save() archive or .safetensors")
    try:
        state_dict, meta = _extract(obj, path)
    except (AttributeError, TypeError, RecursionError) as exc:  # malformed module state
        raise FerflowError(f"{path} is corrupt: unexpected module state ({exc})") from exc
    state_dict = _materialise(strip_prefixes(state_dict), path, limit)
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


# --- the restricted unpickler -------------------------------------------------------------


class _Placeholder:
    """Stands in for a model class: records the pickled state, has no behaviour."""

    qualified_name: ClassVar[str] = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Placeholder:
        obj = super().__new__(cls)
        obj.state = {}
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (__dict__, __slots__ state)
            state = {**(state[0] or {}), **(state[1] or {})}
        self.state = state if isinstance(state, dict) else {}


@lru_cache(maxsize=None)
def _placeholder(qualified_name: str) -> type[_Placeholder]:
    return type(qualified_name.rsplit(".", 1)[-1], (_Placeholder,), {"qualified_name": qualified_name})


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


@dataclass(eq=False)
class _Storage:
    """One archive record as the pickle declares it; its bytes are read only by _materialise."""

    record: str  # name in the zip
    nbytes: int  # numel x itemsize, as declared
    dtype: torch.dtype  # from the storage type; v3 tensors name their own
    big_endian: bool

    def read(self, archive: zipfile.ZipFile) -> torch.Tensor:
        raw = bytearray(self.nbytes)
        got = 0
        with archive.open(self.record) as f:
            # In chunks: a zip member's readinto() reads the whole request into a temporary
            # bytes first, which would double the peak memory of a large storage.
            while got < self.nbytes:
                chunk = f.read(min(_READ_CHUNK, self.nbytes - got))
                if not chunk:
                    raise pickle.UnpicklingError(f"storage {self.record} is truncated")
                raw[got:got + len(chunk)] = chunk
                got += len(chunk)
        return torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)

    def typed(self, raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.big_endian and dtype.itemsize > 1:
            raw = raw.view(-1, dtype.itemsize).flip(1).reshape(-1)
        return raw.view(dtype)


_SOURCE = "_ferflow_source"  # attribute of a meta tensor: (its _Storage, element offset)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> torch.Tensor:
    """torch._utils._rebuild_tensor_v2 and _v3 (v3: dtypes without a typed storage, dtype 7th),
    as a meta tensor: shape, stride and dtype, no memory; _materialise fills it in."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("tensor without a storage")
    dtype = rest[2] if len(rest) > 2 and isinstance(rest[2], torch.dtype) else storage.dtype
    size, stride = tuple(size), tuple(stride)
    if not (_naturals(size) and _naturals(stride) and _naturals((offset,)) and len(size) == len(stride)):
        raise pickle.UnpicklingError(f"bad tensor geometry: size {size!r:.60}, stride {stride!r:.60}")
    # The elements it spans must lie inside its storage (as_strided would check too late).
    end = 0 if 0 in size else offset + 1 + sum((n - 1) * st for n, st in zip(size, stride))
    if end * dtype.itemsize > storage.nbytes:
        raise pickle.UnpicklingError(f"a tensor reaches past the end of storage {storage.record}")
    tensor = torch.empty_strided(size, stride, dtype=dtype, device="meta")
    setattr(tensor, _SOURCE, (storage, offset))
    return tensor


def _naturals(values: tuple) -> bool:
    return all(type(v) is int and v >= 0 for v in values)


def _rebuild_parameter(data: Any, *_: Any) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("parameter without a tensor")
    return data


# Every callable a pickle can reach is one of these, a dtype or a placeholder: all inert.
_ALLOWED: dict[str, Any] = {
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "collections.OrderedDict": collections.OrderedDict,
    "torch.Size": torch.Size,
    "torch.device": torch.device,
    **{f"builtins.{name}": getattr(builtins, name) for name in ("set", "frozenset", "complex", "slice")},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only _ALLOWED, storages, dtypes and placeholders; storages come from `archive`."""

    def __init__(
        self, source: Path, data: bytes, archive: zipfile.ZipFile | None = None, root: str = ""
    ) -> None:
        super().__init__(io.BytesIO(data))
        self._source, self._archive, self._root = source, archive, root
        self._big_endian = archive is not None and f"{root}byteorder" in archive.namelist() and (
            archive.open(f"{root}byteorder").read(16) == b"big"
        )
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        # Protocol-2 pickles use Python 2 names (the HSEmotion files say "__builtin__.set");
        # map them as pickle's own fix_imports does, so allow-list and messages see one spelling.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        qualified = f"{module}.{name}"
        if qualified in _ALLOWED:
            return _ALLOWED[qualified]
        if module in _STORAGE_MODULES and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and isinstance(vars(torch).get(name), torch.dtype):  # vars: no lazy imports
            return vars(torch)[name]
        if any(module == pkg or module.startswith(pkg + ".") for pkg in _PLACEHOLDER_PACKAGES):
            return _placeholder(qualified)
        raise FerflowError(
            f"refusing to load {self._source}: it references {qualified}, which is not a tensor "
            "or a known model class; the file may be malicious, get it from a trusted source"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        # torch's zip format: ('storage', storage_type, key, location, numel). The location
        # ("cpu", "cuda:0", ...) is ignored: the bytes are in the archive, read onto the CPU.
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        if self._archive is None:
            raise pickle.UnpicklingError("tensors outside a torch archive")
        if not isinstance(storage_type, _StorageType) or type(numel) is not int or numel < 0:
            raise pickle.UnpicklingError(f"bad storage reference {pid!r:.80}")
        key = key.decode() if isinstance(key, bytes) else str(key)
        if key not in self._storages:
            record, nbytes = f"{self._root}data/{key}", numel * storage_type.dtype.itemsize
            try:
                info = self._archive.getinfo(record)
            except KeyError:
                raise pickle.UnpicklingError(f"storage {key} is missing") from None
            if info.file_size < nbytes:  # what the zip declares; nothing is read here
                raise pickle.UnpicklingError(f"storage {key} is truncated")
            self._storages[key] = _Storage(record, nbytes, storage_type.dtype, self._big_endian)
        return self._storages[key]

    def load(self) -> Any:
        try:
            return super().load()
        except FerflowError:
            raise
        except Exception as exc:  # any parse failure of untrusted bytes is the file's fault
            detail = f"{type(exc).__name__}: {exc}"
            raise FerflowError(f"{self._source} is not a readable checkpoint ({detail})") from exc


def _unpickle_zip(path: Path) -> Any:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if any(n.endswith("/constants.pkl") for n in names):
                raise FerflowError(f"{path} is TorchScript; save weights with torch.save(model.state_dict())")
            pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise FerflowError(f"{path} is a zip but not a torch.save() archive (no data.pkl)")
            root = pickles[0].removesuffix("data.pkl")
            info = archive.getinfo(pickles[0])
            if info.file_size > _MAX_PICKLE_BYTES:  # declared size: refused before it is inflated
                raise FerflowError(f"refusing to load {path}: its data.pkl declares {_mib(info.file_size)}, "
                                   f"more than the {_mib(_MAX_PICKLE_BYTES)} a checkpoint's pickle takes")
            return _RestrictedUnpickler(path, archive.read(pickles[0]), archive, root).load()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise FerflowError(f"{path} is a corrupt torch archive ({exc}); download it again") from exc


def _unpickle_raw(path: Path) -> Any:
    obj = _RestrictedUnpickler(path, path.read_bytes()).load()
    if isinstance(obj, int) and obj == _LEGACY_MAGIC:
        raise FerflowError(f"{path} uses torch's pre-1.6 format; re-save it with torch>=1.6 (zip format)")
    return obj


# --- from unpickled objects to a state_dict -------------------------------------------------


def _extract(obj: Any, path: Path, depth: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if isinstance(obj, _Placeholder):
        modules = dict(_walk(obj, "", path, ()))
        if not (state_dict := _flatten(modules)):
            raise FerflowError(f"{path} holds a pickled {obj.qualified_name} without any tensors")
        return state_dict, {"format": "pickled-module", **_module_meta(obj, modules)}
    if isinstance(obj, Mapping) and obj:
        if all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return dict(obj), {"format": "state_dict", **dict.fromkeys(_MODULE_META_KEYS)}
        for key in _NESTED_KEYS:
            if depth < 2 and key in obj:
                return _extract(obj[key], path, depth + 1)
    raise FerflowError(
        f"{path} holds neither a model nor a state_dict (looked for a module, a dict of tensors, "
        f"or one under {', '.join(_NESTED_KEYS)})"
    )


def _walk(
    node: _Placeholder, prefix: str, path: Path, ancestors: tuple[int, ...]
) -> Iterator[tuple[str, _Placeholder]]:
    """(dotted path, module) pairs in state_dict order; shared submodules appear at each path."""
    if id(node) in ancestors:
        raise FerflowError(f"{path} is corrupt: its module tree has a cycle at '{prefix}'")
    yield prefix, node
    for name, child in (node.state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, _Placeholder):
            raise FerflowError(f"{path} is corrupt: submodule '{prefix}{name}' is a {type(child).__name__}")
        yield from _walk(child, f"{prefix}{name}.", path, (*ancestors, id(node)))


def _flatten(modules: dict[str, _Placeholder]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for prefix, module in modules.items():
        skip = module.state.get("_non_persistent_buffers_set") or set()  # absent before torch 1.6
        tensors = [*(module.state.get("_parameters") or {}).items(),
                   *((k, v) for k, v in (module.state.get("_buffers") or {}).items() if k not in skip)]
        out.update((f"{prefix}{name}", t) for name, t in tensors if isinstance(t, torch.Tensor))
    return out


def _module_meta(root: _Placeholder, modules: dict[str, _Placeholder]) -> dict[str, Any]:
    def named(leaf: str) -> list[_Placeholder]:
        return [m for p, m in modules.items() if p.rstrip(".").rsplit(".", 1)[-1] == leaf]

    pools = [m.state["pool_type"] for m in named("global_pool") if isinstance(m.state.get("pool_type"), str)]
    stems = named("conv_stem")
    # bn1 (after the stem) first, else the first module that looks like a batch norm.
    norms = [m for m in named("bn1") if "eps" in m.state] + [
        m for m in modules.values() if "eps" in m.state and "running_mean" in (m.state.get("_buffers") or {})
    ]
    classes = {m.qualified_name for m in modules.values()}
    layout = None
    if any(c.startswith(("timm.models.layers.", "timm.models.efficientnet_blocks.")) for c in classes):
        layout = "0.4/0.6"
    elif any(c.startswith(("timm.layers.", "timm.models._")) for c in classes):
        layout = "0.9"
    return {
        "root_class": root.qualified_name,
        "pool_type": pools[0] if pools else None,
        "stem_class": stems[0].qualified_name.rsplit(".", 1)[-1] if stems else None,
        "bn_eps": float(norms[0].state["eps"]) if norms else None,
        "timm_module_layout": layout,
    }


def _materialise(
    state_dict: dict[str, torch.Tensor], path: Path, limit: SizeLimit | None
) -> dict[str, torch.Tensor]:
    """Check the storages the state_dict uses against the file and `limit`, then read them."""
    by_storage: dict[_Storage, list[str]] = {}
    for key, tensor in state_dict.items():
        storage, _ = getattr(tensor, _SOURCE)
        by_storage.setdefault(storage, []).append(key)
    declared = sum(s.nbytes for s in by_storage)
    on_disk = path.stat().st_size
    if declared > max(_MAX_EXPANSION * on_disk, _EXPANSION_SLACK):
        raise FerflowError(
            f"refusing to load {path}: its tensors declare {_mib(declared)} but the file is {_mib(on_disk)} "
            f"(compressed {declared / max(on_disk, 1):.0f}x, which torch.save() never does): a decompression bomb "
            "or a damaged file; get it from a trusted source")
    _check_limit(path, declared, limit)
    out: dict[str, torch.Tensor] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for storage, keys in by_storage.items():  # one storage in memory at a time
                raw = storage.read(archive)
                for key in keys:
                    meta = state_dict[key]
                    _, offset = getattr(meta, _SOURCE)
                    view = storage.typed(raw, meta.dtype).as_strided(meta.shape, meta.stride(), offset)
                    # A tensor alone on its whole storage is kept as is; views of shared storages
                    # are copied (safetensors refuses shared memory).
                    whole = len(keys) == 1 and offset == 0 and view.is_contiguous() and (
                        view.numel() * view.element_size() == storage.nbytes)
                    out[key] = view if whole else view.clone(memory_format=torch.contiguous_format)
                del raw
    except (zipfile.BadZipFile, OSError, EOFError, pickle.UnpicklingError, RuntimeError, zlib.error) as exc:
        raise FerflowError(f"{path} is a corrupt torch archive ({exc}); download it again") from exc
    return out


def _check_limit(path: Path, declared: int, limit: SizeLimit | None) -> None:
    if limit is not None and declared > limit.max_bytes:
        raise FerflowError(
            f"refusing to load {path}: its tensors take {_mib(declared)}, more than the {_mib(limit.max_bytes)} "
            f"allowed ({limit.reason}); it is not a checkpoint of this model, or a crafted file")


def _mib(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.1f} MiB"


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
            if length > _MAX_PICKLE_BYTES:
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
    meta: dict[str, Any] = {"format": "safetensors", **{k: stored.get(k) for k in _MODULE_META_KEYS}}
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
