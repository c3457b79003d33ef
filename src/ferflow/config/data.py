"""Params sections for the data: archives and unions (data), downloads (fetch), preparing
them (prepare, with splits and the face detector) and the offline demo archives (demo)."""

from __future__ import annotations

import hashlib
import re
import urllib.parse
from pathlib import Path
from typing import Optional

from pydantic import Field, ValidationInfo, field_validator, model_validator

from ferflow.config.base import Frozen, optional_sha256, seed_field
from ferflow.errors import ConfigError

# Real archive names become directory names; keep them portable.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def uri_scheme(uri: str) -> str:
    """The lower-case scheme of a source URI; "" for a plain path."""
    return urllib.parse.urlsplit(uri).scheme.lower() if "://" in uri or uri.startswith("file:") else ""


def is_local_uri(uri: str) -> bool:
    """A local file or folder: a plain path or a file:// URI."""
    return uri_scheme(uri) in ("", "file")


class ArchiveSource(Frozen):
    """Where one archive lives and the digest it must have (a value of data.archives).

    A local source (a path or file://, a zip or a folder) may leave out sha256: `ferflow
    fetch` then records the digest of what it found (ferflow.data.digests) and holds every
    later fetch to it. A remote one must name it: its bytes are trusted only by it."""

    uri: str = Field(description="https://, Google Drive link, s3://bucket/key, file://, a path, or a local folder")
    sha256: Optional[str] = Field(default=None, validate_default=True,
                                  description="expected sha256 of the archive, 64 hex digits (optional for local)")
    size: Optional[int] = Field(default=None, ge=0, description="expected size in bytes (checked for remote sources)")
    images: Optional[int] = Field(default=None, ge=0, description="images it holds: sizes the pipeline's disks")

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, v: Optional[str], info: ValidationInfo) -> Optional[str]:
        uri = info.data.get("uri")
        if v is None and uri is not None and not is_local_uri(uri):
            raise ValueError("required for a remote uri (https, s3, Google Drive); only a local file or "
                             "folder may leave it out")
        return optional_sha256(v)


class ArchiveSpec(ArchiveSource):
    """An archive source with its dataset name (the key it has in data.archives)."""

    name: str

    def require_sha256(self) -> str:
        """The digest the archive must have: from params, or recorded by `ferflow fetch`."""
        if self.sha256 is None:
            raise ConfigError(f"data.archives.{self.name}.sha256: not in params and no digest recorded for this "
                              f"local source yet; run `ferflow fetch --dataset {self.name}` first")
        return self.sha256


class DataSettings(Frozen):
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
            return self.archive(name).require_sha256()
        joined = ",".join(f"{m}:{self.archive(m).require_sha256()}" for m in self.members(name))
        return hashlib.sha256(joined.encode()).hexdigest()

    @property
    def specs(self) -> list[ArchiveSpec]:
        return [ArchiveSpec(name=name, **src.model_dump()) for name, src in self.archives.items()]

    def archive(self, name: str) -> ArchiveSpec:
        if name not in self.archives:
            known = ", ".join(self.archives)
            raise ConfigError(f"no archive named {name!r} in data.archives (known: {known})")
        return ArchiveSpec(name=name, **self.archives[name].model_dump())


class FetchSettings(Frozen):
    retries: int = Field(default=4, ge=0, le=20, description="attempts after the first")
    backoff_s: float = Field(default=1.0, ge=0, description="first retry delay, doubled each time")
    max_backoff_s: float = Field(default=30.0, ge=0)
    timeout_s: float = Field(default=30.0, gt=0, description="connect/read timeout per request")
    chunk_bytes: int = Field(default=1 << 20, ge=1024)
    progress: bool = True


class SplitSettings(Frozen):
    """How splits are made when an archive lacks them (grouped by identity, stratified)."""

    val_fraction: float = Field(default=0.1, ge=0, lt=1, description="carved from train when no val split")
    eval_fraction: float = Field(default=0.2, ge=0, lt=1, description="used only when no split folders")
    seed: int = seed_field(13)


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


class DetectorSettings(Frozen):
    """MTCNN weights for prepare.face_crop=detect (and mask placement): facenet-pytorch's
    wheel on PyPI, pinned by sha256, downloaded once into the ferflow cache."""

    weights: str = Field(description="https URI, local path to the wheel, or a folder with pnet/rnet/onet.pt")
    sha256: Optional[str] = Field(default=None, description="verified when given")

    _hex = field_validator("sha256")(classmethod(lambda cls, v: optional_sha256(v)))


class PrepareSettings(Frozen):
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


class DemoSettings(Frozen):
    """Offline demo archives: procedurally drawn faces with visible expressions."""

    # Applied by `ferflow demo-data --params-out` besides pointing data.archives at the
    # generated archives: a tiny model and size so the quick start runs in minutes.
    overrides: list[str] = []

    out_dir: Path = Path("data/demo")
    images_per_class: int = Field(default=100, ge=3, le=100_000, description="per class per archive")
    image_size: int = Field(default=112, ge=32, le=512)
    eval_fraction: float = Field(default=0.25, gt=0, lt=1)
    seed: int = seed_field(0)
