"""Draw the README's grid of synthetic masks: every style x colour on one portrait, placed by
the face detector's landmarks, plus the face-cut variant of each style.

    python scripts/mask_examples.py [--out docs/masks.png]

The portrait is matplotlib's public-domain sample photo of Grace Hopper (US Navy), so the
figure needs no data set. Needs the detector weights (`make assets`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib
import numpy as np
import torch
from PIL import Image, ImageDraw

from ferflow.data.faces import FaceDetector, read_weights_container
from ferflow.data.masks import COLOURS, STYLES, FaceGeometry, draw_masks, random_looks
from ferflow.data.synthesize import face_cut_image

REPO = Path(__file__).resolve().parents[1]
TILE = 150


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "masks.png")
    ap.add_argument("--weights", type=Path, default=REPO / ".venv" / "assets" / "facenet_pytorch-2.6.0-py3-none-any.whl")
    args = ap.parse_args()
    photo = np.asarray(Image.open(Path(matplotlib.__file__).parent / "mpl-data/sample_data/grace_hopper.jpg")
                       .convert("RGB"))
    face = FaceDetector(read_weights_container(args.weights)).find_face(photo)
    h, w = photo.shape[:2]
    points = torch.tensor(face.landmarks, dtype=torch.float32) / torch.tensor([w, h], dtype=torch.float32)
    geometry = FaceGeometry.from_five_points(points[None])
    x0, y0, x1, y1 = face.box
    side = 1.6 * max(x1 - x0, y1 - y0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2 + 0.1 * side
    crop = tuple(int(v) for v in (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))

    rows = len(COLOURS) + 1
    grid = Image.new("RGB", (TILE * (len(STYLES) + 1), TILE * rows + 24 * rows), "white")
    pen = ImageDraw.Draw(grid)
    image = torch.from_numpy(photo.copy()).permute(2, 0, 1)[None].float()
    for r, colour in enumerate(COLOURS + ("face-cut",)):
        top = r * (TILE + 24)
        pen.text((6, top + TILE // 2), colour, fill="black")
        for c, style in enumerate(STYLES):
            look = random_looks(1, torch.device("cpu"), (style,), (colour if colour != "face-cut" else "plain",),
                                torch.Generator().manual_seed(11 * r + c))
            drawn = draw_masks(image, geometry, look)[0].round().byte().permute(1, 2, 0).numpy()
            tile = Image.fromarray(face_cut_image(drawn, geometry) if colour == "face-cut" else drawn)
            tile = tile if colour == "face-cut" else tile.crop(crop)
            grid.paste(tile.resize((TILE, TILE), Image.LANCZOS), ((c + 1) * TILE, top + 20))
            if r == 0:
                pen.text(((c + 1) * TILE + 6, 4), style, fill="black")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out, optimize=True)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
