"""Data-layer benchmarks (issue 2), measured side by side in one run.

B1 prepare throughput: `ferflow prepare` images/s on the stand-in archives, beside a bare
   PIL decode+resize loop over the same files (the floor any prepare must pay).
B2 loader throughput: the uint8 cache loader vs torchvision ImageFolder + PIL
   Resize/ToTensor/Normalize over the same extracted images at the same size, same batch,
   same worker count (0 and 2). Goal: >= 10x.

    python benchmarks/bench_data.py [--standin DIR] [--size 224] [--images 3000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from ferflow import stages
from ferflow.config import load_params
from ferflow.data.loader import make_loader
from ferflow.data.sources import archives_from_checksums

REPO = Path(__file__).resolve().parents[1]
DEFAULT_STANDIN = REPO.parent / "shared" / "datasets" / "lfw-emotion-standin"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def standin_overrides(standin: Path) -> list[str]:
    """--set overrides that point data.archives at the stand-in zips and their SHA256SUMS."""
    entries = archives_from_checksums(standin / "SHA256SUMS")
    return [f"data.archives={json.dumps(entries)}"]


def bare_decode_resize(files: list[Path], size: int) -> float:
    start = time.perf_counter()
    for path in files:
        with Image.open(path) as img:
            img.convert("RGB").resize((size, size), Image.BILINEAR)
    return len(files) / (time.perf_counter() - start)


def imagefolder_loader(root: Path, size: int, batch: int, workers: int):
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    ds = datasets.ImageFolder(str(root), transform=tf)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers)


def images_per_s(loader, limit: int, normalise: bool = False) -> float:
    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD).view(1, 3, 1, 1) * 255
    seen = 0
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    start = time.perf_counter()
    for images, _ in it:
        if normalise:
            images = (images.float() - mean) / std
        seen += len(images)
        if seen >= limit:
            break
    return seen / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--standin", type=Path, default=Path(os.environ.get("FERFLOW_STANDIN", DEFAULT_STANDIN)))
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--images", type=int, default=3000, help="images per loader measurement")
    ap.add_argument("--keep", type=Path, help="work directory to keep (default: a temp dir)")
    args = ap.parse_args()
    if not (args.standin / "SHA256SUMS").is_file():
        print(f"stand-in archives not found at {args.standin} (set --standin or FERFLOW_STANDIN)")
        return 2
    torch.set_num_threads(os.cpu_count() or 1)
    work = args.keep or Path(tempfile.mkdtemp(prefix="ferflow-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    overrides = standin_overrides(args.standin) + [
        f"data.raw_dir={work / 'raw'}", f"data.prepared_dir={work / 'prepared'}",
        f"prepare.image_sizes=[{args.size}]", "fetch.progress=false",
    ]
    params = load_params(REPO / "params.yaml", overrides)
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}")
    stages.fetch(params)

    print(f"\nB1 prepare throughput at {args.size}px (stand-in archives)")
    print(f"{'dataset':<22}{'images':>8}{'prepare img/s':>15}{'bare PIL img/s':>16}{'ratio':>8}")
    for result in stages.prepare(params):
        extracted = work / "extracted" / result.dataset
        if not extracted.exists():
            shutil.unpack_archive(work / "raw" / f"{result.dataset}.zip", extracted)
        files = sorted(p for p in extracted.rglob("*.jpg") if "__MACOSX" not in p.parts)
        bare = bare_decode_resize(files, args.size)
        print(f"{result.dataset:<22}{result.n_images:>8}{result.images_per_s:>15,.0f}{bare:>16,.0f}"
              f"{result.images_per_s / bare:>8.2f}")

    print(f"\nB2 loader throughput, LFW-FER train, {args.size}px, batch {args.batch}, {args.images} images")
    train_root = next((work / "extracted" / "LFW-FER").rglob("train"))
    cache_dir = work / "prepared" / "LFW-FER"
    print(f"{'workers':>7}{'ImageFolder img/s':>19}{'cache uint8 img/s':>19}{'ratio':>8}"
          f"{'cache+norm img/s':>18}{'ratio':>8}")
    for workers in (0, 2):
        ref = images_per_s(imagefolder_loader(train_root, args.size, args.batch, workers), args.images)
        mk = lambda: make_loader(cache_dir, "train", args.size, args.batch, shuffle=True, workers=workers)  # noqa: E731
        ours = images_per_s(mk(), args.images)
        ours_norm = images_per_s(mk(), args.images, normalise=True)
        print(f"{workers:>7}{ref:>19,.0f}{ours:>19,.0f}{ours / ref:>8.1f}{ours_norm:>18,.0f}{ours_norm / ref:>8.1f}")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
