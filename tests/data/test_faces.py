"""The face detector (MTCNN, real weights from the pinned wheel) and prepare's face crop."""

import http.server
import io
import json
import os
import threading
import zipfile
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from ferflow.config import DetectorSettings, FetchSettings, PrepareSettings, load_params
from ferflow.data import sources
from ferflow.data.faces import FaceDetector, detector_weights, read_weights_container
from ferflow.data.masks import FaceGeometry, draw_masks, random_looks
from ferflow.data.prepare import prepare_dataset
from ferflow.errors import ConfigError, FerflowError

REPO = Path(__file__).resolve().parents[2]
WHEEL = REPO / ".venv" / "assets" / "facenet_pytorch-2.6.0-py3-none-any.whl"
WHEEL_SHA256 = "ecb82b27beb226d106f2219efe8f829b01b87a8595badd01545679bdb9f19cca"
PORTRAIT = Path(matplotlib.__file__).parent / "mpl-data" / "sample_data" / "grace_hopper.jpg"


@pytest.fixture(scope="module")
def wheel() -> Path:
    if not WHEEL.is_file():
        pytest.fail(f"{WHEEL} is missing: `make install` (or `make assets`) downloads it from the package index")
    return WHEEL


@pytest.fixture(scope="module")
def detector(wheel) -> FaceDetector:
    return FaceDetector(read_weights_container(wheel))


@pytest.fixture(scope="module")
def portrait() -> np.ndarray:
    return np.asarray(Image.open(PORTRAIT).convert("RGB"))


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_finds_the_face_and_its_landmarks(detector, portrait):
    face = detector.find_face(portrait)
    assert face is not None and face.score > 0.95
    x0, y0, x1, y1 = face.box
    assert 120 < x1 - x0 < 260 and 0.8 < (y1 - y0) / (x1 - x0) < 1.5
    (lx, ly), (rx, ry), (nx, ny), (mlx, mly), (mrx, mry) = face.landmarks
    assert lx < nx < rx and mlx < mrx  # left/right in image order
    assert max(ly, ry) < ny < min(mly, mry)  # eyes above the nose, the nose above the mouth
    assert all(x0 <= px <= x1 and y0 <= py <= y1 for px, py in face.landmarks)


def test_finds_a_masked_face(detector, portrait):
    face = detector.find_face(portrait)
    h, w = portrait.shape[:2]
    points = torch.tensor(face.landmarks, dtype=torch.float32) / torch.tensor([w, h])
    for style in ("surgical", "cloth", "n95", "kn95"):
        look = random_looks(1, torch.device("cpu"), (style,), ("dark",), torch.Generator().manual_seed(1))
        image = torch.from_numpy(portrait.copy()).permute(2, 0, 1)[None].float()
        masked = draw_masks(image, FaceGeometry.from_five_points(points[None]), look)[0]
        found = detector.find_face(masked.round().byte().permute(1, 2, 0).numpy())
        assert found is not None and iou(found.box, face.box) > 0.5, style


def test_finds_a_small_face_in_a_large_frame(detector, portrait):
    face = detector.find_face(portrait)
    x0, y0, x1, y1 = (int(v) for v in face.box)
    small = Image.fromarray(portrait).crop((x0 - 20, y0 - 20, x1 + 20, y1 + 20)).resize((70, 80))
    frame = Image.new("RGB", (640, 480), (70, 90, 80))
    frame.paste(small, (480, 300))
    found = detector.find_face(np.asarray(frame))
    assert found is not None
    cx, cy = (found.box[0] + found.box[2]) / 2, (found.box[1] + found.box[3]) / 2
    assert 480 < cx < 550 and 300 < cy < 380


def test_no_face_in_a_plain_image(detector):
    assert detector.find_face(np.full((200, 200, 3), 127, dtype=np.uint8)) is None
    assert detector.detect(np.zeros((8, 8, 3), dtype=np.uint8)) == []


