"""Small shared helpers: user-facing errors, atomic writes, checked reads, hashes, seeding, devices, logging.

Everything here is a leaf: it imports nothing else from the package.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import tempfile
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

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
# Write errors: a full disk, a read-only or foreign directory, a file-size limit are the user's to fix.
# ----------------------------------------------------------------------------------------------
_WRITE_FIXES = {
    errno.ENOSPC: "free disk space (or use a --run-dir on another disk) and re-run: finished work is kept",
    errno.EDQUOT: "free space within your disk quota (or use another disk) and re-run: finished work is kept",
    errno.EROFS: "the file system is read-only: use a writable --run-dir",
    errno.EACCES: "make the directory writable for this user or use another --run-dir",
    errno.EPERM: "make the directory writable for this user or use another --run-dir",
    errno.EFBIG: "the file-size limit is too low (ulimit -f): raise it and re-run",
}
_OS_ERROR_IN_TEXT = re.compile(r"os error (\d+)")  # how safetensors (Rust) reports an I/O error


def error_number(e: BaseException) -> Optional[int]:
    """The errno of an OSError, or of an I/O error another library wrapped in its message (safetensors)."""
    if isinstance(e, OSError) and e.errno is not None:
        return e.errno
    m = _OS_ERROR_IN_TEXT.search(str(e))
    return int(m.group(1)) if m else None


def write_error(e: BaseException, path: str | os.PathLike) -> Optional[UserError]:
    """The one-line UserError for a failed write of `path` that the user can fix (disk full, read-only, no
    permission, file-size limit), or None for any other failure."""
    code = error_number(e)
    if code not in _WRITE_FIXES:
        return None
    return UserError(f"cannot write {path}: {os.strerror(code)}; {_WRITE_FIXES[code]}")


# ----------------------------------------------------------------------------------------------
# Atomic writes: write to a temporary file in the same directory, fsync, then os.replace.
# A kill at any point leaves either the old file or the new one, never a torn one; a failed write (disk
# full, ...) leaves the old file and no temporary file. A SIGKILL cannot clean up: `remove_stale_temp_files`
# removes the temporaries of dead writers (the run driver calls it under the run-directory lock).
# ----------------------------------------------------------------------------------------------
TEMP_SUFFIX = ".tmp"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`.

    A write that fails for a reason the user can fix raises a one-line UserError (see `write_error`).
    """
    path = Path(path)
    tmp: Optional[Path] = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give them the usual permissions
        os.replace(tmp, path)
    except Exception as e:
        err = None if isinstance(e, UserError) else write_error(e, path)
        if err is not None:
            raise err from None
        raise
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()


def remove_stale_temp_files(root: str | os.PathLike) -> list[Path]:
    """Delete the temporary files `atomic_path` leaves when its process is killed (`.<name>.<random>.tmp`)
    anywhere under `root`. Only call it while no other process writes there (e.g. under the run lock)."""
    removed = []
    for p in Path(root).rglob(f".*{TEMP_SUFFIX}"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Atomically write an uncompressed .npz (plain arrays only, loadable with allow_pickle=False).

    The bytes depend only on the arrays (every zip entry carries the same fixed date, where np.savez puts the
    clock), so the same arrays always give the same file and the same hash.
    """
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, a in arrays.items():
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                with zf.open(info, "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asanyarray(a), allow_pickle=False)


def save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                     metadata: Optional[dict[str, str]] = None) -> None:
    """Atomically write tensors (contiguous, any device) + string metadata as safetensors."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Reading: the one place that turns a missing, truncated, garbled or wrongly shaped file into a one-line
# UserError that names the file and the fix. `fix` is that advice; the default suits run-directory files.
# ----------------------------------------------------------------------------------------------
REBUILD = "re-run the stage that wrote it (a damaged output is rebuilt)"


def _read_error(path: Path, e: BaseException, fix: str) -> UserError:
    if isinstance(e, FileNotFoundError):
        return UserError(f"{path} is missing; {fix}")
    if isinstance(e, IsADirectoryError):
        return UserError(f"{path} is a directory, not a file; {fix}")
    if isinstance(e, UnicodeDecodeError):
        what = "not text (undecodable bytes)"
    elif isinstance(e, json.JSONDecodeError):
        what = f"not valid JSON ({e.msg} at line {e.lineno})"
    elif isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM):
        return UserError(f"cannot read {path}: {os.strerror(e.errno)}; make it readable for this user")
    else:
        first = (str(e).strip().splitlines() or [""])[0][:100]
        what = f"unreadable or damaged ({type(e).__name__}{': ' + first if first else ''})"
    return UserError(f"{path}: {what}; {fix}")


