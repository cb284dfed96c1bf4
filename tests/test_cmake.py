"""CMakeLists.txt: a CPU-only configure + build of csrc/ against the installed torch, and its ctest suite."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~45 CPU-seconds of C++ compilation (two translation units with the torch headers)
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_builds_the_extension_and_its_cpp_tests_pass(tmp_path):
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    cfg = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(tmp_path), *gen, f"-DPython3_EXECUTABLE={sys.executable}"],
                         capture_output=True, text=True)
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    build = subprocess.run(["cmake", "--build", str(tmp_path), "-j2"], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    test = subprocess.run(["ctest", "--test-dir", str(tmp_path), "--output-on-failure"], capture_output=True, text=True)
    assert test.returncode == 0 and "100% tests passed" in test.stdout, test.stdout + test.stderr
    assert list(tmp_path.glob("_C*.so")), "the Python module _C was not built"
