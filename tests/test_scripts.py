"""The README's tuning table comes from scripts/tune_stage2.py: it must keep running."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tune_stage2_reports_loss_label_spread_cas_and_fid_at_each_milestone():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "tune_stage2.py"), "smoke", "--milestones", "2,4",
                        "--k", "2", "--cfgs", "0,3", "train.batch_size=8"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [l for l in r.stdout.splitlines() if l.startswith("[smoke]")]
    assert len(lines) == 2 and "step 4 images 32" in lines[1]
    for line in lines:
        assert "label spread" in line and line.count("CAS") == 2 and line.count("FID") == 2
