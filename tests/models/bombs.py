"""Small files that declare huge tensors: a torch.save()-shaped archive whose one storage
record is deflated zeros (a ~0.1% size file), or stored but sparse (holes on disk).

The pickle is what torch.save writes for ``{key: tensor}``: a ``_rebuild_tensor_v2`` call
on a persistent ``('storage', torch.FloatStorage, '0', 'cpu', numel)`` reference.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
import zlib
from pathlib import Path

import torch

CHUNK = 1 << 20


class _StorageRef:
    pass


class _Tensor:
    def __init__(self, numel: int) -> None:
        self.numel = numel

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (_StorageRef(), 0, (self.numel,), (1,), False,
                                                 collections.OrderedDict())


def data_pkl(key: str, numel: int) -> bytes:
    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", numel) if isinstance(obj, _StorageRef) else None

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump({key: _Tensor(numel)})
    return buffer.getvalue()


def small_records(key: str, numel: int) -> dict[str, bytes]:
    return {"archive/data.pkl": data_pkl(key, numel), "archive/byteorder": b"little", "archive/version": b"3\n"}


def write_deflated(path: Path, nbytes: int, key: str = "w") -> Path:
    """A storage record of `nbytes` zeros, deflated: the file is ~nbytes / 1000."""
    info = zipfile.ZipInfo("archive/data/0")
    info.compress_type = zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(path, "w") as z:
        for name, data in small_records(key, nbytes // 4).items():
            z.writestr(name, data)
        with z.open(info, "w", force_zip64=True) as record:
            zeros = bytes(CHUNK)
            for _ in range(nbytes // CHUNK):
                record.write(zeros)
    return path


def write_sparse(path: Path, nbytes: int, key: str = "w") -> Path:
    """A stored (uncompressed) record of `nbytes` zeros written as a hole: the file's size is
    > nbytes, the disk space it takes is a few KB. A plain zip, built by hand (no zip64:
    nbytes < 4 GiB)."""
    crc = 0
    zeros = bytes(CHUNK)
    for _ in range(nbytes // CHUNK):
        crc = zlib.crc32(zeros, crc)
    records = [*small_records(key, nbytes // 4).items(), ("archive/data/0", None)]
    central = b""
    with open(path, "wb") as f:
        for name, data in records:
            size = nbytes if data is None else len(data)
            crc_of = crc if data is None else zlib.crc32(data)
            offset = f.tell()
            encoded = name.encode()
            f.write(struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 0, 0, 0, crc_of, size, size, len(encoded), 0))
            f.write(encoded)
            if data is None:
                f.seek(size, 1)  # a hole: reads as zeros
            else:
                f.write(data)
            central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 0, 0, 0, crc_of, size, size,
                                   len(encoded), 0, 0, 0, 0, 0, offset) + encoded
        start = f.tell()
        f.write(central)
        f.write(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(records), len(records), len(central), start, 0))
    return path
