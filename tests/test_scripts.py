"""The README's tuning tables come from scripts/tune_stage2.py and scripts/sweep_sampler.py: they must keep running."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}  # the scripts import the package they ship with


@pytest.mark.slow
def test_tune_stage2_reports_loss_label_spread_cas_and_fid_at_each_milestone():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "tune_stage2.py"), "smoke", "--milestones", "2,4",
                        "--k", "2", "--cfgs", "0,3", "train.batch_size=8"], capture_output=True, text=True, timeout=600,
                       env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [l for l in r.stdout.splitlines() if l.startswith("[smoke]")]
    assert len(lines) == 2 and "step 4 images 32" in lines[1]
    for line in lines:
        assert "label spread" in line and line.count("CAS") == 2 and line.count("FID") == 2


@pytest.mark.slow
def test_sweep_sampler_scores_every_variant_on_the_same_trained_model(tmp_path):
    from dpt_fast.config import load_config
    from dpt_fast.stages import run_stages
    from dpt_fast.stages.rundir import RunDir

    cfg = load_config("digits", ["model.embed_dim=32", "model.depth=2", "train.steps=4", "sample.steps=3",
                                 "gen.k_per_class=2", "eval.cas_steps=0", "stage1.method=pca_logreg"])
    rd = RunDir(tmp_path / "run")
    run_stages(cfg, rd.root, [1, 2], progress=False)  # stage 1 in a second: PCA + logistic regression

    out = tmp_path / "sweep"
    variants = ["base", "o1 sample.order=1 +clip=static", "last1 +final_first_order=true", "cfg +interval=0.5,1"]
    cmd = [sys.executable, str(ROOT / "scripts" / "sweep_sampler.py"), str(rd.root), "--out", str(out)]
    r = subprocess.run(cmd + [a for v in variants for a in ("--variant", v)], capture_output=True, text=True,
                       timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [row["name"] for row in rows] == ["base", "o1", "last1", "cfg"]
    assert all(isinstance(row["fid"], float) and 0 <= row["cas"] <= 1 and row["step"] == 4 for row in rows)
    assert all((out / f"{row['name']}.png").is_file() for row in rows)
