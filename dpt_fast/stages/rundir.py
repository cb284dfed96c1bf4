"""The run directory contract (DESIGN.md): where each stage reads and writes.

    runs/<name>/
      config.yaml, split.json
      stage1/pseudo_labels.npz, stage1/metrics.json
      stage2/checkpoints/, stage2/generated/, stage2/metrics.json
      stage3/metrics.json
      report.json, report.md, samples.png
"""
from __future__ import annotations

import shutil
from pathlib import Path

from ..utils import UserError, read_json


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

    def require(self, path: Path, stage: int) -> Path:
        """Raise the one-line 'run stage N first' error when a stage's output is missing."""
        if not path.exists():
            raise UserError(f"{path} is missing: run `python -m dpt_fast.stage --stage {stage} --run-dir {self.root}` first")
        return path

    def finished(self, n: int, fingerprint: str) -> dict | None:
        """The stage's metrics if it finished with this config (same fingerprint), else None.

        A stage whose config changed runs again; it decides itself what of its old work it can reuse.
        """
        path = self.metrics(n)
        if not path.exists():
            return None
        m = read_json(path)
        return m if isinstance(m, dict) and m.get("fingerprint") == fingerprint else None

    def clear(self, n: int) -> None:
        """Remove one stage's outputs (for --fresh)."""
        d = self.stage(n)
        if d.exists():
            shutil.rmtree(d)
        if n == 1 and self.split.exists():
            self.split.unlink()
        if n == 2 and self.samples_png.exists():
            self.samples_png.unlink()