def test_weights_containers_are_checked(tmp_path, wheel):
    folder = tmp_path / "nets"
    folder.mkdir()
    with zipfile.ZipFile(wheel) as zf:
        for name in ("pnet", "rnet"):
            (folder / f"{name}.pt").write_bytes(zf.read(f"facenet_pytorch/data/{name}.pt"))
    with pytest.raises(FerflowError, match="no onet.pt inside"):
        read_weights_container(folder)
    (tmp_path / "junk.whl").write_bytes(os.urandom(256))
    with pytest.raises(FerflowError, match="must be a facenet-pytorch wheel"):
        read_weights_container(tmp_path / "junk.whl")


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_pickle_with_code_in_it_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "nets"
    folder.mkdir()
    for name in ("pnet", "rnet", "onet"):
        torch.save({"conv1.weight": Evil()}, folder / f"{name}.pt")
    with pytest.raises(FerflowError, match="not plain tensors"):
        read_weights_container(folder)
    assert not (tmp_path / "pwned").exists()


class _Server(http.server.ThreadingHTTPServer):
    def __init__(self, payload: bytes):
        self.payload, self.hits = payload, 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.hits += 1
                self.send_response(200)
                self.send_header("Content-Length", str(len(outer.payload)))
                self.end_headers()
                self.wfile.write(outer.payload)

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_weights_download_once_verified(tmp_path, monkeypatch, wheel):
    monkeypatch.setenv("FERFLOW_CACHE", str(tmp_path / "cache"))
    server = _Server(wheel.read_bytes())
    try:
        url = f"http://127.0.0.1:{server.server_port}/facenet_pytorch-2.6.0-py3-none-any.whl"
        settings = FetchSettings(progress=False, retries=0)
        path = detector_weights(DetectorSettings(weights=url, sha256=WHEEL_SHA256), settings)
        assert sources.sha256_file(path) == WHEEL_SHA256 and path.is_relative_to(tmp_path / "cache" / "detectors")
        assert detector_weights(DetectorSettings(weights=url, sha256=WHEEL_SHA256), settings) == path
        assert server.hits == 1
        bad = DetectorSettings(weights=url.replace(".whl", "-2.whl"), sha256="0" * 64)
        with pytest.raises(FerflowError, match="sha256 mismatch"):
            detector_weights(bad, settings)
        assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # nothing half-written kept
    finally:
        server.shutdown()


# ---------------------------------------------------------------------------- prepare.face_crop


def _framed_archive(path: Path, portrait: np.ndarray, n_faces: int, n_blank: int) -> list[tuple]:
    """An archive of the portrait's face pasted small at known places, plus faceless images."""
    rng = np.random.default_rng(0)
    face = Image.fromarray(portrait).crop((150, 90, 370, 370))
    truth = []
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(n_faces + n_blank):
            frame = Image.new("RGB", (250, 250), tuple(int(v) for v in rng.integers(40, 200, 3)))
            box = None
            if i < n_faces:
                side = int(rng.integers(70, 120))
                x, y = (int(v) for v in rng.integers(0, 250 - side, 2))
                frame.paste(face.resize((side, int(side * 280 / 220))).crop((0, 0, side, side)), (x, y))
                box = (x, y, x + side, y + side)
            split = "eval" if i % 4 == 0 else "train"
            label = ("negative", "neutral", "positive")[i % 3]
            name = f"D/{split}/{label}/img{i:03d}.jpg"
            buf = io.BytesIO()
            frame.save(buf, format="JPEG", quality=95)
            zf.writestr(name, buf.getvalue())
            truth.append((name, box))
    return truth


