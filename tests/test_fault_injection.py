"""The short variant of scripts/fault_injection.py (the long one, with >= 30 kills and every case, is run on demand
and its table is in docs/RELIABILITY.md): kills at random points, damaged artifacts, bad inputs, a second process,
a diverging loss, a stale cache, each handled as the table says."""
import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fault_injection.py"


def test_the_short_fault_injection_suite_handles_every_case(tmp_path):
    spec = importlib.util.spec_from_file_location("fault_injection", SCRIPT)
    fi = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = fi  # its dataclasses look their module up
    spec.loader.exec_module(fi)
    cases = fi.suite(tmp_path, short=True, kills_n=2, seed=0, log=lambda *a: None)
    faults = {c.fault for c in cases}
    assert len(faults) >= 6 and len(cases) >= 20
    bad = [f"{c.fault}: {c.case}: {c.detail}" for c in cases if not c.handled]
    assert not bad, "\n".join(bad)
