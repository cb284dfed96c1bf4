"""The one home of torch.distributed helpers (torchrun): set-up, rank/world, barriers, rank-0-only work and
error propagation.

    rank, world, device = setup_distributed(device)   # once per process, before any collective
    rank, world = rank_world()                        # (0, 1) when not distributed
    barrier()                                         # no-op when not distributed
    long_barrier()                                    # the same, waiting up to 2 h (rank 0 doing slow I/O alone)
    result = run_on_rank0(fn, *args)                  # fn runs on rank 0 only; every rank gets its result
    report_failure(message)                           # this rank failed: every other rank stops too

Everything here is a no-op (or returns rank 0 of 1) when the process was not launched by torchrun, so the
same code runs single-process on a laptop and on N GPUs.

Failures: a rank that fails writes its one-line error under one key of the job's c10d store
(`report_failure`, called by the CLIs for any error). Every rank runs a watcher thread that polls that key
twice a second; a rank that sees it prints the failed rank's message and exits with code 2 at once, wherever
it is (a barrier, a collective, a long computation), so one rank's error ends the whole job within about a
second instead of leaving the others in the next collective until its timeout. `run_on_rank0` hands its result
over through the store too, so the waiting ranks poll instead of sitting in a collective that could time out
while rank 0 works for hours (SimCLR, UMAP).
"""
from __future__ import annotations

import itertools
import json
import os
import sys
import threading
import time
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from .utils import UserError, log

_ERROR_KEY = "dpt_fast/error"  # the first failed rank's message
_SEEN_KEY = "dpt_fast/error_seen"  # how many other ranks have seen it
_POLL_S = 0.5
_state = {"reported": False, "watching": False, "stopped": False}
_rank0_calls = itertools.count()


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
    """Wait for every rank; raises the failed rank's UserError instead when one has reported a failure."""
    if is_distributed():
        _watch()
        _raise_if_failed()
        dist.barrier()
        _raise_if_failed()


def _store() -> Optional[dist.Store]:
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no store (a group made without one): fall back to collectives
        return None


def _failure(store: dist.Store) -> Optional[str]:
    try:
        return store.get(_ERROR_KEY).decode() if store.check([_ERROR_KEY]) else None
    except Exception:  # noqa: BLE001 - the store is gone: the job is ending
        return None


def _raise_if_failed() -> None:
    store = _store()
    msg = _failure(store) if store is not None else None
    if msg is not None:
        _state["reported"] = True  # this rank stops through this UserError, not through the watcher
        _acknowledge(store)
        raise UserError(msg)


def _acknowledge(store: dist.Store) -> None:
    try:
        store.add(_SEEN_KEY, 1)
    except Exception:  # noqa: BLE001
        pass


def report_failure(message: str, wait_s: float = 5.0) -> None:
    """Tell the other ranks that this one failed with `message` (one line); they exit with code 2.

    Waits up to `wait_s` for them to see it (rank 0 may host the store, which ends with its process).
    No-op when not distributed or when this rank stops because of another rank's failure.
    """
    store = _store() if is_distributed() else None
    if store is None or _state["reported"]:
        return
    _state["reported"] = True
    rank, world = rank_world()
    try:
        store.compare_set(_ERROR_KEY, "", f"rank {rank} failed: {message}")  # the first failure wins
        deadline = time.time() + wait_s
        while store.add(_SEEN_KEY, 0) < world - 1 and time.time() < deadline:
            time.sleep(0.05)
    except Exception:  # noqa: BLE001 - the store is gone: nobody is left to tell
        pass


def _watch() -> None:
    """Start (once) the thread that ends this process when another rank reports a failure."""
    store = _store()
    if store is None or _state["watching"]:
        return
    _state["watching"] = True

    def loop() -> None:
        while True:
            time.sleep(_POLL_S)
            if _state["stopped"]:
                return
            try:
                found = store.check([_ERROR_KEY])
            except Exception:  # noqa: BLE001 - the store is gone: the job is ending
                return
            if found and not _state["reported"]:
                msg = _failure(store) or "another rank failed"
                _acknowledge(store)
                print(f"error: {msg}", file=sys.stderr, flush=True)
                time.sleep(0.2)  # let the failed rank read the acknowledgement before a store on this rank goes
                os._exit(2)

    threading.Thread(target=loop, name="dpt_fast-rank-failure-watch", daemon=True).start()


def run_on_rank0(fn: Callable[..., Any], *args, **kwargs) -> Any:
    """Run `fn(*args, **kwargs)` on rank 0 only while the other ranks wait; every rank returns its result.

    For work that is not sharded (SimCLR, UMAP, a logistic regression, writing a report): no two ranks write
    one file. The result must be JSON-able (it travels through the c10d store). An exception on rank 0 is
    reported to the others (`report_failure`), which raise its message as a UserError. Every rank must make
    the same sequence of calls.
    """
    if not is_distributed():
        return fn(*args, **kwargs)
    _watch()
    rank = dist.get_rank()
    key = f"dpt_fast/rank0/{next(_rank0_calls)}"
    store = _store()
    if store is None:  # plain collectives
        box: list[Any] = [None]
        if rank == 0:
            try:
                box = [("ok", fn(*args, **kwargs))]
            except Exception as e:
                box = [("error", str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}")]
                dist.broadcast_object_list(box, src=0)
                raise
        dist.broadcast_object_list(box, src=0)
        status, value = box[0]
        if status == "error":
            raise UserError(f"rank 0 failed: {value}")
        return value
    if rank == 0:
        try:
            result = fn(*args, **kwargs)
        except Exception as e:
            report_failure(str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}")
            raise
        store.set(key, json.dumps(result))
        return result
    pause = 0.01
    while not store.check([key]):
        _raise_if_failed()
        time.sleep(pause)
        pause = min(2 * pause, _POLL_S)
    return json.loads(store.get(key).decode())


def shutdown() -> None:
    """End of a successful run: stop watching for failures, wait for every rank, leave the process group."""
    if is_distributed():
        _state["stopped"] = True
        dist.barrier()
        dist.destroy_process_group()


_LONG_GROUPS: dict[float, object] = {}


def long_barrier(timeout: timedelta = timedelta(hours=2)) -> None:
    """A barrier in which the ranks wait up to `timeout` instead of the process group's collective timeout (NCCL's
    default is 10 minutes): for the ranks that wait while rank 0 alone does slow I/O (a large checkpoint's write).
    It runs on a gloo group of its own, created by the first call (which every rank makes at the same point)."""
    if not is_distributed():
        return
    _watch()
    _raise_if_failed()
    key = timeout.total_seconds()
    if key not in _LONG_GROUPS:
        _LONG_GROUPS[key] = dist.new_group(backend="gloo", timeout=timeout)
    dist.barrier(group=_LONG_GROUPS[key])
    _raise_if_failed()


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
    _watch()
    return dist.get_rank(), dist.get_world_size(), device
