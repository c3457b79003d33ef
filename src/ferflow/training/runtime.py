"""Where and how training runs: device, precision, threads, seeds, determinism, DDP."""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from ferflow.config import TrainSettings
from ferflow.errors import FerflowError

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    device: torch.device
    amp_dtype: Optional[torch.dtype]
    rank: int = 0
    world_size: int = 1
    owns_process_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


def select_device(choice: str, local_rank: int = 0) -> torch.device:
    if choice in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if choice == "cuda":
        raise FerflowError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    mps = getattr(torch.backends, "mps", None)
    if choice in ("auto", "mps") and mps is not None and mps.is_available():
        return torch.device("mps")
    if choice == "mps":
        raise FerflowError("train.device=mps but MPS is not available; use train.device=auto or cpu")
    return torch.device("cpu")


def select_amp(choice: str, device: torch.device) -> Optional[torch.dtype]:
    if choice == "off" or (choice == "auto" and device.type != "cuda"):
        return None
    if choice == "bf16" or (choice == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def seed_everything(seed: int, rank: int = 0) -> None:
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the OS.

    CPU training frees and reallocates the same activation buffers every step. glibc serves
    blocks above 32 MB with mmap and unmaps them on free, so each step faults every page of
    them in again (~1M page faults per step for tf_efficientnet_b0 at 224 px, batch 32):
    measured here, steps take 2.1x as long (benchmarks/RESULTS.md). With mmap off and no heap
    trimming the buffers stay mapped and are reused; the process keeps its peak memory.
    The same as GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=<huge>.
    Returns False where the C library is not glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def process_rank() -> int:
    """This process's rank in a torch.distributed job (torchrun sets RANK); 0 when alone."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Rank 0: the one process of a job that writes records (files, MLflow)."""
    return process_rank() == 0


def setup_runtime(cfg: TrainSettings, seed: int) -> Runtime:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = process_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True
    device = select_device(cfg.device, local_rank)
    if device.type == "cpu" and cfg.cpu_keep_freed_memory and not keep_freed_memory():
        log.info("train.cpu_keep_freed_memory: not a glibc system; malloc left as it is")
    owns = False
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        owns = True
    seed_everything(seed, rank)
    amp = select_amp(cfg.amp, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    log.info("training on %s (amp %s, rank %d/%d)", device, amp, rank, world)
    return Runtime(device, amp, rank, world, owns)
