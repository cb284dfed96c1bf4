"""The one home of torch.distributed helpers (torchrun): set-up, rank/world, barriers.

    rank, world, device = setup_distributed(device)   # once per process, before any collective
    rank, world = rank_world()                        # (0, 1) when not distributed
    barrier()                                         # no-op when not distributed
    long_barrier()                                    # the same, waiting up to 2 h (rank 0 doing slow I/O alone)

Everything here is a no-op (or returns rank 0 of 1) when the process was not launched by torchrun, so the
same code runs single-process on a laptop and on N GPUs.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from .utils import log


def is_distributed() -> bool:
    """True once torch.distributed is initialised (by `setup_distributed` or the caller)."""
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when not distributed."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_world()[0] == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


_LONG_GROUPS: dict[float, object] = {}


def long_barrier(timeout: timedelta = timedelta(hours=2)) -> None:
    """A barrier in which the ranks wait up to `timeout` instead of the process group's collective timeout (NCCL's
    default is 10 minutes): for the ranks that wait while rank 0 alone does slow I/O (a large checkpoint's write).
    It runs on a gloo group of its own, created by the first call (which every rank makes at the same point)."""
    if not is_distributed():
        return
    key = timeout.total_seconds()
    if key not in _LONG_GROUPS:
        _LONG_GROUPS[key] = dist.new_group(backend="gloo", timeout=timeout)
    dist.barrier(group=_LONG_GROUPS[key])


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup_distributed(device: torch.device, timeout: Optional[timedelta] = None) -> tuple[int, int, torch.device]:
    """Initialise torch.distributed when launched by torchrun (WORLD_SIZE > 1).

    Returns (rank, world_size, device); on CUDA each process takes the GPU LOCAL_RANK. NCCL on CUDA, gloo
    on CPU. `timeout` is the collective timeout (torch's default when None).
    """
    if not launched_by_torchrun():
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        kwargs = {"timeout": timeout} if timeout is not None else {}
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **kwargs)
        log.info("torch.distributed: %s backend, rank %d of %d", dist.get_backend(), dist.get_rank(),
                 dist.get_world_size())
    return dist.get_rank(), dist.get_world_size(), device
