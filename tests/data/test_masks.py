"""Synthetic face masks: where they are drawn, what they look like, and the archive writer."""

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ferflow import cli, stages
from ferflow.config import load_params
from ferflow.data.masks import COLOURS, STYLES, FaceGeometry, draw_masks, mask_batch, random_looks

REPO = Path(__file__).resolve().parents[2]


def faces(n=8, size=96, gray=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1 if gray else 3, size, size, generator=g) * 200 + 20
    return x.expand(n, 3, size, size).clone() if gray else x


def look(style: str, colour: str, n=1, seed=0):
    return random_looks(n, torch.device("cpu"), (style,), (colour,), torch.Generator().manual_seed(seed))


def whole_image(n):
    return FaceGeometry.from_boxes(torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(n, 4))


@pytest.mark.parametrize("style", STYLES)
def test_each_style_covers_the_lower_face_and_leaves_the_eyes(style):
    x = faces(1)
    out = draw_masks(x, whole_image(1), look(style, "plain"))
    changed = (out - x).abs().amax(1)[0] > 1
    rows = changed.float().mean(1)  # share of each row covered
    eyes_row, mouth_row = int(0.38 * 96), int(0.79 * 96)
    assert rows[:eyes_row].max() == 0, "nothing is drawn above the eyes"
    for eye_x in (0.31, 0.69):  # the eyes themselves stay visible (a nose bridge may rise between them)
        window = changed[eyes_row - 4: eyes_row + 4, int((eye_x - 0.08) * 96): int((eye_x + 0.08) * 96)]
        assert not window.any()
    assert rows[mouth_row] > 0.5, "the mouth is covered"
    assert changed[:, :5].float().mean() < 0.2 and changed[:, -5:].float().mean() < 0.2  # not edge to edge


def test_styles_and_colours_look_different():
    x = torch.full((1, 3, 96, 96), 128.0)
    x[:, 0] += 10  # a colour image: grey ones get grey masks
    drawn = {(s, c): draw_masks(x, whole_image(1), look(s, c)) for s in STYLES for c in COLOURS}
    flat = [v.flatten() for v in drawn.values()]
    for i in range(len(flat)):
        for j in range(i + 1, len(flat)):
            assert (flat[i] - flat[j]).abs().mean() > 0.5, "two style/colour pairs render the same"


def test_grey_images_get_grey_masks_and_colour_images_colour():
    gray = draw_masks(faces(1, gray=True), whole_image(1), look("cloth", "coloured"))
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    colour = draw_masks(faces(1), whole_image(1), look("cloth", "coloured"))
    assert not torch.equal(colour[:, 0], colour[:, 1])


def test_landmarks_place_the_mask_where_the_face_is():
    """A small face low and right in a large frame: the mask follows its landmarks."""
    x = torch.full((1, 3, 200, 200), 100.0)
    points = torch.tensor([[[130, 120], [160, 120], [145, 138], [135, 152], [155, 152]]], dtype=torch.float32) / 200
    out = draw_masks(x, FaceGeometry.from_five_points(points), look("surgical", "dark"))
    ys, xs = torch.nonzero((out - x).abs().amax(1)[0] > 1, as_tuple=True)
    assert 120 < ys.float().mean() < 175 and 125 < xs.float().mean() < 165
    assert ys.min() > 118


def test_mask_batch_probability_and_selection():
    x = faces(64)
    torch.manual_seed(0)
    assert torch.equal(mask_batch(x, 0.0), x)
    out = mask_batch(x, 1.0)
    assert all(not torch.equal(out[i], x[i]) for i in range(64))
    torch.manual_seed(1)
    half = mask_batch(x, 0.5)
    masked = sum(not torch.equal(half[i], x[i]) for i in range(64))
    assert 16 < masked < 48
    kept = [i for i in range(64) if torch.equal(half[i], x[i])]
    assert kept, "unselected images come back untouched"


def test_mask_batch_is_reproducible_with_the_torch_seed():
    x = faces(16)
    torch.manual_seed(7)
    a = mask_batch(x, 0.5)
    torch.manual_seed(7)
    b = mask_batch(x, 0.5)
    assert torch.equal(a, b)


def test_unknown_style_is_refused():
    with pytest.raises(ValueError, match="unknown mask style"):
        random_looks(2, torch.device("cpu"), styles=("surgical", "balaclava"))


# ---------------------------------------------------------------------------- synthesize-masks


