"""Run-directory files: best weights (safetensors), last checkpoint (resume), history.

Every file is written to a temporary name and renamed, so a run killed at any moment
leaves either the previous complete file or the new one, never half of one.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

BEST = "best.safetensors"
RUN_JSON = "run.json"  # what was trained (trainer) and how to feed it (models.inference)
LAST = "last.pt"
HISTORY_JSON = "history.json"
HISTORY_CSV = "history.csv"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def save_weights(path: Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_last(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_last(path: Path) -> dict:
    # Our own file, but still no arbitrary pickles: numpy's RNG tuple needs its few globals.
    with torch.serialization.safe_globals(_NUMPY_RNG_GLOBALS):
        return torch.load(path, map_location="cpu", weights_only=True)


def _numpy_rng_globals() -> list:
    found = [np.ndarray, np.dtype, type(np.dtype("uint32"))]
    for name in ("numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct"):
        module, _, attr = name.rpartition(".")
        try:
            found.append(getattr(__import__(module, fromlist=[attr]), attr))
        except (ImportError, AttributeError):
            pass
    return found


_NUMPY_RNG_GLOBALS = _numpy_rng_globals()


def write_history(run_dir: Path, history: list[dict]) -> None:
    atomic_write_json(run_dir / HISTORY_JSON, history)
    if not history:
        return
    fields = list(history[0])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(history)
    atomic_write_bytes(run_dir / HISTORY_CSV, buf.getvalue().encode())
