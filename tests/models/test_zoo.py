"""The zoo: every entry builds in current timm, checkpoints load strictly (look-alikes of the
HSEmotion pickles, plain state_dicts, the FER stand-in), mismatches are refused, heads swap."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from torch import nn

from ferflow.errors import FerflowError
from ferflow.models import zoo
from ferflow.models.checkpoints import read_checkpoint
from ferflow.models.weights import load_pretrained
from ferflow.models.zoo import HSEMOTION_7, HSEMOTION_8, ZooEntry

from conftest import SHARED  # tests/conftest.py: ../shared beside the checkout

HELPER = Path(__file__).with_name("make_legacy_pickle.py")
FER7 = SHARED / "models" / "fer7-b0-112" / "fer7_b0_112.pt"

# What make_legacy_pickle.build makes: a TF-style test_efficientnet with HSEmotion's 7 classes.
LOOKALIKE = ZooEntry(
    "lookalike", "test_efficientnet", 64, "avg", "sequential", HSEMOTION_7,
    bn_eps=1e-3, timm_kwargs=(("pad_type", "same"),),
)
EXPECTED = {  # name: (classifier key layout, pooling, bn1 eps, outputs)
    "enet_b0_7": ("classifier.0.weight", "avg", 1e-3, 7),
    "enet_b0_8_best_afew": ("classifier.0.weight", "avg", 1e-3, 8),
    "enet_b0_8_best_vgaf": ("classifier.0.weight", "avg", 1e-3, 8),
    "enet_b0_8_va_mtl": ("classifier.weight", "avg", 1e-3, 10),
    "enet_b2_8": ("classifier.weight", "avg", 1e-3, 8),
    "fer7_b0_112": ("classifier.0.weight", "avg", 1e-3, 7),
    "dan": ("fc.weight", None, 1e-5, 7),
    "demo_tiny": ("classifier.weight", "avg", 1e-5, 1000),
}


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(x)
    return out[0] if isinstance(out, tuple) else out


@pytest.fixture(scope="module")
def lookalikes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("lookalikes")
    variants = {"seq_avg": ("0.6", "seq", "avg"), "linear_max": ("0.9", "linear", "max")}
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(HELPER), "--layout", layout, "--head", head, "--pool", pool,
             "--out", str(out / f"{name}.pt")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        for name, (layout, head, pool) in variants.items()
    }
    for proc in procs.values():
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output.decode()
    return {name: out / f"{name}.pt" for name in variants}


def reference(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path) + ".ref.safetensors")


# ------------------------------------------------------------------------------ the entries


def test_zoo_lists_the_expected_entries():
    assert set(zoo.ZOO) == set(EXPECTED)
    assert zoo.ZOO["enet_b2_8"].input_size == 260 and zoo.ZOO["enet_b2_8"].arch == "tf_efficientnet_b2"
    assert zoo.ZOO["enet_b0_7"].source_url == (
        "https://github.com/HSE-asavchenko/face-emotion-recognition/blob/main/"
        "models/affectnet_emotions/enet_b0_7.pt?raw=true"
    )
    assert zoo.ZOO["enet_b0_8_va_mtl"].extra_outputs == 2


@pytest.mark.parametrize("name", list(EXPECTED))
def test_every_entry_builds_in_current_timm(name):
    key, pool, eps, width = EXPECTED[name]
    model = zoo.build_model(zoo.resolve(name))
    assert key in model.state_dict()
    if pool is not None:
        assert model.global_pool.pool_type == pool
    bn1 = model.trunk.bn1 if name == "dan" else model.bn1
    assert bn1.eps == pytest.approx(eps)
    assert logits(model, torch.randn(2, 3, 64, 64)).shape == (2, width)


def test_dynamic_timm_entry():
    entry = zoo.resolve("timm:resnet18")
    assert (entry.arch, entry.head, entry.classes, entry.input_size) == ("resnet18", "timm", (), 224)
    model = zoo.build_model(entry, num_classes=3)
    assert logits(model, torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert zoo.head_parameters(model, entry) == list(model.fc.parameters())
    with pytest.raises(FerflowError, match="no architecture 'no_such_net'"):
        zoo.resolve("timm:no_such_net")


def test_unknown_name_lists_known_names():
    with pytest.raises(FerflowError) as info:
        zoo.resolve("enet_b9")
    message = str(info.value)
    assert all(name in message for name in zoo.ZOO) and "timm:<arch>" in message


def test_data_config():
    assert zoo.data_config(zoo.resolve("enet_b2_8")) == {
        "input_size": 260, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "interpolation": "bilinear",
    }


# ------------------------------------------------------------------------------ loading


@pytest.mark.parametrize("name, entry", [("seq_avg", LOOKALIKE), ("linear_max", replace(LOOKALIKE, pooling=None))])
def test_lookalike_pickles_load_strictly(lookalikes, tmp_path, name, entry):
    # The entry says "sequential"; the keys decide (linear_max has classifier.*), the pickle's pool too.
    weights = load_pretrained(lookalikes[name], tmp_path)
    model = zoo.build_model(entry, pretrained=weights)
    ref = reference(lookalikes[name])
    torch.testing.assert_close(logits(model, ref["input"]), ref["output"], rtol=0, atol=0)
    assert isinstance(model.classifier, nn.Sequential) == (name == "seq_avg")
    assert model.global_pool.pool_type == ("avg" if name == "seq_avg" else "max")


def test_state_dict_file_loads_strictly(tmp_path):
    torch.manual_seed(3)
    source = zoo.build_model(LOOKALIKE).eval()
    torch.save(source.state_dict(), tmp_path / "sd.pth")
    model = zoo.build_model(LOOKALIKE, pretrained=load_pretrained(tmp_path / "sd.pth", tmp_path / "cache"))
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(logits(model, x), logits(source, x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "entry, field, expected, found",
    [
        (LOOKALIKE, "pool_type", "'avg'", "'max'"),  # the B2 question: refuse, do not guess
        (replace(LOOKALIKE, pooling=None, timm_kwargs=()), "stem_class", "'Conv2d'", "'Conv2dSame'"),
        (replace(LOOKALIKE, pooling=None, bn_eps=None), "bn_eps", "1e-05", "0.001"),
    ],
)
def test_meta_mismatch_is_refused(lookalikes, tmp_path, entry, field, expected, found):
    weights = load_pretrained(lookalikes["linear_max"], tmp_path)
    with pytest.raises(FerflowError) as info:
        zoo.build_model(entry, pretrained=weights)
    message = str(info.value)
    assert f"{field}={found}" in message and f"expects {field}={expected}" in message and "lookalike" in message


def test_head_width_mismatch_is_refused(lookalikes, tmp_path):
    weights = load_pretrained(lookalikes["seq_avg"], tmp_path)
    with pytest.raises(FerflowError, match="checkpoint head has 7 outputs, the zoo entry expects 8"):
        zoo.build_model(replace(LOOKALIKE, classes=HSEMOTION_8), pretrained=weights)


def test_wrong_architecture_is_refused(tmp_path):
    torch.save(timm.create_model("resnet18", num_classes=7).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(FerflowError, match="keys do not match test_efficientnet"):
        zoo.build_model(replace(LOOKALIKE, head="linear"), pretrained=load_pretrained(tmp_path / "r18.pth", tmp_path))


# ------------------------------------------------------------------------------ heads


def test_swap_head_replaces_only_the_head(lookalikes, tmp_path):
    weights = load_pretrained(lookalikes["seq_avg"], tmp_path)
    original = zoo.build_model(LOOKALIKE, pretrained=weights)
    swapped = zoo.build_model(LOOKALIKE, num_classes=3, pretrained=weights)
    assert type(swapped.classifier) is nn.Linear and swapped.classifier.out_features == 3
    before, after = original.state_dict(), swapped.state_dict()
    trunk_keys = {k for k in before if not k.startswith("classifier.")}
    assert {k for k in after if not k.startswith("classifier.")} == trunk_keys
    for key, value in after.items():
        if not key.startswith("classifier."):
            assert torch.equal(value, before[key]), key
    assert logits(swapped, torch.randn(2, 3, 64, 64)).shape == (2, 3)
    head = zoo.head_parameters(swapped, LOOKALIKE)
    assert [id(p) for p in head] == [id(swapped.classifier.weight), id(swapped.classifier.bias)]


def test_va_mtl_extra_outputs_and_zero_shot():
    entry = zoo.resolve("enet_b0_8_va_mtl")
    model = zoo.build_model(entry).eval()
    x = torch.randn(2, 3, 64, 64)
    full = logits(model, x)
    with torch.no_grad():
        zs = zoo.zero_shot_forward(model, entry, x)
    assert full.shape == (2, 10) and zs.shape == (2, 8)
    torch.testing.assert_close(zs, full[:, :8])
    zoo.swap_head(model, entry, 3)
    assert logits(model, x).shape == (2, 3)  # valence/arousal gone with the old head
    with pytest.raises(FerflowError, match="was it swapped"):
        zoo.zero_shot_forward(model, entry, x)


def test_zero_shot_needs_pretrained_classes():
    entry = zoo.resolve("demo_tiny")
    with pytest.raises(FerflowError, match="no pretrained expression classes"):
        zoo.zero_shot_forward(zoo.build_model(entry, num_classes=3), entry, torch.randn(1, 3, 32, 32))


def test_dan_head_swap_and_head_parameters():
    entry = zoo.resolve("dan")
    model = zoo.build_model(entry, num_classes=3)
    assert model.fc.out_features == 3 and model.bn.num_features == 3
    expected = [*model.fc.parameters(), *model.bn.parameters()]
    assert [id(p) for p in zoo.head_parameters(model, entry)] == [id(p) for p in expected]


# ------------------------------------------------------------------------------ the stand-in


@pytest.mark.skipif(not FER7.is_file(), reason=f"{FER7} absent (shared FER stand-in checkpoint)")
def test_fer7_stand_in_matches_a_manual_load(tmp_path):
    digest = (FER7.parent / "SHA256SUMS").read_text().split()[0]
    entry = zoo.resolve("fer7_b0_112")
    model = zoo.build_model(entry, pretrained=load_pretrained(FER7, tmp_path, expected_sha256=digest))
    manual = timm.create_model("tf_efficientnet_b0", pretrained=False, num_classes=7)
    manual.classifier = nn.Sequential(nn.Linear(1280, 7))
    manual.load_state_dict(read_checkpoint(FER7).state_dict, strict=True)
    x = torch.randn(2, 3, 112, 112)
    torch.testing.assert_close(logits(model, x), logits(manual, x), rtol=0, atol=0)