@pytest.fixture(scope="module")
def demo_archives(tmp_path_factory):
    ws = tmp_path_factory.mktemp("masks-ws")
    base = load_params(REPO / "params.yaml", [
        f"demo.out_dir={ws / 'archives'}", "demo.images_per_class=20", "demo.image_size=64",
        f"data.raw_dir={ws / 'raw'}", f"data.prepared_dir={ws / 'prepared'}", "prepare.image_sizes=[32]",
        "prepare.workers=1", "fetch.progress=false", "demo.overrides=[]",
    ])
    params_file = ws / "params.yaml"
    stages.demo_data(base, params_out=params_file)
    stages.fetch(load_params(params_file), ["LFW-FER"])
    return params_file


def test_synthesize_masks_writes_masked_and_face_cut_archives_prepare_reads(demo_archives, tmp_path, capsys):
    out = tmp_path / "masked" / "LFW-FER-masked.zip"
    with pytest.raises(SystemExit) as done:
        cli.main(["synthesize-masks", "--dataset", "LFW-FER", "--out", str(out), "--style", "surgical,n95",
                  "--colour", "dark", "--colour", "patterned", "--placement", "geometry", "--params",
                  str(demo_archives)])
    assert done.value.code == 0
    cut = out.with_name("LFW-FER-masked-face-cut.zip")
    assert out.is_file() and cut.is_file()
    with zipfile.ZipFile(out) as zf:
        names = [n for n in zf.namelist() if n.endswith(".jpg")]
        sample = np.asarray(Image.open(io.BytesIO(zf.read(names[0]))))
    assert names and all(n.startswith("LFW-FER-masked/") for n in names)
    assert {n.split("/")[1] for n in names} == {"train", "eval"}
    assert "mask placement: geometry" in capsys.readouterr().out
    assert sample.shape[2] == 3

    from ferflow.fileio import sha256_file

    params = load_params(demo_archives, [
        f'data.archives={{"LFW-FER-masked": {{"uri": "{out}", "sha256": "{sha256_file(out)}"}}, '
        f'"LFW-FER-masked-face-cut": {{"uri": "{cut}", "sha256": "{sha256_file(cut)}"}}}}',
        "data.unions={}", f"data.raw_dir={tmp_path / 'raw'}", f"data.prepared_dir={tmp_path / 'prepared'}",
        "train.datasets=[LFW-FER-masked]",
    ])
    stages.fetch(params)
    results = {r.dataset: r for r in stages.prepare(params)}
    assert results["LFW-FER-masked"].n_images == results["LFW-FER-masked-face-cut"].n_images == len(names)


def test_synthesize_masks_is_deterministic(demo_archives, tmp_path):
    params = load_params(demo_archives)
    a = stages.synthesize_masks(params, "LFW-FER", tmp_path / "a.zip", ["cloth"], ["coloured"], seed=3,
                                placement="geometry", face_cut=False)
    b = stages.synthesize_masks(params, "LFW-FER", tmp_path / "b.zip", ["cloth"], ["coloured"], seed=3,
                                placement="geometry", face_cut=False)
    with zipfile.ZipFile(a.masked) as za, zipfile.ZipFile(b.masked) as zb:
        assert [za.read(n) for n in sorted(za.namelist())] == [zb.read(n) for n in sorted(zb.namelist())]
    assert a.face_cut is None


@pytest.mark.parametrize("args, message", [
    (["--style", "balaclava"], "unknown mask style"),
    (["--colour", "tartan"], "unknown mask colour"),
    (["--face-box", "0.5,0,0.2,1"], "--face-box"),
    (["--placement", "psychic"], "--placement"),
])
def test_synthesize_masks_bad_options_exit_2_and_write_nothing(demo_archives, tmp_path, capsys, args, message):
    out = tmp_path / "x.zip"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["synthesize-masks", "--dataset", "LFW-FER", "--out", str(out), *args, "--params", str(demo_archives)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_nothing_under_the_mask_shows_through():
    """Two faces that differ only at the mouth look the same once masked: the mask takes
    the broad light of the face, never its features (a smile must not leak)."""
    base = torch.full((1, 3, 112, 112), 150.0)
    smiling = base.clone()
    smiling[..., 82:96, 40:72] = 30.0  # a dark open mouth
    look_ = look("cloth", "plain")
    a = draw_masks(base, whole_image(1), look_)
    b = draw_masks(smiling, whole_image(1), look_)
    mouth = (slice(None), slice(None), slice(82, 96), slice(40, 72))
    assert torch.equal(b[mouth], a[mouth])
