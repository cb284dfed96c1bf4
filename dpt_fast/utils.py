"""Small shared helpers: user-facing errors, atomic writes, seeding, devices, logging.

Everything here is a leaf: it imports nothing else from the package.
"""
from __future__ import annotations

import json
import logging
import os
import random
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

log = logging.getLogger("dpt_fast")

_UMASK = os.umask(0)
os.umask(_UMASK)


class UserError(Exception):
    """A problem the user can fix (bad input, missing stage output, bad key).

    The CLI prints the message as one line and exits with code 2, without a traceback.
    Messages name the file or key at fault and the fix.
    """


# ----------------------------------------------------------------------------------------------
# Atomic writes: write to a temporary file in the same directory, fsync, then os.replace.
# A kill at any point leaves either the old file or the new one, never a torn one.
# ----------------------------------------------------------------------------------------------
@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give them the usual permissions
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); delete it and re-run the stage that wrote it") from None


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Atomically write an uncompressed .npz (plain arrays only, loadable with allow_pickle=False)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def load_npz(path: str | os.PathLike, keys: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Load an .npz without unpickling; check that `keys` are present."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except (ValueError, OSError) as e:
        raise UserError(f"{path}: cannot read ({e}); delete it and re-run the stage that wrote it") from None
    missing = [k for k in keys if k not in out]
    if missing:
        raise UserError(f"{path}: missing arrays {missing}; delete it and re-run the stage that wrote it")
    return out


# ----------------------------------------------------------------------------------------------
# Reproducibility and devices
# ----------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda if available else cpu; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name} was asked for but CUDA is not available; use device=cpu or device=auto")
    return torch.device(name)


def setup_logging(quiet: bool = False) -> None:
    level = logging.WARNING if quiet else logging.INFO
    if not log.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("[dpt_fast] %(message)s"))
        log.addHandler(h)
    log.setLevel(level)
    log.propagate = False


def human_seconds(s: float) -> str:
    m, s = divmod(int(round(s)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"
