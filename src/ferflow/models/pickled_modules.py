"""From an unpickled checkpoint to a state_dict and architecture hints.

A whole pickled model (``torch.save(model)``, as HSEmotion ships timm models) arrives as a
tree of unpickler Placeholders; its tensors are named as ``model.state_dict()`` would name
them, ready for ``load_state_dict(strict=True)`` into a model built fresh by current timm,
and its module classes and attributes give the hints (pooling, stem, BatchNorm eps, timm
layout) needed to build that model. A plain state_dict, or one nested under a usual key, is
taken as it is.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ferflow.errors import FerflowError
from ferflow.models.unpickler import Placeholder

# The architecture hints in a checkpoint's meta (None where the file has no modules).
MODULE_META_KEYS = ("root_class", "pool_type", "stem_class", "bn_eps", "timm_module_layout")
_NESTED_KEYS = ("state_dict", "model_state_dict", "model")


def extract_state_dict(obj: Any, path: Path, depth: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, meta with `format` and MODULE_META_KEYS) of an unpickled object."""
    if isinstance(obj, Placeholder):
        modules = dict(_walk(obj, "", path, ()))
        if not (state_dict := _flatten(modules)):
            raise FerflowError(f"{path} holds a pickled {obj.qualified_name} without any tensors")
        return state_dict, {"format": "pickled-module", **_module_meta(obj, modules)}
    if isinstance(obj, Mapping) and obj:
        if all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return dict(obj), {"format": "state_dict", **dict.fromkeys(MODULE_META_KEYS)}
        for key in _NESTED_KEYS:
            if depth < 2 and key in obj:
                return extract_state_dict(obj[key], path, depth + 1)
    raise FerflowError(
        f"{path} holds neither a model nor a state_dict (looked for a module, a dict of tensors, "
        f"or one under {', '.join(_NESTED_KEYS)})"
    )


def _walk(
    node: Placeholder, prefix: str, path: Path, ancestors: tuple[int, ...]
) -> Iterator[tuple[str, Placeholder]]:
    """(dotted path, module) pairs in state_dict order; shared submodules appear at each path."""
    if id(node) in ancestors:
        raise FerflowError(f"{path} is corrupt: its module tree has a cycle at '{prefix}'")
    yield prefix, node
    for name, child in (node.state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, Placeholder):
            raise FerflowError(f"{path} is corrupt: submodule '{prefix}{name}' is a {type(child).__name__}")
        yield from _walk(child, f"{prefix}{name}.", path, (*ancestors, id(node)))


def _flatten(modules: dict[str, Placeholder]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for prefix, module in modules.items():
        skip = module.state.get("_non_persistent_buffers_set") or set()  # absent before torch 1.6
        tensors = [*(module.state.get("_parameters") or {}).items(),
                   *((k, v) for k, v in (module.state.get("_buffers") or {}).items() if k not in skip)]
        out.update((f"{prefix}{name}", t) for name, t in tensors if isinstance(t, torch.Tensor))
    return out


def _module_meta(root: Placeholder, modules: dict[str, Placeholder]) -> dict[str, Any]:
    def named(leaf: str) -> list[Placeholder]:
        return [m for p, m in modules.items() if p.rstrip(".").rsplit(".", 1)[-1] == leaf]

    pools = [m.state["pool_type"] for m in named("global_pool") if isinstance(m.state.get("pool_type"), str)]
    stems = named("conv_stem")
    # bn1 (after the stem) first, else the first module that looks like a batch norm.
    norms = [m for m in named("bn1") if "eps" in m.state] + [
        m for m in modules.values() if "eps" in m.state and "running_mean" in (m.state.get("_buffers") or {})
    ]
    classes = {m.qualified_name for m in modules.values()}
    layout = None
    if any(c.startswith(("timm.models.layers.", "timm.models.efficientnet_blocks.")) for c in classes):
        layout = "0.4/0.6"
    elif any(c.startswith(("timm.layers.", "timm.models._")) for c in classes):
        layout = "0.9"
    return {
        "root_class": root.qualified_name,
        "pool_type": pools[0] if pools else None,
        "stem_class": stems[0].qualified_name.rsplit(".", 1)[-1] if stems else None,
        "bn_eps": float(norms[0].state["eps"]) if norms else None,
        "timm_module_layout": layout,
    }
