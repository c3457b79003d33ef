"""Unpickle torch.save() files without running any code named in them.

A restricted unpickler resolves only tensor-rebuild functions, storages, dtypes and plain
containers, turns every ``timm.*``/``torch.nn.*`` class into an inert Placeholder (HSEmotion
ships whole pickled timm models whose class paths current timm lacks) and refuses anything
else. Unpickling reads no tensor bytes: it only records the storages the pickle declares and
builds every tensor on the meta device. Once the caller has checked `declared_bytes`,
`materialise` reads the storages, one at a time, into real CPU tensors.
"""

from __future__ import annotations

import _compat_pickle
import builtins
import collections
import io
import pickle
import zipfile
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import torch

from ferflow.errors import FerflowError

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
MAX_PICKLE_BYTES = 64 << 20  # data.pkl describes tensors, it does not hold them
_READ_CHUNK = 8 << 20


def mib(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.1f} MiB"


class Placeholder:
    """Stands in for a model class: records the pickled state, has no behaviour."""

    qualified_name: ClassVar[str] = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:
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
def _placeholder(qualified_name: str) -> type[Placeholder]:
    return type(qualified_name.rsplit(".", 1)[-1], (Placeholder,), {"qualified_name": qualified_name})


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


@dataclass(eq=False)
class _Storage:
    """One archive record as the pickle declares it; its bytes are read only by materialise."""

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
    as a meta tensor: shape, stride and dtype, no memory; materialise fills it in."""
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


def unpickle_zip(path: Path) -> Any:
    """The object a torch.save() (zip) archive holds, its tensors on the meta device."""
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
            if info.file_size > MAX_PICKLE_BYTES:  # declared size: refused before it is inflated
                raise FerflowError(f"refusing to load {path}: its data.pkl declares {mib(info.file_size)}, "
                                   f"more than the {mib(MAX_PICKLE_BYTES)} a checkpoint's pickle takes")
            return _RestrictedUnpickler(path, archive.read(pickles[0]), archive, root).load()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise FerflowError(f"{path} is a corrupt torch archive ({exc}); download it again") from exc


def unpickle_raw(path: Path) -> Any:
    """The object a bare pickle holds (tensors need an archive, so it has none)."""
    obj = _RestrictedUnpickler(path, path.read_bytes()).load()
    if isinstance(obj, int) and obj == _LEGACY_MAGIC:
        raise FerflowError(f"{path} uses torch's pre-1.6 format; re-save it with torch>=1.6 (zip format)")
    return obj


def _by_storage(state_dict: dict[str, torch.Tensor]) -> dict[_Storage, list[str]]:
    by_storage: dict[_Storage, list[str]] = {}
    for key, tensor in state_dict.items():
        storage, _ = getattr(tensor, _SOURCE)
        by_storage.setdefault(storage, []).append(key)
    return by_storage


def declared_bytes(state_dict: dict[str, torch.Tensor]) -> int:
    """Bytes of the storages an unpickled state_dict's tensors use, each storage once."""
    return sum(s.nbytes for s in _by_storage(state_dict))


def materialise(state_dict: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Read the storages of an unpickled state_dict from the archive at `path` into CPU tensors;
    the caller checks `declared_bytes` first."""
    out: dict[str, torch.Tensor] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for storage, keys in _by_storage(state_dict).items():  # one storage in memory at a time
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
