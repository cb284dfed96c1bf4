"""Fault injection for `python -m dpt_fast.stage --stage all` on the digits preset, as a user meets the faults.

    python scripts/fault_injection.py                     # the long variant: >= 30 kills and every case
    python scripts/fault_injection.py --short             # the CI variant (tests/test_fault_injection.py)
    python scripts/fault_injection.py --kills 50 --json results.json --work /tmp/fi

First an uninterrupted reference run. Then, each in a fresh run directory:

- kill -9 at random moments of a run, then the same command again: the final outputs must equal the reference
  (bit for bit; JSON files up to their timing fields), the report must be up to date, no temporary file left;
- corrupted or missing artifacts (random bytes, cut in half, deleted, or valid files with other content) in
  a finished run, then the same command: the damage must be detected and repaired to the reference, or stop
  with a one-line error (exit 2) whose advice, followed, does;
- bad config and data inputs: one line, exit 2, and a finished run left as it was;
- a full disk (a small tmpfs, where unprivileged mount namespaces exist), a file-size limit, a read-only run
  directory: one line, exit 2, no half-written file; once space is back, the same command finishes the run;
- a second process on a run directory in use: refused in one line naming the holder, the first unaffected;
- a diverging loss (SimCLR, stage 2): one line, exit 2, no NaN/inf tensor on disk;
- stale caches: a changed config key reuses nothing that depends on it (result = a fresh run's);
- a failing rank (2 gloo processes, an injected error on one rank): every rank ends within 30 s.

Prints a markdown table (fault, tries, handled, how) and writes every case's outcome to --json.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Iterator

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
CONFIG = ["--config", "digits", "num_threads=1"]  # the reference run's config (config.yaml holds it afterwards)
# JSON fields that measure time (or how a run was resumed), not what was computed.
TIMING = re.compile(r"(seconds|per_second)$|^(train_resumed_from|created)$")
NOT_COMPARED = {".lock", "report.json", "report.md"}
TIMED = ("metrics.json", "step-*.json", "manifest.json")  # outputs that record timings  # report.* are checked by `report_problems` instead
LOGS = ("stage2/tb/",)


@dataclass
class Case:
    fault: str
    case: str
    handled: bool
    detail: str = ""


# ----------------------------------------------------------------------------------------------
# Running the CLI
# ----------------------------------------------------------------------------------------------
def stage_cmd(run_dir: Path, *extra: str, stage: str = "all") -> list[str]:
    return [PY, "-m", "dpt_fast.stage", "--stage", stage, "--quiet", "--run-dir", str(run_dir), *extra]


def run(cmd: list[str], timeout: float = 900, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout, **kw)


def run_in_process(argv: list[str]) -> tuple[int | str, str]:
    """`python -m dpt_fast.stage ARGV` in this process (no start-up cost): (exit code or 'traceback', stderr)."""
    from dpt_fast.stage import main

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            rc = main(argv)
    except BaseException as e:  # noqa: BLE001 - an escaping exception is a traceback to the user
        return "traceback", f"{err.getvalue()}Traceback: {type(e).__name__}: {e}"
    return rc, err.getvalue()


def error_line(rc, stderr: str) -> str | None:
    """The one-line error of a failed run, or None when it is not exactly one `error:` line without traceback."""
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error: ")]
    if rc != 2 or len(lines) != 1 or "Traceback" in stderr:
        return None
    return lines[0]


# ----------------------------------------------------------------------------------------------
# Comparing a run directory with the reference
# ----------------------------------------------------------------------------------------------
def _files(root: Path) -> dict[str, Path]:
    out = {}
    for p in root.rglob("*"):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in NOT_COMPARED and not rel.startswith(LOGS):
            out[rel] = p
    return out


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if not TIMING.search(k)}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _same(a: Path, b: Path, allow_missing: tuple[str, ...] = ()) -> bool:
    if a.name == "outputs.json":  # the ledger: the same outputs (files with timings aside: their hashes differ)
        la, lb = json.loads(a.read_text()), json.loads(b.read_text())

        def kept(led):
            return {k: v for k, v in led["files"].items()
                    if not any(fnmatch(Path(k).name, pat) for pat in TIMED) and k not in allow_missing}

        return la["fingerprint"] == lb["fingerprint"] and kept(la) == kept(lb) and la["inputs"] == lb["inputs"]
    if a.suffix == ".json":
        return _strip(json.loads(a.read_text())) == _strip(json.loads(b.read_text()))
    return a.read_bytes() == b.read_bytes()


def differences(run_dir: Path, ref: Path, allow_missing: tuple[str, ...] = ()) -> list[str]:
    """What differs between a run directory and the reference (empty: identical outputs)."""
    mine, theirs = _files(run_dir), _files(ref)
    diffs = [f"missing {k}" for k in sorted(set(theirs) - set(mine)) if k not in allow_missing]
    diffs += [f"extra {k}" for k in sorted(set(mine) - set(theirs))]
    for k in sorted(set(mine) & set(theirs)):
        try:
            if not _same(mine[k], theirs[k], allow_missing):
                diffs.append(f"differs {k}")
        except (ValueError, KeyError, UnicodeDecodeError):
            diffs.append(f"unreadable {k}")
    return diffs


def report_problems(run_dir: Path) -> list[str]:
    """Why the report is not up to date (empty: it is): made from other outputs, or other metrics than stageN's."""
    from dpt_fast.config import load_config
    from dpt_fast.eval.report import report_is_current
    from dpt_fast.stages import _report_sources
    from dpt_fast.stages.rundir import RunDir

    rd = RunDir(run_dir)
    try:
        cfg = load_config(str(rd.config))
        if not report_is_current(rd, _report_sources(cfg, rd)):
            return ["report not up to date"]
        stages = json.loads(rd.report_json.read_text())["stages"]
        for n in (1, 2, 3):
            if _strip(stages.get(str(n))) != _strip(json.loads(rd.metrics(n).read_text())):
                return [f"report shows other stage-{n} metrics"]
    except Exception as e:  # noqa: BLE001
        return [f"report unreadable ({type(e).__name__}: {e})"]
    return []


def temp_files(run_dir: Path) -> list[str]:
    return [p.relative_to(run_dir).as_posix() for p in run_dir.rglob(".*.tmp")]


def nonfinite_tensors(run_dir: Path) -> list[str]:
    """Files under run_dir holding a NaN/inf float tensor or array."""
    from safetensors.numpy import load_file

    bad = []
    for p in run_dir.rglob("*.safetensors"):
        if any(v.dtype.kind == "f" and not np.isfinite(v).all() for v in load_file(str(p)).values()):
            bad.append(p.relative_to(run_dir).as_posix())
    for p in run_dir.rglob("*.npz"):
        with np.load(p, allow_pickle=False) as z:
            if any(z[k].dtype.kind == "f" and not np.isfinite(z[k]).all() for k in z.files):
                bad.append(p.relative_to(run_dir).as_posix())
    return bad


def verdict(run_dir: Path, ref: Path, allow_missing: tuple[str, ...] = ()) -> list[str]:
    return differences(run_dir, ref, allow_missing) + report_problems(run_dir) + [
        f"temporary file {t}" for t in temp_files(run_dir)]


# ----------------------------------------------------------------------------------------------
# Kills
# ----------------------------------------------------------------------------------------------
def _where(run_dir: Path) -> str:
    """Roughly where a killed run was: before its config was saved, in the first stage without a ledger, or after."""
    if not (run_dir / "config.yaml").exists():
        return "start-up"
    return next((f"stage {n}" for n in (1, 2, 3) if not (run_dir / f"stage{n}" / "outputs.json").exists()), "report")


