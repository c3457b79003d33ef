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


def setup_runtime(cfg: TrainSettings, seed: int) -> Runtime:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
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