def read_text(path: str | os.PathLike, fix: str = REBUILD) -> str:
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise _read_error(path, e, fix) from None


def read_json(path: str | os.PathLike, fix: str = REBUILD) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError and UnicodeDecodeError
        raise _read_error(path, e, fix) from None


def read_yaml(path: str | os.PathLike, fix: str = "fix the file") -> Any:
    """A YAML file's content (safe loader: plain data only); None for an empty file."""
    import yaml

    path = Path(path)
    text = read_text(path, fix)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"{path}: not valid YAML ({first}); {fix}") from None


# Decoding failures of numpy's .npz/.npy and of safetensors files: truncation (BadZipFile, EOFError, zlib),
# garbled headers (ValueError, KeyError), a CRC mismatch (BadZipFile), I/O (OSError).
_NPY_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error)


def load_npz(path: str | os.PathLike, keys: tuple[str, ...] = (), fix: str = REBUILD,
             spec: Optional[dict[str, tuple[str, int]]] = None, only: bool = False) -> dict[str, np.ndarray]:
    """Load an .npz without unpickling (every entry read is read in full, so its zip CRC is checked).

    keys: arrays that must be present (only=True: read just those, e.g. the labels beside large images).
    spec: {name: (dtype kind(s) as in np.dtype.kind, e.g. "iu", ndim)} that those arrays must have.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise ValueError("a .npy array, not an .npz archive")
            out = {k: z[k] for k in z.files if not only or k in keys}
    except _NPY_ERRORS as e:
        raise _read_error(path, e, fix) from None
    missing = [k for k in keys if k not in out]
    if missing:
        raise UserError(f"{path}: missing arrays {missing}; {fix}")
    for name, (kinds, ndim) in (spec or {}).items():
        a = out.get(name)
        if a is not None and (a.dtype.kind not in kinds or a.ndim != ndim):
            raise UserError(f"{path}: array '{name}' is {a.dtype} with {a.ndim} dimension(s), expected "
                            f"{ndim} dimension(s) of kind '{kinds}'; {fix}")
    return out


def load_npy(path: str | os.PathLike, fix: str = REBUILD, mmap_mode: Optional[str] = None) -> np.ndarray:
    """A plain .npy array (no pickles), optionally memory-mapped."""
    path = Path(path)
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except _NPY_ERRORS as e:
        raise _read_error(path, e, fix) from None


def load_safetensors(path: str | os.PathLike, fix: str = REBUILD, finite: bool = False,
                     keys: Optional[Callable[[str], bool]] = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (CPU); `keys` selects names (the others are not read).

    finite=True also refuses NaN/inf in any floating tensor (weights that must never hold them).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            out = {k: f.get_tensor(k) for k in f.keys() if keys is None or keys(k)}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _read_error(path, e, fix) from None
    if finite:
        bad = next((k for k, v in out.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
        if bad is not None:
            raise UserError(f"{path}: tensor '{bad}' holds NaN or inf values; {fix}")
    return out


def safetensors_metadata(path: str | os.PathLike, fix: str = REBUILD) -> dict[str, str]:
    """The string metadata of a safetensors file's header (only the header is read)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _read_error(path, e, fix) from None


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
