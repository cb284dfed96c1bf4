"""`pytest bench/ --benchmark-only` is a documented command: it must run on CPU (GPU shapes skip)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_suite_runs_on_cpu(tmp_path):
    # One short round per benchmark: this checks that every benchmark runs, not how fast.
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "bench/", "--benchmark-only", "-q", "-p", "no:cacheprovider",
         "--benchmark-min-rounds=1", "--benchmark-max-time=0.01", "--benchmark-warmup=off",
         f"--benchmark-json={tmp_path / 'bench.json'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and "failed" not in r.stdout
    import json

    benchmarks = json.loads((tmp_path / "bench.json").read_text())["benchmarks"]
    assert len(benchmarks) >= 10 and all(b["stats"]["mean"] > 0 for b in benchmarks)
