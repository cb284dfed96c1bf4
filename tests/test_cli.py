"""The CLI contract (README, "What the stages do"): errors are one line with exit code 2, config resolution, run directory."""
import subprocess
import sys

import pytest
import yaml

from dpt_fast.stage import main


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "dpt_fast.stage", *args], capture_output=True, text=True, cwd=cwd)


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in stderr
    return lines[0]


def test_stage2_before_stage1_names_stage1(run_dir):
    r = _cli("--stage", "2", "--config", "digits", "--run-dir", str(run_dir))
    assert r.returncode == 2
    line = _one_error_line(r.stderr)
    assert "--stage 1" in line and "stage1" in line


def test_stage3_before_stage2_names_stage2(run_dir, capsys):
    (run_dir / "stage1").mkdir(parents=True)
    assert main(["--stage", "3", "--config", "digits", "--run-dir", str(run_dir)]) == 2
    assert "--stage 2" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["train.stepz=3"], "did you mean 'train.steps'"),
        (["split.labels_per_class=zero"], "expected int"),
        (["--config", "nosuch"], "unknown preset 'nosuch'"),
        (["--config", "missing.yaml"], "missing.yaml does not exist"),
    ],
)
def test_bad_config_is_one_line_exit_2(run_dir, args, fragment, capsys):
    assert main(["--stage", "1", "--run-dir", str(run_dir), *args]) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1


def test_bad_stage_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--stage", "4"])
    assert e.value.code == 2


def test_run_dir_config_is_reused_without_repeating_overrides(run_dir, capsys):
    from dpt_fast.stage import _parse, resolve

    cfg, rd = resolve(_parse(["--stage", "1", "--config", "digits", "--run-dir", str(run_dir), "seed=7"]))
    run_dir.mkdir(parents=True)
    from dpt_fast.config import dump_yaml

    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    again, _ = resolve(_parse(["--stage", "2", "--run-dir", str(run_dir), "train.steps=5"]))
    assert again.seed == 7 and again.data.name == "digits" and again.train.steps == 5
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["seed"] == 7


def test_atomic_writes_get_normal_permissions(tmp_path):
    import os
    import stat

    from dpt_fast.utils import write_json

    write_json(tmp_path / "a.json", {"x": 1})
    mode = stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask
