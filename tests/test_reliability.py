"""Faults a user meets, each handled in one line: damaged files, disk and permission errors, bad config values,
two processes on one run directory, stale outputs and reports (the end-to-end replay is
scripts/fault_injection.py, tests/test_fault_injection.py)."""
import errno
import json
import os
import resource
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
import torch

from dpt_fast.config import Config, load_config
from dpt_fast.stage import main
from dpt_fast.stages import _save_config
from dpt_fast.stages.rundir import RunDir
from dpt_fast.utils import (UserError, atomic_path, load_npz, load_safetensors, read_json, remove_stale_temp_files,
                            safetensors_metadata, save_npz, save_safetensors, write_error, write_json)

ROOT = Path(__file__).resolve().parents[1]
GARBAGE = {"random bytes": bytes(range(256)) * 4, "empty": b"", "truncated": None}


def _damage(path: Path, how: str) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2] if how == "truncated" else GARBAGE[how])


def _one_line(e: pytest.ExceptionInfo, path: Path) -> str:
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


# ----------------------------------------------------------------------------------------------
# Reading: every decoding error is a one-line UserError naming the file and the fix
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", list(GARBAGE))
def test_damaged_json_npz_safetensors_and_yaml_are_one_line_errors_naming_the_file(tmp_path, how):
    js, npz, st, yml = tmp_path / "a.json", tmp_path / "b.npz", tmp_path / "c.safetensors", tmp_path / "d.yaml"
    write_json(js, {"x": list(range(50))})
    save_npz(npz, x=np.arange(100))
    save_safetensors(st, {"w": torch.ones(100)}, {"k": "v"})
    yml.write_text("preset: digits\nseed: 3\n" + "# padding\n" * 20)
    for path, read in ((js, read_json), (npz, load_npz), (st, load_safetensors), (st, safetensors_metadata),
                       (yml, load_config)):
        _damage(path, how) if path.stat().st_size else None
        if how == "truncated" and path == yml:
            continue  # half a YAML file of comments is still a valid config
        with pytest.raises(UserError) as e:
            read(str(path)) if read is load_config else read(path)
        _one_line(e, path)


def test_an_empty_config_file_is_an_error_not_the_default_run(tmp_path):
    (tmp_path / "c.yaml").write_text("")
    with pytest.raises(UserError, match="is empty"):
        load_config(str(tmp_path / "c.yaml"))


def test_npz_arrays_of_the_wrong_kind_or_shape_are_refused(tmp_path):
    save_npz(tmp_path / "p.npz", label=np.zeros((3, 2)))
    with pytest.raises(UserError, match="'label'"):
        load_npz(tmp_path / "p.npz", ("label",), spec={"label": ("iu", 1)})


def test_nan_weights_are_refused_when_finite_is_asked(tmp_path):
    save_safetensors(tmp_path / "w.safetensors", {"w": torch.tensor([1.0, float("nan")])})
    with pytest.raises(UserError, match="NaN"):
        load_safetensors(tmp_path / "w.safetensors", finite=True)


def test_save_npz_bytes_depend_only_on_the_arrays(tmp_path):
    a = {"x": np.arange(7), "y": np.ones((2, 3), np.float32)}
    save_npz(tmp_path / "1.npz", **a)
    os.utime(tmp_path / "1.npz", (0, 0))
    save_npz(tmp_path / "2.npz", **a)
    assert (tmp_path / "1.npz").read_bytes() == (tmp_path / "2.npz").read_bytes()
    assert all(np.array_equal(load_npz(tmp_path / "1.npz")[k], v) for k, v in a.items())


# ----------------------------------------------------------------------------------------------
# Writing: disk full, read-only, file-size limit -> one line, nothing half-written
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "free disk space"), (errno.EROFS, "read-only"),
                                         (errno.EACCES, "writable"), (errno.EFBIG, "ulimit -f")])
