"""The README's main job, `python -m dpt_fast.stage --stage all`, as a user runs it (a subprocess), on the digits
preset: every file of the README's run-directory contract, and a kill in the middle of stage 2 that the next
run resumes from its last checkpoint instead of starting over."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow

# Enough training steps that stage 2 is still training a while after its first checkpoint.
ARGS = ["--config", "digits", "--quiet", "train.steps=400", "train.ckpt_every=20", "num_threads=1"]


def _cmd(run_dir, *extra):
    return [sys.executable, "-m", "dpt_fast.stage", "--stage", "all", "--run-dir", str(run_dir), *ARGS, *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_stage_all_writes_the_run_directory_contract_and_resumes_after_a_kill(tmp_path):
    run = tmp_path / "run"
    ckpts = run / "stage2" / "checkpoints"
    proc = subprocess.Popen(_cmd(run), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 600
        while not any(ckpts.glob("*.json")) if ckpts.is_dir() else True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "no stage-2 checkpoint after 10 minutes"
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (run / "stage2" / "metrics.json").exists()  # killed mid stage 2

    r = subprocess.run(_cmd(run), env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]

    # the README's run directory contract
    for name in ("config.yaml", "split.json", "samples.png", "report.json", "report.md", "stage1/metrics.json",
                 "stage1/pseudo_labels.npz", "stage2/metrics.json", "stage3/metrics.json"):
        assert (run / name).is_file(), name
    with np.load(run / "stage1" / "pseudo_labels.npz", allow_pickle=False) as z:
        assert z["index"].dtype == np.int64 and z["label"].dtype == np.int64 and z["prob"].dtype == np.float32
        assert len(z["index"]) == len(z["label"]) == len(z["prob"]) > 0
    m1 = json.loads((run / "stage1" / "metrics.json").read_text())
    m2 = json.loads((run / "stage2" / "metrics.json").read_text())
    m3 = json.loads((run / "stage3" / "metrics.json").read_text())
    assert 0 <= m1["pseudo_label_accuracy"] <= 1 and m1["labelled"] == 10 and m1["unlabelled"] > 0
    for key in ("fid", "is", "cas", "images_per_second", "seconds"):
        assert isinstance(m2[key], float), key
    assert 0 < m2["train_resumed_from"] < 400 and m2["train_steps"] == 400  # resumed, not restarted
    assert {"top1", "stage1_top1", "seconds"} <= set(m3) and 0 <= m3["top1"] <= 1
    assert any((run / "stage2" / "generated").glob("*.npz"))
    report = json.loads((run / "report.json").read_text())
    assert report["stages_finished"] == [1, 2, 3]
    md = (run / "report.md").read_text()
    assert "samples.png" in md

    # A third run has nothing left to do: every stage is reused, no stage's metrics rewritten.
    stamps = {n: (run / f"stage{n}" / "metrics.json").stat().st_mtime_ns for n in (1, 2, 3)}
    r = subprocess.run(_cmd(run), env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert {n: (run / f"stage{n}" / "metrics.json").stat().st_mtime_ns for n in (1, 2, 3)} == stamps
