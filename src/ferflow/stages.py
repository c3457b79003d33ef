"""Stage entry points: the one implementation that the CLI, dvc.yaml and KFP components call."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import yaml

from ferflow.config import ArchiveSpec, Params, dump_params
from ferflow.errors import FerflowError


def select_archives(params: Params, names: Optional[Iterable[str]]) -> list[ArchiveSpec]:
    names = list(names or [])
    if not names:
        return params.data.specs
    return [params.data.archive(n) for n in names]


def fetch(params: Params, names: Optional[Iterable[str]] = None):
    """Download (or reuse) and verify the archives named in params."""
    from ferflow.data.sources import fetch_archive

    params.data.raw_dir.mkdir(parents=True, exist_ok=True)
    return [fetch_archive(spec, params.data.raw_dir, params.fetch) for spec in select_archives(params, names)]


def prepare(params: Params, names: Optional[Iterable[str]] = None):
    """Extract, validate and cache each dataset (manifest + report + uint8 caches)."""
    from ferflow.data.prepare import prepare_dataset

    return [
        prepare_dataset(spec, params.data.raw_dir, params.data.prepared_dir, params.prepare)
        for spec in select_archives(params, names)
    ]


def demo_data(params: Params, out_dir: Optional[Path] = None, params_out: Optional[Path] = None):
    """Generate the offline demo archives; optionally write a params file that uses them.

    The written params differ from the input only in `data.archives`, which then point at
    the generated files with their sha256, so the demo runs through the normal fetch path.
    """
    from ferflow.data.demo import demo_sources, generate_demo_archives

    out_dir = Path(out_dir or params.demo.out_dir)
    archives = generate_demo_archives(params.demo, out_dir)
    if params_out is not None:
        tree = dump_params(params)
        sources = demo_sources(archives)
        if params_out.parent.resolve() != Path.cwd().resolve():
            # Paths in a params file are read relative to where the stages run (its folder).
            base = params_out.parent.resolve()
            for src in sources:
                src["uri"] = _relative_to(Path(src["uri"]).resolve(), base)
        tree["data"]["archives"] = {src.pop("name"): src for src in sources}
        write_yaml_atomic(params_out, tree)
    return archives


def _relative_to(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


def write_yaml_atomic(path: Path, tree: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise FerflowError(f"cannot write {path}: {exc}") from None
