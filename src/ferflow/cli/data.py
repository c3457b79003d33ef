"""The data commands: fetch and prepare the archives (dvc.yaml's first stages), generate
offline demo archives, and draw synthetic face masks on an archive."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ferflow import stages
from ferflow.commandline import out, params_loader
from ferflow.config import Params
from ferflow.errors import ConfigError

app = typer.Typer()  # merged into `ferflow` (ferflow.cli)

DatasetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--dataset", "-d", help="archive name from data.archives (repeatable; default: all)"),
]


@app.command()
@params_loader(example="fetch.retries=2")
def fetch(
    dataset: DatasetOpt = None,
    *,
    cfg: Params,
    dvc_lock: Annotated[Path, typer.Option(help="dvc.lock whose fetch@ entries pin archives by md5 "
                                                "(absent: no pins)")] = Path("dvc.lock"),
    dvc_remote: Annotated[str, typer.Option(help="DVC remote URL to fetch pinned archives from by md5 "
                                                 "(default: their params URI)")] = "",
) -> None:
    """Download the archives in data.archives into data.raw_dir, verified by sha256 and by
    the md5 dvc.lock pins (the same fetch as the KFP fetch task)."""
    results = stages.fetch(cfg, dataset, dvc_lock=dvc_lock, dvc_remote=dvc_remote)
    table = Table("archive", "bytes", "sha256", "action")
    for r in results:
        action = "downloaded" + (" (DVC remote)" if r.from_dvc_remote else "") if r.downloaded else "verified, reused"
        table.add_row(r.name, f"{r.size:,}", r.sha256[:16] + "…", action)
    out.print(table)
    for r in results:
        if r.record is not None:  # a local source without sha256 in params: its digest, in full
            out.print(f"{r.name}: no sha256 in params; content sha256 {r.sha256}, recorded in {r.record} and "
                      "checked on every fetch", markup=False, highlight=False, soft_wrap=True)


@app.command()
@params_loader(example="prepare.image_sizes=[112]")
def prepare(dataset: DatasetOpt = None, *, cfg: Params) -> None:
    """Extract safely, validate images, write manifest + report + uint8 caches per dataset."""
    results = stages.prepare(cfg, dataset)
    table = Table("dataset", "images", "quarantined", "images/s", "output")
    for r in results:
        table.add_row(r.dataset, str(r.n_images), str(r.n_quarantined), f"{r.images_per_s:,.0f}", str(r.out_dir))
    out.print(table)


@app.command("demo-data")
@params_loader(example="demo.images_per_class=200")
def demo_data(
    out_dir: Annotated[
        Optional[Path], typer.Option("--out", help="directory for the archives (default: demo.out_dir)")
    ] = None,
    params_out: Annotated[
        Optional[Path],
        typer.Option("--params-out", help="also write a params file whose data.archives use the demo archives"),
    ] = None,
    *,
    cfg: Params,
) -> None:
    """Generate three small offline demo archives (faces / masked / masked face-cut)."""
    archives = stages.demo_data(cfg, out_dir, params_out)
    table = Table("archive", "images", "bytes", "sha256")
    for a in archives:
        table.add_row(str(a.path), str(a.n_images), f"{a.size:,}", a.sha256)
    out.print(table)
    if params_out is not None:
        out.print(f"params using them: {params_out}")


def _names(values: Optional[list[str]]) -> list[str]:
    """Repeatable options that also take comma lists: --style surgical,cloth --style n95."""
    return [v.strip() for value in values or [] for v in value.split(",") if v.strip()]


def _face_box(text: str) -> tuple[float, ...]:
    """--face-box x0,y0,x1,y1 as fractions of the image."""
    try:
        box = tuple(float(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4 or not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
        raise ConfigError(f"--face-box {text!r}: expected x0,y0,x1,y1 with 0 <= x0 < x1 <= 1, 0 <= y0 < y1 <= 1")
    return box


@app.command("synthesize-masks")
@params_loader(example="data.raw_dir=/mnt/raw")
def synthesize_masks(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="archive name from data.archives (fetched)")],
    out_zip: Annotated[Path, typer.Option("--out", help="masked archive to write (FILE.zip; face-cut: FILE-face-cut.zip)")],
    style: Annotated[Optional[list[str]], typer.Option(
        "--style", help="surgical, cloth, n95, kn95 (repeatable or comma list; default: all)")] = None,
    colour: Annotated[Optional[list[str]], typer.Option(
        "--colour", help="plain, dark, coloured, patterned (repeatable or comma list; default: all)")] = None,
    seed: Annotated[int, typer.Option("--seed", help="same seed, same masks")] = 0,
    placement: Annotated[str, typer.Option(
        "--placement", help="auto (detector landmarks when prepare.detector is set, else geometry), landmarks, "
        "geometry")] = "auto",
    face_box: Annotated[str, typer.Option(
        "--face-box", help="where faces are when no landmarks are found: x0,y0,x1,y1 as fractions of the image")]
    = "0,0,1,1",
    face_cut: Annotated[bool, typer.Option("--face-cut/--no-face-cut", help="also write the face-cut variant")] = True,
    *,
    cfg: Params,
) -> None:
    """Draw synthetic face masks on every image of an archive (masked and face-cut archives)."""
    box = _face_box(face_box)
    try:
        result = stages.synthesize_masks(cfg, dataset, out_zip, _names(style), _names(colour), seed, placement, box,
                                         face_cut)
    except ValueError as exc:  # unknown style or colour names
        raise ConfigError(str(exc)) from None
    table = Table("archive", "images", "sha256")
    for path, digest in result.sha256().items():
        table.add_row(path, str(result.n_images), digest)
    out.print(table)
    out.print("mask placement: " + ", ".join(f"{k} {v}" for k, v in sorted(result.placement.items()))
              + (f"; {len(result.skipped)} undecodable image(s) skipped" if result.skipped else ""))
