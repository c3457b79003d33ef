"""Safe checkpoint reading: look-alikes of HSEmotion's pickled timm models, hostile pickles,
state_dict and safetensors files."""

from __future__ import annotations

import builtins
import hashlib
import io
import os
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

from ferflow.errors import FerflowError
from ferflow.models import checkpoints
from ferflow.models.checkpoints import Checkpoint, read_checkpoint, strip_prefixes, to_safetensors

from conftest import SHARED  # tests/conftest.py: ../shared beside the checkout

HELPER = Path(__file__).with_name("make_legacy_pickle.py")
FER7 = SHARED / "models" / "fer7-b0-112" / "fer7_b0_112.pt"

# name: (layout, head, pool, extra flags)
LOOKALIKES = {
    "v04_seq_avg": ("0.4", "seq", "avg", []),
    "v06_linear_max": ("0.6", "linear", "max", []),
    "v06_seq_cuda": ("0.6", "seq", "avg", ["--cuda"]),
    "v09_linear_avg": ("0.9", "linear", "avg", []),
}


@pytest.fixture(scope="module")
def lookalikes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("lookalikes")
    procs = {}
    for name, (layout, head, pool, flags) in LOOKALIKES.items():
        cmd = [sys.executable, str(HELPER), "--layout", layout, "--head", head, "--pool", pool,
               "--out", str(out / f"{name}.pt"), *flags]
        procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for name, proc in procs.items():
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output.decode()
    return {name: out / f"{name}.pt" for name in LOOKALIKES}


def fresh_model(head: str, pool: str) -> torch.nn.Module:
    """Same architecture as make_legacy_pickle.build, built by current timm in this process."""
    model = timm.create_model(
        "test_efficientnet", num_classes=7, pad_type="same", bn_eps=1e-3, global_pool=pool
    )
    if head == "seq":
        model.classifier = torch.nn.Sequential(torch.nn.Linear(model.num_features, 7))
    return model.eval()


def historic_modules() -> set[str]:
    return {m for m in sys.modules if m.startswith(("timm.models.layers.", "timm.models.efficientnet_"))}