def test_write_errors_the_user_can_fix_become_one_line(tmp_path, code, words):
    err = write_error(OSError(code, os.strerror(code)), tmp_path / "x")
    assert isinstance(err, UserError) and words in str(err) and "\n" not in str(err)
    wrapped = Exception(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")  # safetensors
    assert write_error(wrapped, tmp_path / "x") is not None
    assert write_error(OSError(errno.EINVAL, "bad"), tmp_path / "x") is None


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    write_json(tmp_path / "m.json", {"old": 1})
    with pytest.raises(UserError, match="No space left"):
        with atomic_path(tmp_path / "m.json") as tmp:
            tmp.write_text("half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert read_json(tmp_path / "m.json") == {"old": 1} and os.listdir(tmp_path) == ["m.json"]


def _cli(run_dir, *extra, limit_bytes=None, timeout=300):
    def limit():
        if limit_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run([sys.executable, "-m", "dpt_fast.stage", "--stage", "1", "--config", "digits", "--quiet",
                           "--run-dir", str(run_dir), "num_threads=1", *extra], cwd=ROOT, capture_output=True,
                          text=True, preexec_fn=limit, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _temp_files(root: Path) -> list:
    return [p for p in root.rglob(".*.tmp")]


@pytest.mark.slow
def test_the_file_size_limit_is_one_line_exit_2_and_leaves_nothing_half_written(tmp_path):
    r = _cli(tmp_path / "run", limit_bytes=20_000)  # config.yaml and split.json fit, the SimCLR encoder does not
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "ulimit -f" in lines[0], r.stderr[-2000:]
    assert not _temp_files(tmp_path / "run") and not (tmp_path / "run" / "stage1" / "metrics.json").exists()


@pytest.mark.slow
def test_a_read_only_run_directory_is_one_line_exit_2(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: make the directory read-only in a private mount namespace
        code = (f"import sys; sys.argv = ['x', '--stage', '1', '--config', 'digits', '--run-dir', '{run}']; "
                "from dpt_fast.stage import main; sys.exit(main())")
        r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            f"mount --bind -o ro {run} {run} && exec {sys.executable} -c \"{code}\""],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
        if "mount" in r.stderr and r.returncode != 2:
            pytest.skip(f"no unprivileged mount namespace here: {r.stderr.strip()[:200]}")
        rc, err = r.returncode, r.stderr
    else:
        run.chmod(0o555)
        try:
            rc, err = main(["--stage", "1", "--config", "digits", "--run-dir", str(run)]), capsys.readouterr().err
        finally:
            run.chmod(0o755)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and ("read-only" in lines[0] or "writable" in lines[0]), err[-2000:]
    assert os.listdir(run) == []


# ----------------------------------------------------------------------------------------------
# The run-directory lock
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_second_process_on_the_run_directory_is_refused_with_the_holder(tmp_path):
    rd = RunDir(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from dpt_fast.stages.rundir import RunDir\n"
                               f"with RunDir({str(rd.root)!r}).lock():\n print('locked', flush=True); time.sleep(60)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError) as e:
            with rd.lock():
                pass
        msg = _one_line(e, rd.root)
        assert f"pid {holder.pid} on host " in msg and " since " in msg and "another --run-dir" in msg
    finally:
        holder.kill()
        holder.wait()
    with rd.lock():  # the holder died: its lock is taken over
        assert json.loads((rd.root / ".lock").read_text())["pid"] == os.getpid()


def test_a_stale_lock_file_of_a_dead_process_is_taken_over(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.root.mkdir()
    (rd.root / ".lock").write_text(json.dumps({"pid": 999999, "host": "elsewhere", "started": "yesterday"}))
    with rd.lock():
        assert json.loads((rd.root / ".lock").read_text())["pid"] == os.getpid()


# ----------------------------------------------------------------------------------------------
# Config values
# ----------------------------------------------------------------------------------------------
def _float_keys(obj=None, prefix=""):
    from dataclasses import fields, is_dataclass

    obj = Config() if obj is None else obj
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        v = getattr(obj, f.name)
        if is_dataclass(v):
            yield from _float_keys(v, f"{prefix}{f.name}.")
        elif hints[f.name] is float or typing.get_origin(hints[f.name]) is tuple:
            yield f"{prefix}{f.name}", typing.get_origin(hints[f.name]) is tuple


@pytest.mark.parametrize("key, is_pair", list(_float_keys()))
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_every_float_key_refuses_nan_and_inf(key, is_pair, bad):
    value = f"[{bad}, 0.9]" if is_pair else bad
    with pytest.raises(UserError, match=f"'{key}': must be a finite number"):
        load_config("digits", [f"{key}={value}"])


@pytest.mark.parametrize("item", ["train.lr=-1", "train.lr=0", "sample.cfg_scale=-0.5", "train.betas=[0.9, 1.5]",
                                  "train.ema_decay=1.0", "train.p_uncond=1", "stage1.ssl_noise=-0.1",
                                  "stage1.ssl_lr=0", "stage1.ssl_temperature=0", "diffusion.beta_1=0.05",
                                  "diffusion.discrete_beta_end=0.0001", "train.weight_decay=-1", "seed=-1",
                                  "train.grad_clip=-1", "stage1.umap_min_dist=2", "train.log_every=0"])
def test_out_of_range_values_are_one_line_errors_naming_the_key(item):
    with pytest.raises(UserError, match=f"'{item.split('=')[0]}'") as e:
        load_config("digits", [item])
    assert "\n" not in str(e.value)


def test_runtime_keys_alone_do_not_rewrite_config_yaml(tmp_path):
    rd = RunDir(tmp_path)
    _save_config(load_config("digits"), rd)
    stamp = rd.config.stat().st_mtime_ns, rd.config.read_bytes()
    _save_config(load_config("digits", ["device=cpu", "num_threads=1"]), rd)
    assert (rd.config.stat().st_mtime_ns, rd.config.read_bytes()) == stamp
    _save_config(load_config("digits", ["seed=3"]), rd)
    assert load_config(str(rd.config)).seed == 3


# ----------------------------------------------------------------------------------------------
# The ledger: a stage is finished when its outputs check out
# ----------------------------------------------------------------------------------------------
def _fake_stage(rd: RunDir, n: int, fp: str = "fp") -> None:
    rd.stage(n).mkdir(parents=True, exist_ok=True)
    save_npz(rd.stage(n) / "out.npz", x=np.arange(10 * n))
    write_json(rd.metrics(n), {"seconds": 1.0, "fingerprint": fp})
    (rd.stage(n) / "tb").mkdir(exist_ok=True)
    (rd.stage(n) / "tb" / "events").write_bytes(b"grows while training")
    rd.record(n, fp)


def test_a_stage_is_finished_only_while_its_recorded_outputs_check_out(tmp_path):
    rd = RunDir(tmp_path)
    assert rd.check(1, "fp").problem == "has not finished"
    _fake_stage(rd, 1)
    assert rd.check(1, "fp").ok and not rd.check(1, "other").ok
    (rd.stage(1) / "tb" / "events").write_bytes(b"logs are not outputs")
    assert rd.check(1, "fp").ok
    out = rd.stage(1) / "out.npz"
    save_npz(out, x=np.arange(10) + 1)  # valid file, other bytes
    state = rd.check(1, "fp")
    assert not state.ok and state.damaged == [out] and "damaged" in state.problem
    out.unlink()
    assert "missing" in rd.check(1, "fp").problem


def test_a_later_stage_runs_again_when_an_earlier_stage_rebuilt_its_outputs_differently(tmp_path):
    rd = RunDir(tmp_path)
    _fake_stage(rd, 1)
    _fake_stage(rd, 2)
    write_json(rd.metrics(1), {"seconds": 2.0, "fingerprint": "fp"})  # a re-run with new timings only
    rd.record(1, "fp")
    assert rd.check(2, "fp").ok
    save_npz(rd.stage(1) / "out.npz", x=np.arange(3))  # a re-run that changed what stage 2 read
    rd.record(1, "fp")
    assert "changed since" in rd.check(2, "fp").problem


def test_temporary_files_of_killed_writers_are_removed(tmp_path):
    (tmp_path / "stage2" / "generated").mkdir(parents=True)
    dead = [tmp_path / ".samples.png.x1y2.tmp", tmp_path / "stage2" / "generated" / ".shard-00001.npz.abcd.tmp"]
    for p in dead:
        p.write_bytes(b"half")
    (tmp_path / "keep.tmp").write_bytes(b"not ours")
    assert sorted(remove_stale_temp_files(tmp_path)) == sorted(dead)
    assert (tmp_path / "keep.tmp").exists()


def test_the_report_is_stale_when_its_sources_or_files_change(tmp_path):
    from dpt_fast.eval.report import report_is_current, write_report

    rd, cfg = RunDir(tmp_path), load_config("digits")
    write_json(rd.metrics(1), {"pseudo_label_accuracy": 0.5, "test_top1": 0.4, "seconds": 1.0})
    write_report(cfg, rd, sources={"stage1": "a"})
    assert report_is_current(rd, {"stage1": "a"}) and not report_is_current(rd, {"stage1": "b"})
    rd.report_md.write_text(rd.report_md.read_text() + "edited\n")
    assert not report_is_current(rd, {"stage1": "a"})


def test_a_cut_short_or_missing_run_config_is_an_error_not_a_fallback_to_defaults(tmp_path, capsys):
    rd = RunDir(tmp_path / "run")
    _save_config(load_config("digits", ["seed=5"]), rd)
    text = rd.config.read_text()
    rd.config.write_text(text[: len(text) // 2].rsplit("\n", 1)[0] + "\n")  # cut at a line end: valid YAML
    assert main(["--stage", "3", "--run-dir", str(rd.root)]) == 2
    assert "config.yaml is incomplete" in capsys.readouterr().err
    rd.config.unlink()
    _fake_stage(rd, 1)
    assert main(["--stage", "3", "--run-dir", str(rd.root)]) == 2
    err = capsys.readouterr().err
    assert "config.yaml is missing" in err and "--config" in err