@pytest.mark.parametrize("workers", [1, 2])
def test_prepare_crops_detected_faces_and_falls_back(tmp_path, wheel, portrait, workers):
    raw = tmp_path / "raw"
    raw.mkdir()
    n_faces, n_blank = (60, 12) if workers == 2 else (12, 6)
    truth = dict(_framed_archive(raw / "D.zip", portrait, n_faces, n_blank))
    params = load_params(REPO / "params.yaml", [
        f'data.archives={{"D": {{"uri": "{raw / "D.zip"}", "sha256": "{sources.sha256_file(raw / "D.zip")}"}}}}',
        "data.unions={}", "prepare.image_sizes=[48]", "prepare.face_crop=detect:0.5", "prepare.face_margin=1.2",
        f"prepare.detector.weights={wheel}", f"prepare.workers={workers}", "prepare.split.val_fraction=0",
        "train.datasets=[D]",
    ])
    result = prepare_dataset(params.data.archive("D"), raw, tmp_path / "prepared", params.prepare, params.fetch)
    manifest = pd.read_parquet(result.out_dir / "manifest.parquet")
    report = json.loads((result.out_dir / "report.json").read_text())
    faces = manifest[manifest["path"].map(truth).notna()]
    blanks = manifest[manifest["path"].map(truth).isna()]
    assert (faces["face"] == "detected").mean() >= 0.9
    assert (blanks["face"] == "fallback").all()
    assert (blanks["crop_x1"] - blanks["crop_x0"] == 125).all()  # the centre half of 250 px
    hits = [iou((r.crop_x0, r.crop_y0, r.crop_x1, r.crop_y1), truth[r.path]) for r in faces.itertuples()
            if r.face == "detected"]
    assert np.median(hits) > 0.5
    assert report["face_crop"] == {"setting": "detect:0.5", "margin": 1.2,
                                   "counts": {k: int(v) for k, v in manifest["face"].value_counts().items()}}


def test_center_crop_caches_the_centre(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    image = np.zeros((100, 100, 3), dtype=np.uint8)
    image[25:75, 25:75] = 255  # a white centre half
    with zipfile.ZipFile(raw / "C.zip", "w") as zf:
        for i in range(24):
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="PNG")
            zf.writestr(f"C/{'eval' if i % 4 == 0 else 'train'}/{('negative', 'neutral', 'positive')[i % 3]}/p{i}.png",
                        buf.getvalue())
    params = load_params(REPO / "params.yaml", [
        f'data.archives={{"C": {{"uri": "{raw / "C.zip"}", "sha256": "{sources.sha256_file(raw / "C.zip")}"}}}}',
        "data.unions={}", "prepare.image_sizes=[16]", "prepare.face_crop=center:0.5", "prepare.workers=1",
        "prepare.split.val_fraction=0", "prepare.allow_duplicates_across_splits=true", "train.datasets=[C]",
    ])
    result = prepare_dataset(params.data.archive("C"), raw, tmp_path / "prepared", params.prepare)
    cache = np.load(result.out_dir / "cache/16/train.npy")
    assert cache.min() == 255  # only the white centre was cached
    manifest = pd.read_parquet(result.out_dir / "manifest.parquet")
    assert set(manifest["face"]) == {"center"} and (manifest["crop_x0"] == 25).all() and (manifest["crop_x1"] == 75).all()


@pytest.mark.parametrize("override, message", [
    ("prepare.face_crop=detect", None),
    ("prepare.face_crop=center:1.5", "prepare.face_crop"),
    ("prepare.face_crop=eyes", "prepare.face_crop"),
    ("prepare.face_margin=0.5", "prepare.face_margin"),
])
def test_face_crop_settings_are_checked(override, message):
    if message is None:
        assert load_params(REPO / "params.yaml", [override]).prepare.face_crop == "detect"
        with pytest.raises(ConfigError, match="prepare.detector"):
            load_params(REPO / "params.yaml", [override, "prepare.detector=null"])
        return
    with pytest.raises(ConfigError, match=message):
        load_params(REPO / "params.yaml", [override])


def test_prepare_settings_default_keeps_whole_images():
    assert PrepareSettings().face_crop == "none"
