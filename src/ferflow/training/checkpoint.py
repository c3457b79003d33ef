"""Run-directory files: best weights (safetensors), last checkpoint (resume), history.

Every file is written to a temporary name and renamed, so a run killed at any moment
leaves either the previous complete file or the new one, never half of one.
"""

from __future__ import annotations

import csv
import io
import random
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ferflow.errors import FerflowError
from ferflow.fileio import atomic_path, atomic_write_bytes, atomic_write_json
from ferflow.layout import HISTORY_CSV, HISTORY_JSON


def save_weights(path: Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    # best.safetensors is what gets evaluated and registered: never a diverged model. NaN
    # only: -inf is legitimate in buffers (MappedHead's group mask); the trainer checks
    # parameters for inf too (loop.Trainer._check_finite).
    bad = next((k for k, v in tensors.items() if v.is_floating_point() and bool(torch.isnan(v).any())), None)
    if bad is not None:
        raise FerflowError(f"not writing {path}: weight {bad} holds nan (training diverged)")
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


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


# What the trainer reads from every last.pt it writes (save_last); a file without them is not ours.
LAST_KEYS = ("epoch", "model", "optimizer", "scheduler", "scaler", "rng", "criterion", "recipe")


def unusable_last(path: Path, why: str) -> FerflowError:
    """The one-line error for a last.pt that cannot be resumed from, with the safe way out."""
    return FerflowError(f"{path} cannot be resumed from: {why}; move it away (e.g. mv {path} {path}.broken) "
                        "to restart this run from epoch 0")


def load_last(path: Path) -> dict:
    """The resume state written by save_last; FerflowError naming the file otherwise."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:  # torch.load raises EOFError, which the CLI turns into "Aborted."
            raise unusable_last(path, "the file is empty (a crash while it was written?)")
        # Our own file, but still no arbitrary pickles: numpy's RNG tuple needs its few globals.
        with torch.serialization.safe_globals(_NUMPY_RNG_GLOBALS):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FerflowError:
        raise
    except Exception as exc:  # any parse failure of the file; torch's own text advises weights_only=False
        raise unusable_last(path, _load_failure(exc)) from exc
    if not isinstance(state, dict):
        raise unusable_last(path, f"it holds a {type(state).__name__}, not ferflow's training state")
    missing = [key for key in LAST_KEYS if key not in state]
    if missing:
        raise unusable_last(path, f"it lacks {', '.join(missing)}; not a checkpoint written by ferflow train")
    return state


def _load_failure(exc: BaseException) -> str:
    """torch's reason in a few words, without its advice to retry with weights_only=False."""
    text = str(exc)
    refused = re.search(r"(?:unsupported GLOBAL|Unsupported global: GLOBAL) ([\w.]+)", text, re.IGNORECASE)
    if refused:
        return f"it references {refused.group(1)}, which a training checkpoint never holds (refused, not run)"
    parse = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    if parse:
        return f"corrupt: not a pickle of training state ({parse.group(1).strip()[:120]})"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    first = first.split(". ")[0][:160]  # torch's first sentence; the rest is advice
    return f"corrupt or not a torch.save() file ({type(exc).__name__}{': ' + first if first else ''})"


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