def kills(ref: Path, ref_seconds: float, n: int, rng: random.Random, work: Path, concurrent: bool) -> Iterator[Case]:
    for i in range(n):
        d = work / f"kill{i:02d}"
        at = rng.uniform(0.0, ref_seconds)
        proc = subprocess.Popen(stage_cmd(d, *CONFIG), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        if concurrent and i == 0:
            yield _second_process(d, proc)
        t0 = time.time()
        while time.time() - t0 < at and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        where = _where(d)
        r = run(stage_cmd(d, *CONFIG))  # the same command again
        problems = [] if r.returncode == 0 and "Traceback" not in r.stderr else [f"exit {r.returncode}: {r.stderr[-300:]}"]
        problems += verdict(d, ref)
        yield Case("kill -9 at a random point, then the same command", f"t={at:.1f}s ({where})", not problems,
                   "; ".join(problems[:3]))
        shutil.rmtree(d, ignore_errors=True)


def _second_process(run_dir: Path, first: subprocess.Popen) -> Case:
    """While `first` works in run_dir, a second run (another seed) there must be refused naming the holder."""
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if json.loads((run_dir / ".lock").read_text())["pid"] == first.pid:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    r = run(stage_cmd(run_dir, *CONFIG, "seed=1"))
    line = error_line(r.returncode, r.stderr)
    ok = line is not None and f"pid {first.pid} on host" in line and first.poll() is None
    return Case("second process on a run directory in use", "another seed, same --run-dir", ok,
                line or f"exit {r.returncode}: {r.stderr[-300:]}")


def concurrent_full(ref: Path, work: Path) -> Case:
    """A second process refused, and the first one's outputs equal the reference."""
    d = work / "concurrent"
    first = subprocess.Popen(stage_cmd(d, *CONFIG), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    case = _second_process(d, first)
    first.wait()
    problems = ([] if first.returncode == 0 else [f"first run exit {first.returncode}"]) + verdict(d, ref)
    shutil.rmtree(d, ignore_errors=True)
    return Case(case.fault, "same config, first run finishes unaffected", case.handled and not problems,
                "; ".join([case.detail] + problems[:3]))


# ----------------------------------------------------------------------------------------------
# Corruption
# ----------------------------------------------------------------------------------------------
ARTIFACTS = ["config.yaml", "split.json", "stage1/metrics.json", "stage1/pseudo_labels.npz", "stage1/space.json",
             "stage1/space.npz", "stage1/encoder.safetensors", "stage1/head.safetensors", "stage1/outputs.json",
             "stage2/checkpoints/step-00000030.safetensors", "stage2/checkpoints/step-00000030.json",
             "stage2/checkpoints/step-00000010.safetensors", "stage2/generated/manifest.json",
             "stage2/generated/shard-00001.npz", "stage2/train_history.json", "stage2/metrics.json",
             "stage2/outputs.json", "samples.png", "stage3/head.safetensors", "stage3/metrics.json",
             "stage3/outputs.json", "report.json", "report.md", ".lock"]
# A damaged checkpoint older than the newest is dropped, not made again (training is past it).
MAY_GO = {"stage2/checkpoints/step-00000010.safetensors": ("stage2/checkpoints/step-00000010.safetensors",
                                                          "stage2/checkpoints/step-00000010.json")}


def _random_bytes(p: Path) -> None:
    p.write_bytes(np.random.default_rng(0).integers(0, 256, max(64, p.stat().st_size), dtype=np.uint8).tobytes())


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _delete(p: Path) -> None:
    p.unlink()


def _npz_other(p: Path, key: str, fn) -> None:
    from dpt_fast.utils import save_npz

    z = dict(np.load(p, allow_pickle=False))
    z[key] = fn(z[key])
    save_npz(p, **z)


def _tensor_bytes(p: Path, value: float) -> None:
    raw = bytearray(p.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    raw[start:start + 4] = struct.pack("<f", value)
    p.write_bytes(bytes(raw))


def _json_other(p: Path, fn) -> None:
    p.write_text(json.dumps(fn(json.loads(p.read_text()))))


SEMANTIC = [
    ("split.json", "other valid indices [0, 1, 2]", lambda p: _json_other(p, lambda d: {**d, "labelled": [0, 1, 2]})),
    ("split.json", "negative indices", lambda p: _json_other(p, lambda d: {**d, "labelled": [-5] + d["labelled"][1:]})),
    ("stage1/pseudo_labels.npz", "valid file, other labels", lambda p: _npz_other(p, "label", lambda a: (a + 1) % 10)),
    ("stage1/encoder.safetensors", "a NaN written into a weight", lambda p: _tensor_bytes(p, float("nan"))),
    ("stage1/head.safetensors", "other coefficient bytes", lambda p: _tensor_bytes(p, 7.0)),
    ("stage2/checkpoints/step-00000030.safetensors", "a NaN written into a tensor",
     lambda p: _tensor_bytes(p, float("nan"))),
    ("stage2/checkpoints/step-00000030.safetensors", "other valid tensor bytes", lambda p: _tensor_bytes(p, 0.5)),
    ("stage2/generated/shard-00001.npz", "valid shard, other pixels", lambda p: _npz_other(p, "images", lambda a: 255 - a)),
    ("stage1/metrics.json", "valid JSON, other numbers", lambda p: _json_other(p, lambda d: {**d, "test_top1": 0.99})),
    ("stage2/metrics.json", "valid JSON, other FID", lambda p: _json_other(p, lambda d: {**d, "fid": 1.0})),
    ("stage2/generated/manifest.json", "valid JSON, not complete", lambda p: _json_other(p, lambda d: {**d, "complete": False})),
]


def _follow(argv: list[str], line: str, run_dir: Path) -> list[list[str]]:
    """The commands an error's advice says to run before the original one again."""
    cmds = [c.split()[3:] for c in re.findall(r"`(python -m dpt_fast\.stage [^`]*)`", line)]
    if "--config" in line and not cmds:  # "pass --config PRESET|FILE ..." : the reference's
        return [argv + CONFIG]
    return cmds + [argv]


def corruption(ref: Path, work: Path, which: list[tuple[str, str, object]]) -> Iterator[Case]:
    for i, (rel, how, damage) in enumerate(which):
        d = work / f"corrupt{i:02d}"
        shutil.copytree(ref, d)
        damage(d / rel)
        argv = ["--stage", "all", "--quiet", "--run-dir", str(d)]
        rc, err = run_in_process(argv)
        steps = [f"exit {rc}"]
        if rc == 2:
            line = error_line(rc, err)
            if line is None:
                yield Case("corrupted or missing artifact", f"{rel}: {how}", False, f"not one line: {err[-300:]}")
                shutil.rmtree(d, ignore_errors=True)
                continue
            steps.append(line[:160])
            for cmd in _follow(argv, line, d):
                rc, err = run_in_process(cmd)
                steps.append(f"followed: {' '.join(cmd[:2])} ... -> exit {rc}")
        problems = ([] if rc == 0 else [f"exit {rc}: {err[-300:]}"]) + verdict(d, ref, MAY_GO.get(rel, ()))
        yield Case("corrupted or missing artifact", f"{rel}: {how}", not problems,
                   "; ".join(problems[:3]) or " | ".join(steps))
        shutil.rmtree(d, ignore_errors=True)


def corruption_cases(short: bool) -> list[tuple[str, str, object]]:
    generic = [(rel, how, fn) for rel in ARTIFACTS
               for how, fn in (("random bytes", _random_bytes), ("cut in half", _truncate), ("deleted", _delete))]
    cases = generic + [(rel, how, fn) for rel, how, fn in SEMANTIC]
    if short:
        pick = {("stage2/generated/shard-00001.npz", "cut in half"), ("config.yaml", "random bytes"),
                ("stage1/pseudo_labels.npz", "deleted"), ("stage2/checkpoints/step-00000030.safetensors",
                                                          "a NaN written into a tensor"),
                ("split.json", "other valid indices [0, 1, 2]"), ("report.md", "deleted")}
        cases = [c for c in cases if (c[0], c[1]) in pick]
    return cases


# ----------------------------------------------------------------------------------------------
# Bad config and data inputs
# ----------------------------------------------------------------------------------------------
def _yaml(what: str, text: str | bytes):
    def make(work: Path) -> list[str]:
        p = work / "bad.yaml"
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        return ["--config", str(p)]
    make.__doc__ = f"--config FILE.yaml: {what}"
    return make


def _one_class_folder(work: Path) -> list[str]:
    """an ImageFolder with one class folder"""
    from PIL import Image

    root = work / "one_class"
    (root / "cat").mkdir(parents=True, exist_ok=True)
    for i in range(12):
        Image.fromarray(np.full((8, 8, 3), 20 * i, np.uint8)).save(root / "cat" / f"{i}.png")
    return ["data.name=imagefolder", f"data.root={root}", "data.image_size=8"]


BAD_INPUTS = [
    ["sample.cfg_scale=nan"], ["sample.cfg_scale=inf"], ["sample.cfg_scale=-1"], ["train.lr=nan"], ["train.lr=-1"],
    ["train.lr=0"], ["train.betas=[0.9, 1.5]"], ["train.betas=[nan, 0.99]"], ["train.ema_decay=1.5"],
    ["train.p_uncond=1"], ["stage1.ssl_noise=nan"], ["stage1.ssl_lr=-1"], ["stage1.ssl_temperature=0"],
    ["diffusion.beta_1=0.01"], ["diffusion.num_timesteps=0"], ["seed=-1"], ["split.seed=-3"],
    ["split.labels_per_class=0"], ["split.labels_per_class=1000"], ["split.fraction=1.5"], ["gen.k_per_class=0"],
    ["sample.order=4"], ["train.stepz=3"], ["split.labels_per_class=zero"], ["stage1.umap_min_dist=2"],
    ["train.batch_size=0"], ["--config", "nosuch"], ["--config", "missing.yaml"], _yaml("empty", ""),
    _yaml("random bytes", bytes(range(256))), _yaml("a list", "- a\n- b\n"), _yaml("unknown preset", "preset: nosuch\n"),
    _yaml("unknown key", "preset: digits\ntrain:\n  stepz: 3\n"),
    ["data.name=imagefolder"], _one_class_folder, ["data.name=cifar10", "data.root=/nonexistent"],
    ["split.subset_file=/nonexistent.txt"], ["stage1.method=features"], ["model.preset=nosuch"],
    ["eval.feature_net=/nonexistent.safetensors"], ["stage1.ssl_lr=1e6"],
]


def bad_inputs(ref: Path, work: Path, short: bool) -> Iterator[Case]:
    import torch

    items = BAD_INPUTS[:: max(1, len(BAD_INPUTS) // 8)] if short else list(BAD_INPUTS)
    if not torch.cuda.is_available():
        items.append(["device=cuda"])
    for i, item in enumerate(items):
        d = work / f"bad{i:02d}"
        shutil.copytree(ref, d)
        extra = item(work) if callable(item) else list(item)
        argv = ["--stage", "all", "--quiet", "--run-dir", str(d), *(extra if "--config" in extra else CONFIG + extra)]
        rc, err = run_in_process(argv)
        line = error_line(rc, err)
        # (a valid config that fails while its stage runs is saved as the run's config.yaml: not damage)
        untouched = [u for u in differences(d, ref) if u != "differs config.yaml"]
        name = item.__doc__ if callable(item) else " ".join(extra)
        ok = line is not None and not untouched and not temp_files(d) and not nonfinite_tensors(d)
        yield Case("bad config or data input", name[:80], ok, line[:160] if ok else f"{err[-300:]} {untouched[:3]}")
        shutil.rmtree(d, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Disk full, file-size limit, read-only
# ----------------------------------------------------------------------------------------------
def _can_unshare() -> bool:
    r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    return r.returncode == 0


def disk_full(ref: Path, work: Path, sizes: list[str]) -> Iterator[Case]:
    """A run on a tmpfs of `size`: it must stop in one line; after `mount -o remount,size=...` (space freed) the
    same command finishes the run, equal to the reference."""
    for size in sizes:
        d = work / f"full_{size}"
        mnt = d / "mnt"
        mnt.mkdir(parents=True)
        cmd = " ".join(stage_cmd(mnt / "run", *CONFIG))
        script = (f"mount -t tmpfs -o size={size} tmpfs {mnt} && cd {REPO} && "
                  f"{{ {cmd} > {d}/err1 2>&1; echo $? > {d}/rc1; }} && "
                  f"find {mnt}/run -name '.*.tmp' > {d}/tmps1 && "
                  f"mount -o remount,size=200m {mnt} && "
                  f"{{ {cmd} > {d}/err2 2>&1; echo $? > {d}/rc2; }} && cp -a {mnt}/run {d}/run")
        subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], env=ENV, timeout=900)
        rc1 = (d / "rc1").read_text().strip() if (d / "rc1").exists() else "?"
        line = error_line(int(rc1) if rc1.isdigit() else rc1, (d / "err1").read_text() if (d / "err1").exists() else "")
        problems = [] if line and "No space left" in line else [f"first run: exit {rc1}, no one-line ENOSPC error"]
        problems += [f"temporary file {t}" for t in (d / "tmps1").read_text().split()] if (d / "tmps1").exists() else []
        rc2 = (d / "rc2").read_text().strip() if (d / "rc2").exists() else "?"
        problems += [] if rc2 == "0" else [f"after freeing space: exit {rc2}"]
        problems += verdict(d / "run", ref) if (d / "run").exists() else ["no run copied out"]
        yield Case("disk full (ENOSPC)", f"tmpfs of {size}", not problems,
                   "; ".join(problems[:3]) or (line or "")[:160])
        shutil.rmtree(d, ignore_errors=True)


def file_size_limit(ref: Path, work: Path, limits: list[int]) -> Iterator[Case]:
    import resource

    for limit in limits:
        d = work / f"fsize_{limit}"

        def cap(limit=limit):
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        r = run(stage_cmd(d, *CONFIG), preexec_fn=cap)
        line = error_line(r.returncode, r.stderr)
        problems = [] if line and "ulimit -f" in line else [f"exit {r.returncode}: {r.stderr[-300:]}"]
        problems += [f"temporary file {t}" for t in temp_files(d)]
        r2 = run(stage_cmd(d))  # the limit raised: the same command again
        problems += ([] if r2.returncode == 0 else [f"after raising the limit: exit {r2.returncode}"]) + verdict(d, ref)
        yield Case("file-size limit (EFBIG)", f"ulimit -f of {limit} bytes", not problems,
                   "; ".join(problems[:3]) or (line or "")[:160])
        shutil.rmtree(d, ignore_errors=True)


def read_only(ref: Path, work: Path) -> Case:
    d = work / "readonly"
    d.mkdir(parents=True)
    cmd = stage_cmd(d, *CONFIG)
    if os.geteuid() == 0:  # root writes anywhere: a read-only bind mount in a private mount namespace
        r = run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                 f"mount --bind -o ro {d} {d} && exec {' '.join(cmd)}"])
    else:
        d.chmod(0o555)
        r = run(cmd)
        d.chmod(0o755)
    line = error_line(r.returncode, r.stderr)
    problems = [] if line and ("read-only" in line or "writable" in line) else [f"exit {r.returncode}: {r.stderr[-300:]}"]
    problems += [f"wrote {p.name}" for p in d.iterdir()]
    r2 = run(cmd)  # writable again
    problems += ([] if r2.returncode == 0 else [f"once writable: exit {r2.returncode}"]) + verdict(d, ref)
    shutil.rmtree(d, ignore_errors=True)
    return Case("read-only run directory", "fresh run directory", not problems, "; ".join(problems[:3]) or line[:160])


# ----------------------------------------------------------------------------------------------
# Divergence, stale caches, rank failures
# ----------------------------------------------------------------------------------------------
def divergence(ref: Path, work: Path, short: bool) -> Iterator[Case]:
    for key in ["stage1.ssl_lr=1e6"] + ([] if short else ["train.lr=1e6"]):
        d = work / f"nan_{key}"
        rc, err = run_in_process(["--stage", "all", "--quiet", "--run-dir", str(d), *CONFIG, key, "train.log_every=30"])
        line = error_line(rc, err)
        problems = [] if line and key.split("=")[0] in line else [f"exit {rc}: {err[-300:]}"]
        problems += [f"non-finite values in {f}" for f in nonfinite_tensors(d)] if d.exists() else []
        if not short:
            rc2, err2 = run_in_process(["--stage", "all", "--quiet", "--run-dir", str(d), *CONFIG])
            problems += ([] if rc2 == 0 else [f"with the default value: exit {rc2}"]) + verdict(d, ref)
        yield Case("diverging loss (NaN)", key, not problems, "; ".join(problems[:3]) or line[:160])
        shutil.rmtree(d, ignore_errors=True)


def stale_caches(ref: Path, work: Path, short: bool) -> Iterator[Case]:
    """A changed key on a finished run gives what a fresh run with that key gives."""
    for key, stage in [("stage1.ssl_noise=0.3", "1")] + ([] if short else [("sample.cfg_scale=1.0", "all"),
                                                                            ("stage1.umap_min_dist=0.3", "1")]):
        a, b = work / "stale_reused", work / "stale_fresh"
        shutil.copytree(ref, a)
        rc_a, err_a = run_in_process(["--stage", stage, "--quiet", "--run-dir", str(a), *CONFIG, key])
        rc_b, err_b = run_in_process(["--stage", stage, "--quiet", "--run-dir", str(b), *CONFIG, key])
        same = ["stage1/pseudo_labels.npz"] + (["stage2/generated/shard-00000.npz"] if stage == "all" else [])
        problems = [f"exit {rc_a}/{rc_b}"] if (rc_a, rc_b) != (0, 0) else []
        problems += [f"{f} differs from a fresh run's" for f in same if (a / f).read_bytes() != (b / f).read_bytes()]
        yield Case("stale cache", f"{key} on a finished run", not problems, "; ".join(problems[:3]) or
                   "equal to a fresh run with the new value")
        shutil.rmtree(a, ignore_errors=True)
        shutil.rmtree(b, ignore_errors=True)
    # Runtime keys (device, num_threads) on a finished run: nothing is redone, config.yaml is not rewritten.
    d = work / "runtime_keys"
    shutil.copytree(ref, d)
    stamps = {p: p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file() and p.name != ".lock"}
    rc, err = run_in_process(["--stage", "all", "--quiet", "--run-dir", str(d), "device=cpu", "num_threads=2"])
    changed = [p.relative_to(d).as_posix() for p, t in stamps.items() if p.stat().st_mtime_ns != t]
    yield Case("stale cache", "device=cpu num_threads=2 on a finished run", rc == 0 and not changed,
                    f"exit {rc}, rewritten: {changed[:3]}" if rc or changed else "nothing redone or rewritten")
    shutil.rmtree(d, ignore_errors=True)


_RANK_WRAPPER = r'''
import errno, os, sys
from dpt_fast.utils import UserError
inject, rank = sys.argv[1], int(os.environ["RANK"])
if inject == "shard_write_fails_on_rank1" and rank == 1:
    import dpt_fast.sampling.generate
    g = sys.modules["dpt_fast.sampling.generate"]  # (the package exports a function of the same name)
    def full(path, **arrays):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    g.save_npz = full
if inject == "evaluation_fails_on_rank0" and rank == 0:
    import dpt_fast.stages.stage2 as s2
    def broken(*a, **k):
        raise UserError("injected: the feature network cannot be read")
    s2._evaluate = broken
if inject == "pseudo_labels_unreadable_on_rank1" and rank == 1:
    import dpt_fast.stages.stage2 as s2
    def broken(*a, **k):
        raise UserError("injected: pseudo_labels.npz cannot be read on this rank")
    s2.load_pseudo_labels = broken
from dpt_fast.stage import main
sys.exit(main(sys.argv[2:]))
'''


def rank_failures(ref: Path, work: Path, short: bool) -> Iterator[Case]:
    import socket

    injects = ["shard_write_fails_on_rank1"] + ([] if short else ["evaluation_fails_on_rank0",
                                                                   "pseudo_labels_unreadable_on_rank1"])
    for inject in injects:
        d = work / f"rank_{inject}"
        shutil.copytree(ref, d)
        for p in ("stage2", "stage3", "samples.png"):
            shutil.rmtree(d / p, ignore_errors=True) if (d / p).is_dir() else (d / p).unlink(missing_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = [subprocess.Popen([PY, "-c", _RANK_WRAPPER, inject, "--stage", "2", "--quiet", "--run-dir", str(d)],
                                  cwd=REPO, stderr=subprocess.PIPE, text=True,
                                  env={**ENV, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for r in range(2)]
        ended: dict[int, float] = {}
        deadline = time.time() + 600
        while len(ended) < 2 and time.time() < deadline:
            ended.update({r: time.time() for r, p in enumerate(procs) if r not in ended and p.poll() is not None})
            time.sleep(0.05)
        for p in procs:
            p.kill()
        errs = [p.stderr.read() for p in procs]
        gap = max(ended.values()) - min(ended.values()) if len(ended) == 2 else float("inf")
        lines = [error_line(p.returncode, e) for p, e in zip(procs, errs)]
        problems = [] if gap < 30 else [f"ranks ended {gap:.0f} s apart"]
        problems += [f"rank {r}: exit {procs[r].returncode}: {errs[r][-200:]}" for r in range(2) if lines[r] is None]
        problems += [f"temporary file {t}" for t in temp_files(d)]
        yield Case("one rank fails (2 gloo processes)", inject.replace("_", " "), not problems,
                   "; ".join(problems[:3]) or f"both ranks exit 2 in one line, {gap:.1f} s apart")
        shutil.rmtree(d, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# The suite
# ----------------------------------------------------------------------------------------------
HOW = {
    "kill -9 at a random point, then the same command": "resumed; outputs equal an uninterrupted run's, report up to "
                                                        "date, temporary files of the killed run removed",
    "corrupted or missing artifact": "the stage ledger (sha256 of every output) finds it; the re-run rebuilds only "
                                     "it, or stops in one line whose advice, followed, finishes the run",
    "bad config or data input": "one line, exit 2, the finished run untouched",
    "disk full (ENOSPC)": "one line, exit 2, nothing half-written; with space back the run finishes",
    "file-size limit (EFBIG)": "one line, exit 2, nothing half-written; with the limit raised the run finishes",
    "read-only run directory": "one line, exit 2, nothing written",
    "second process on a run directory in use": "refused in one line naming pid, host, start time",
    "diverging loss (NaN)": "one line naming the key, exit 2, no NaN/inf tensor on disk",
    "stale cache": "every cache keys on the config fields it reads (tests/test_cache_keys.py)",
    "one rank fails (2 gloo processes)": "the failed rank's error ends every rank (c10d store watcher), one line each",
}


def suite(work: Path, short: bool, kills_n: int, seed: int, log=print) -> list[Case]:
    rng = random.Random(seed)
    ref = work / "reference"
    t0 = time.time()
    r = run(stage_cmd(ref, *CONFIG))
    ref_seconds = time.time() - t0
    if r.returncode != 0:
        raise SystemExit(f"the reference run failed: {r.stderr[-2000:]}")
    log(f"reference run: {ref_seconds:.1f} s")
    cases: list[Case] = []

    def add(new):  # one case or a generator of cases, logged as each one ends
        for c in [new] if isinstance(new, Case) else new:
            cases.append(c)
            log(f"  {'ok ' if c.handled else 'BAD'} {c.fault}: {c.case}" + ("" if c.handled else f" -- {c.detail}"))

    add(kills(ref, ref_seconds, kills_n, rng, work, concurrent=True))
    add(corruption(ref, work, corruption_cases(short)))
    add(bad_inputs(ref, work, short))
    add(divergence(ref, work, short))
    add(stale_caches(ref, work, short))
    if not short:
        add(concurrent_full(ref, work))
        add(file_size_limit(ref, work, [20_000, 300_000]))
        add(read_only(ref, work))
        if _can_unshare():
            add(disk_full(ref, work, ["300k", "2m", "10m"]))
        else:
            log("  (no unprivileged mount namespace: the tmpfs disk-full cases are skipped)")
        add(rank_failures(ref, work, short))
    return cases


def table(cases: list[Case]) -> str:
    rows = ["| fault | tries | handled | how |", "|---|---|---|---|"]
    for fault in dict.fromkeys(c.fault for c in cases):
        mine = [c for c in cases if c.fault == fault]
        rows.append(f"| {fault} | {len(mine)} | {sum(c.handled for c in mine)} | {HOW.get(fault, '')} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--short", action="store_true", help="the CI variant: a few kills and cases")
    p.add_argument("--kills", type=int, default=None, help="kill points (default: 30, --short: 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    p.add_argument("--json", default=None, help="write every case's outcome here")
    args = p.parse_args(argv)
    kills_n = args.kills if args.kills is not None else (2 if args.short else 30)
    with tempfile.TemporaryDirectory(prefix="dpt_fault_") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        cases = suite(work, args.short, kills_n, args.seed)
        print(f"\n{time.strftime('%Y-%m-%d')}, `python scripts/fault_injection.py {' '.join(argv or sys.argv[1:])}` "
              f"({time.time() - t0:.0f} s):\n")
        print(table(cases))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(c) for c in cases], indent=1) + "\n")
    bad = [c for c in cases if not c.handled]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
