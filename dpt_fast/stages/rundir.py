"""The run directory contract (README, "The run directory"): where each stage reads and writes, what proves a stage finished,
and the lock that keeps two processes out of one run directory.

    runs/<name>/
      config.yaml, split.json
      stage1/pseudo_labels.npz, stage1/metrics.json
      stage2/checkpoints/, stage2/generated/, stage2/metrics.json
      stage3/metrics.json
      stageN/outputs.json          the ledger of a finished stage (below)
      report.json, report.md, samples.png
      .lock                        held (flock) by the process working here

Outputs are verified, not trusted. A stage is finished when its ledger `stageN/outputs.json` exists (written
last, after metrics.json), names this config's fingerprint, and every output it lists is there with the
recorded size and sha256; the ledger also records the hashes of the earlier stages' outputs the stage read,
so a stage whose inputs were rebuilt differently runs again. A damaged or missing output is reported by
`check` so that the driver deletes it and re-runs the stage, which rebuilds only what is missing (one shard,
one checkpoint -> training resumes from the previous kept one, ...).
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import fnmatch
import json
import os
import shutil
import socket
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from ..utils import TEMP_SUFFIX, UserError, file_sha256, read_json, write_error, write_json

LEDGER = "outputs.json"
LOCK = ".lock"
# Files at the top of the run directory that a stage writes (everything in stageN/ is that stage's too).
TOP_LEVEL: dict[int, tuple[str, ...]] = {1: ("split.json",), 2: ("samples.png",), 3: ()}
# Sub-folders of a stage directory that hold logs, not outputs (TensorBoard event files grow while training).
LOGS = ("tb",)
# Outputs that later stages do not read, or whose bytes carry timings (a re-run rewrites them differently):
# a later stage does not key on them (the resumable checkpoints, the training log, metrics, the manifest).
NOT_INPUTS = ("metrics.json", "step-*", "train_history.json", "manifest.json")


@dataclass
class StageState:
    """What `RunDir.check` found: `metrics` when the stage is finished and intact, else `problem` (one phrase)
    and the `damaged` outputs (missing, or not the bytes the ledger recorded) to delete before re-running."""

    metrics: Optional[dict] = None
    problem: str = ""
    damaged: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.metrics is not None


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    # top level
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def split(self) -> Path:
        return self.root / "split.json"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def samples_png(self) -> Path:
        return self.root / "samples.png"

    def stage(self, n: int) -> Path:
        return self.root / f"stage{n}"

    def metrics(self, n: int) -> Path:
        return self.stage(n) / "metrics.json"

    # stage 1
    @property
    def pseudo_labels(self) -> Path:
        return self.stage(1) / "pseudo_labels.npz"

    # stage 2
    @property
    def checkpoints(self) -> Path:
        return self.stage(2) / "checkpoints"

    @property
    def generated(self) -> Path:
        return self.stage(2) / "generated"

    def ledger(self, n: int) -> Path:
        return self.stage(n) / LEDGER

    def rerun(self, n: int) -> str:
        """The advice that rebuilds stage n's outputs (a re-run rebuilds damaged ones)."""
        return f"re-run `python -m dpt_fast.stage --stage {n} --run-dir {self.root}`"

    def require(self, path: Path, stage: int) -> Path:
        """Raise the one-line 'run stage N first' error when a stage's output is missing."""
        if not path.exists():
            raise UserError(f"{path} is missing: run `python -m dpt_fast.stage --stage {stage} --run-dir {self.root}` first")
        return path

    # ------------------------------------------------------------------------------------------
    # Ledger: the outputs of a finished stage, their sizes and hashes
    # ------------------------------------------------------------------------------------------
    def outputs(self, n: int) -> list[Path]:
        """Every file stage n has written (logs, temporary files and the ledger itself left out)."""
        files = [self.root / name for name in TOP_LEVEL.get(n, ()) if (self.root / name).is_file()]
        d = self.stage(n)
        if d.is_dir():
            for p in sorted(d.rglob("*")):
                rel = p.relative_to(d)
                if (p.is_file() and rel.parts[0] not in LOGS and p.name != LEDGER
                        and not (p.name.startswith(".") and p.name.endswith(TEMP_SUFFIX))):
                    files.append(p)
        return files

    def _rel(self, p: Path) -> str:
        return p.relative_to(self.root).as_posix()

    def read_ledger(self, n: int) -> Optional[dict]:
        """Stage n's ledger as a dict, or None when there is none or it is unreadable."""
        try:
            led = read_json(self.ledger(n))
        except UserError:
            return None
        ok = isinstance(led, dict) and isinstance(led.get("files"), dict) and isinstance(led.get("inputs", {}), dict)
        return led if ok else None

    def _inputs(self, n: int) -> dict[str, str]:
        """sha256 of the outputs of stages 1..n-1 (from their ledgers) that later stages read (not NOT_INPUTS)."""
        out = {}
        for k in range(1, n):
            for rel, entry in ((self.read_ledger(k) or {}).get("files") or {}).items():
                if not any(fnmatch.fnmatch(Path(rel).name, pat) for pat in NOT_INPUTS):
                    out[rel] = entry.get("sha256") if isinstance(entry, dict) else None
        return out

    def record(self, n: int, fingerprint: str) -> None:
        """Write the ledger of stage n, which has just finished: the proof that it did (see the module doc)."""
        files = {self._rel(p): {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in self.outputs(n)}
        write_json(self.ledger(n), {"fingerprint": fingerprint, "files": files, "inputs": self._inputs(n)})

    def ledger_digest(self, n: int) -> Optional[str]:
        """sha256 of stage n's ledger file (None when there is none): changes whenever its outputs do."""
        return file_sha256(self.ledger(n)) if self.ledger(n).is_file() else None

    def check(self, n: int, fingerprint: str) -> StageState:
        """Whether stage n finished with this config and its outputs are intact (every byte is hashed)."""
        if not self.ledger(n).is_file():
            return StageState(problem="has not finished")
        led = self.read_ledger(n)
        if led is None:
            return StageState(problem=f"has a damaged ledger {self.ledger(n)}", damaged=[self.ledger(n)])
        if led.get("fingerprint") != fingerprint:
            return StageState(problem="was made with a different config")
        damaged = []
        for rel, entry in led["files"].items():
            p = self.root / rel
            try:
                intact = (isinstance(entry, dict) and p.is_file() and p.stat().st_size == entry.get("bytes")
                          and file_sha256(p) == entry.get("sha256"))
            except OSError:
                intact = False
            if not intact:
                damaged.append(p)
        if damaged:
            what = "is missing" if not damaged[0].exists() else "is damaged (not the bytes it wrote)"
            more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
            return StageState(problem=f"output {damaged[0]} {what}{more}", damaged=damaged)
        now = self._inputs(n)
        changed = sorted(k for k, v in led.get("inputs", {}).items() if now.get(k) != v)
        if changed:
            return StageState(problem=f"read {changed[0]}, which has changed since")
        try:
            metrics = read_json(self.metrics(n))
        except UserError:
            return StageState(problem=f"has no readable {self.metrics(n)}", damaged=[self.metrics(n)])
        if not isinstance(metrics, dict):
            return StageState(problem=f"has no readable {self.metrics(n)}", damaged=[self.metrics(n)])
        return StageState(metrics=metrics)

    def finished(self, n: int, fingerprint: str) -> dict | None:
        """The stage's metrics if it finished with this config and its outputs are intact, else None.

        A stage whose config changed runs again; it decides itself what of its old work it can reuse.
        """
        return self.check(n, fingerprint).metrics

    # ------------------------------------------------------------------------------------------
    # Lock
    # ------------------------------------------------------------------------------------------
    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run directory for this process (an flock on `.lock`, released by the OS when the process
        dies, so a dead holder's lock is simply taken over). A second process gets a one-line UserError
        naming the holder: pid, host, start time."""
        path = self.root / LOCK
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise (write_error(e, path) or e) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UserError(f"{self.root} is in use by another run ({_holder(path)}); wait for it to finish or "
                                "use another --run-dir") from None
            me = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds")}
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(me).encode() + b"\n", 0)
            except OSError as e:
                raise (write_error(e, path) or e) from None
            yield
        finally:
            os.close(fd)  # releases the flock

    def clear(self, n: int) -> None:
        """Remove one stage's outputs (for --fresh)."""
        d = self.stage(n)
        if d.exists():
            shutil.rmtree(d)
        for name in TOP_LEVEL.get(n, ()):
            (self.root / name).unlink(missing_ok=True)


def _holder(path: Path) -> str:
    """'pid P on host H since T' from a lock file (best effort: it may be mid-rewrite)."""
    try:
        h = json.loads(path.read_text())
        return f"pid {h['pid']} on host {h['host']} since {h['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"holder unknown, see {path}"