@pytest.mark.parametrize("name", list(LOOKALIKES))
def test_lookalike_loads_strictly_and_reproduces_outputs(lookalikes: dict[str, Path], name: str) -> None:
    layout, head, pool, _ = LOOKALIKES[name]
    before = historic_modules()
    ckpt = read_checkpoint(lookalikes[name])
    assert historic_modules() == before, "reading must not import the pickled class paths"

    model = fresh_model(head, pool)
    assert set(ckpt.state_dict) == set(model.state_dict())
    model.load_state_dict(ckpt.state_dict, strict=True)
    ref = safetensors.torch.load_file(str(lookalikes[name]) + ".ref.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(model(ref["input"]), ref["output"], rtol=0, atol=0)

    assert all(t.device.type == "cpu" for t in ckpt.state_dict.values())
    assert ckpt.meta["format"] == "pickled-module"
    assert ckpt.meta["root_class"] == "timm.models.efficientnet.EfficientNet"
    assert ckpt.meta["pool_type"] == pool
    assert ckpt.meta["stem_class"] == "Conv2dSame"
    assert ckpt.meta["bn_eps"] == pytest.approx(1e-3)
    assert ckpt.meta["timm_module_layout"] == ("0.9" if layout == "0.9" else "0.4/0.6")
    assert len(ckpt.meta["source_sha256"]) == 64


def test_cuda_located_storages_are_read_on_cpu(lookalikes: dict[str, Path]) -> None:
    path = lookalikes["v06_seq_cuda"]
    with zipfile.ZipFile(path) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    assert b"cuda:0" in pkl and b"ctorch.cuda\nFloatStorage\n" in pkl
    ckpt = read_checkpoint(path)
    assert {t.device.type for t in ckpt.state_dict.values()} == {"cpu"}
    assert ckpt.state_dict["bn1.num_batches_tracked"].item() == 7


def test_shared_storages_views_and_dtypes(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {
        "base": base,
        "row": base[1],  # offset into a shared storage
        "col": base[:, 2],  # strided
        "t": base.t(),  # transposed
        "bf16": torch.randn(3, 2).to(torch.bfloat16),
        "flags": torch.tensor([True, False, True]),
        "u16": torch.tensor([1, 2, 65535], dtype=torch.uint16),  # pickled via _rebuild_tensor_v3
        "steps": torch.tensor(9),
    }
    path = tmp_path / "views.pt"
    torch.save(tensors, path)
    ckpt = read_checkpoint(path)
    assert ckpt.meta["format"] == "state_dict"
    for key, expected in tensors.items():
        got = ckpt.state_dict[key]
        assert got.dtype == expected.dtype and got.shape == expected.shape, key
        if expected.dtype == torch.uint16:  # few CPU kernels for uint16: compare the bits
            got, expected = got.view(torch.int16), expected.view(torch.int16)
        assert torch.equal(got, expected), key
        assert got.is_contiguous()
    assert ckpt.state_dict["row"].data_ptr() != ckpt.state_dict["base"].data_ptr()
    # No shared memory left: safetensors accepts it as is.
    safetensors.torch.save_file(ckpt.state_dict, str(tmp_path / "views.safetensors"))


def test_tied_weights_do_not_share_memory(tmp_path: Path) -> None:
    weight = torch.randn(3, 3)
    path = tmp_path / "tied.pt"
    torch.save({"a.weight": weight, "b.weight": weight}, path)
    sd = read_checkpoint(path).state_dict
    assert torch.equal(sd["a.weight"], sd["b.weight"])
    assert sd["a.weight"].data_ptr() != sd["b.weight"].data_ptr()


@pytest.mark.parametrize("wrapper", ["state_dict", "model_state_dict", "model", None])
def test_plain_state_dict_with_module_prefix(tmp_path: Path, wrapper: str | None) -> None:
    model = fresh_model("linear", "avg")
    wrapped = OrderedDict((f"module.{k}", v) for k, v in model.state_dict().items())
    obj = wrapped if wrapper is None else {wrapper: wrapped, "epoch": 3, "best_acc": 0.5}
    path = tmp_path / "ddp.pth"
    torch.save(obj, path)
    ckpt = read_checkpoint(path)
    assert ckpt.meta["format"] == "state_dict" and ckpt.meta["root_class"] is None
    fresh_model("linear", "avg").load_state_dict(ckpt.state_dict, strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(ckpt.state_dict[key], value)


@pytest.mark.parametrize("wrap", ["model-key", "data-parallel"])
def test_current_pickled_module_nested_or_wrapped(tmp_path: Path, wrap: str) -> None:
    model = fresh_model("seq", "max")
    obj = {"model": model, "epoch": 1} if wrap == "model-key" else torch.nn.DataParallel(model)
    path = tmp_path / "whole.pt"
    torch.save(obj, path)
    ckpt = read_checkpoint(path)
    assert ckpt.meta["format"] == "pickled-module" and ckpt.meta["pool_type"] == "max"
    fresh_model("seq", "max").load_state_dict(ckpt.state_dict, strict=True)


def test_big_endian_archive(tmp_path: Path) -> None:
    weight = torch.randn(3, 5)
    little = io.BytesIO()
    torch.save({"w": weight}, little)
    entries = {}
    with zipfile.ZipFile(little) as z:
        for name in z.namelist():
            data = z.read(name)
            if name.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in name:
                swapped = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(-1, 4).flip(1)
                data = swapped.numpy().tobytes()
            entries[name] = data
    path = tmp_path / "big.pt"
    path.write_bytes(_zip_bytes(entries))
    assert torch.equal(read_checkpoint(path).state_dict["w"], weight)


def test_legacy_format_is_named(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    torch.save({"w": torch.zeros(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(FerflowError, match="pre-1.6"):
        read_checkpoint(path)


def test_strip_prefixes_only_strips_shared_wrappers() -> None:
    t = torch.zeros(1)
    assert strip_prefixes({"module.model.a": t, "module.model.b": t}) == {"a": t, "b": t}
    assert list(strip_prefixes({"model.a": t, "head.b": t})) == ["model.a", "head.b"]
    assert list(strip_prefixes({"net.a": t}, prefixes=("net.",))) == ["a"]


def test_safetensors_round_trip(tmp_path: Path) -> None:
    tensors = {"w": torch.randn(2, 3), "n": torch.tensor(4)}
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    ckpt = read_checkpoint(path)
    assert ckpt.meta["format"] == "safetensors" and ckpt.meta["root_class"] is None
    assert all(torch.equal(ckpt.state_dict[k], v) for k, v in tensors.items())
    assert ckpt.meta["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_to_safetensors_converts_once_and_keeps_meta(
    lookalikes: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = lookalikes["v06_linear_max"]
    original = read_checkpoint(source)
    cache = tmp_path / "cache"
    converted = to_safetensors(source, cache)
    assert converted == cache / f"{original.meta['source_sha256']}.safetensors"

    again = read_checkpoint(converted)
    assert again.meta == {**original.meta, "format": "safetensors"}
    assert set(again.state_dict) == set(original.state_dict)
    assert all(torch.equal(again.state_dict[k], v) for k, v in original.state_dict.items())

    def must_not_run(path: Path) -> Checkpoint:
        raise AssertionError("cache hit must not re-read the pickle")

    monkeypatch.setattr(checkpoints, "read_checkpoint", must_not_run)
    mtime = converted.stat().st_mtime_ns
    assert to_safetensors(source, cache) == converted
    assert converted.stat().st_mtime_ns == mtime
    assert [p.name for p in cache.iterdir()] == [converted.name]


# --- hostile and broken files ------------------------------------------------------------


class _Payload:
    def __init__(self, func: object, args: tuple) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return self.func, self.args


def _payloads(canary: Path) -> dict[str, tuple[_Payload, tuple[str, ...]]]:
    return {
        "os.system": (_Payload(os.system, (f"touch {canary}",)), ("os.system", "posix.system")),
        "eval": (_Payload(builtins.eval, (f"open({str(canary)!r}, 'w')",)), ("builtins.eval",)),
        "popen": (_Payload(subprocess.Popen, (["touch", str(canary)],)), ("subprocess.Popen",)),
    }


@pytest.mark.parametrize("payload", ["os.system", "eval", "popen"])
@pytest.mark.parametrize("container", ["torch-zip", "raw-pickle"])
def test_malicious_pickle_is_refused_without_running(tmp_path: Path, payload: str, container: str) -> None:
    canary = tmp_path / "canary"
    obj, names = _payloads(canary)[payload]
    path = tmp_path / "evil.pt"
    if container == "torch-zip":
        # Inside a real-looking checkpoint, after some genuine tensors.
        torch.save({"state_dict": {"w": torch.zeros(2)}, "hook": obj}, path)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(FerflowError) as err:
        read_checkpoint(path)
    message = str(err.value)
    assert str(path) in message and "refusing to load" in message
    assert any(name in message for name in names), message
    assert not canary.exists()


def test_timm_named_callables_stay_inert(tmp_path: Path) -> None:
    """A REDUCE on a timm-named global builds a placeholder: nothing is imported or called."""
    path = tmp_path / "inert.pt"
    data = (b"\x80\x02}q\x00X\x05\x00\x00\x00modelq\x01"
            b"ctimm.models.layers.evil\nBoom\nq\x02X\x03\x00\x00\x00argq\x03\x85q\x04Rq\x05s.")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", data)
        z.writestr("archive/version", b"3\n")
    with pytest.raises(FerflowError, match="timm.models.layers.evil.Boom without any tensors"):
        read_checkpoint(path)
    assert "timm.models.layers.evil" not in sys.modules


def _zip_bytes(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return buffer.getvalue()


def test_broken_files_name_the_file(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save({"w": torch.randn(64, 64)}, good)
    storage_name = next(n for n in zipfile.ZipFile(good).namelist() if "/data/" in n)
    cases = {
        "empty.pt": b"",
        "text.pt": b"this is not a checkpoint\n",
        "truncated.pt": good.read_bytes()[: good.stat().st_size // 2],
        "no_pickle.pt": _zip_bytes({"archive/version": b"3\n"}),
        "missing_storage.pt": _zip_bytes({n: zipfile.ZipFile(good).read(n)
                                          for n in zipfile.ZipFile(good).namelist() if n != storage_name}),
        "bad.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}xxxxxx",
        "not_tensors.pt": pickle.dumps({"epoch": 3}, protocol=2),
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(FerflowError) as err:
            read_checkpoint(path)
        assert str(path) in str(err.value), (name, str(err.value))
    with pytest.raises(FerflowError, match="missing.pt"):
        read_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(FerflowError, match="missing.pt"):
        to_safetensors(tmp_path / "missing.pt", tmp_path / "cache")


@pytest.mark.skipif(not FER7.is_file(), reason=f"{FER7} not present (shared models not mounted)")
def test_fer7_b0_112_shared_checkpoint() -> None:
    ckpt = read_checkpoint(FER7)
    assert len(ckpt.state_dict) == 360
    model = timm.create_model("tf_efficientnet_b0", num_classes=7)
    model.classifier = torch.nn.Sequential(torch.nn.Linear(1280, 7))
    model.load_state_dict(ckpt.state_dict, strict=True)
    assert ckpt.meta["stem_class"] == "Conv2dSame"
    assert ckpt.meta["bn_eps"] == pytest.approx(1e-3)
    assert ckpt.meta["pool_type"] == "avg"
    assert ckpt.meta["root_class"] == "timm.models.efficientnet.EfficientNet"
