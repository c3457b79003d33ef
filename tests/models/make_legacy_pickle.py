"""Write a look-alike of an HSEmotion checkpoint: a whole pickled timm model whose pickle
names the classes of an old timm module layout, without installing old timm.

    python make_legacy_pickle.py --layout 0.4|0.6|0.9 --out FILE [--head seq|linear]
                                 [--pool avg|max] [--cuda]

A current-timm ``test_efficientnet`` (TF-style: Conv2dSame stem, BN eps 1e-3) is built,
its modules are re-homed to classes registered under the historic module paths, and
``torch.save(model)`` writes those paths. Beside FILE, ``FILE.ref.safetensors`` holds an
input and the original model's output for it. Runs in its own process: the fake modules
it puts in ``sys.modules`` must never leak into the test process.
"""

from __future__ import annotations

import argparse
import io
import sys
import types
import zipfile
from pathlib import Path

import safetensors.torch
import timm
import torch

NUM_CLASSES = 7
INPUT_SIZE = 64


def build(head: str, pool: str) -> torch.nn.Module:
    """The model both this script and the tests build; keep the two in step."""
    model = timm.create_model(
        "test_efficientnet", num_classes=NUM_CLASSES, pad_type="same", bn_eps=1e-3, global_pool=pool
    )
    if head == "seq":  # HSEmotion's B0 8-class head: keys classifier.0.*
        model.classifier = torch.nn.Sequential(torch.nn.Linear(model.num_features, NUM_CLASSES))
    return model


def fake_module(name: str) -> types.ModuleType:
    if name not in sys.modules:
        sys.modules[name] = types.ModuleType(name)
    return sys.modules[name]


def rehome(obj_class: type, qualified_name: str) -> type:
    """A subclass that pickle will name `qualified_name` (pickle checks the name resolves to it)."""
    module_name, name = qualified_name.rsplit(".", 1)
    module = fake_module(module_name)
    if not hasattr(module, name):
        setattr(module, name, type(name, (obj_class,), {"__module__": module_name, "__qualname__": name}))
    return getattr(module, name)


def historic_name(qualified_name: str, layout: str) -> str:
    if layout == "0.9":
        return qualified_name  # timm.layers.* / timm.models._efficientnet_blocks.* as today
    if qualified_name.startswith("timm.layers."):
        return "timm.models.layers." + qualified_name[len("timm.layers."):]
    if qualified_name.startswith("timm.models._efficientnet_blocks."):
        return "timm.models.efficientnet_blocks." + qualified_name.rsplit(".", 1)[1]
    return qualified_name


def apply_layout(model: torch.nn.Module, layout: str) -> None:
    for module in model.modules():
        cls = type(module)
        if layout == "0.4" and cls.__name__ == "BatchNormAct2d":
            # timm 0.4.5 used a plain BatchNorm2d followed by a separate activation.
            module.__class__ = torch.nn.BatchNorm2d
            continue
        if layout == "0.4" and isinstance(module, torch.nn.SiLU):
            module.__class__ = rehome(cls, "timm.models.layers.activations_me.SwishMe")
            continue
        if layout == "0.4" and cls.__name__ == "SqueezeExcite":
            # 0.4.5 kept the gate as a plain function attribute.
            module.gate_fn = gate_function()
        if layout == "0.4" and cls.__name__ == "SelectAdaptivePool2d":
            module._modules.pop("flatten", None)
            module.flatten = False
        if layout == "0.4":
            module.__dict__.pop("_non_persistent_buffers_set", None)  # robustness: older torch lacked it
        target = historic_name(f"{cls.__module__}.{cls.__qualname__}", layout)
        if target != f"{cls.__module__}.{cls.__qualname__}":
            module.__class__ = rehome(cls, target)


def gate_function() -> types.FunctionType:
    module = fake_module("timm.models.layers.activations")
    if not hasattr(module, "sigmoid"):
        def sigmoid(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
            return x.sigmoid_() if inplace else x.sigmoid()

        sigmoid.__module__, sigmoid.__qualname__ = module.__name__, "sigmoid"
        module.sigmoid = sigmoid
    return module.sigmoid


def randomise_norm_stats(model: torch.nn.Module) -> None:
    # Default running stats (0/1) would let a reader that drops buffers pass unnoticed.
    gen = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen) * 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
            module.num_batches_tracked.fill_(7)


def save_as_cuda(model: torch.nn.Module, out: Path) -> None:
    """Storages claim cuda:0 and use torch<2's torch.cuda.FloatStorage spelling, like a GPU save."""
    original = torch.serialization.location_tag
    torch.serialization.location_tag = lambda storage: "cuda:0"
    try:
        buffer = io.BytesIO()
        torch.save(model, buffer)
    finally:
        torch.serialization.location_tag = original
    with zipfile.ZipFile(buffer) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/data.pkl"):
                assert b"cuda:0" in data
                for kind in (b"FloatStorage", b"LongStorage"):
                    data = data.replace(b"ctorch\n" + kind + b"\n", b"ctorch.cuda\n" + kind + b"\n")
            dst.writestr(info.filename, data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=("0.4", "0.6", "0.9"), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--head", choices=("seq", "linear"), default="seq")
    parser.add_argument("--pool", choices=("avg", "max"), default="avg")
    parser.add_argument("--cuda", action="store_true", help="storages located on cuda:0")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = build(args.head, args.pool).eval()
    randomise_norm_stats(model)
    x = torch.randn(2, 3, INPUT_SIZE, INPUT_SIZE)
    torch.set_num_threads(1)  # the tests compare exactly, on one thread: summation order fixed
    with torch.no_grad():
        y = model(x)
    safetensors.torch.save_file(
        {"input": x, "output": y}, str(args.out.with_name(args.out.name + ".ref.safetensors"))
    )

    apply_layout(model, args.layout)  # after the reference run: 0.4 changes forward()
    if args.cuda:
        save_as_cuda(model, args.out)
    else:
        torch.save(model, args.out)


if __name__ == "__main__":
    main()
