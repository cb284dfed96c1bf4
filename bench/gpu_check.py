"""The prepared GPU check (run it through bench/gpu_check.sh): every GPU test, benchmark and profile in one go.

    bench/gpu_check.sh OUT_DIR               # on a GPU machine: <= 8 minutes on one H100/H200
    bench/gpu_check.sh --dry-run OUT_DIR     # CPU rehearsal: the same entry points at tiny sizes

Parts, most important first, each in its own process group with its own time limit (a hang costs that part's
limit, never the whole budget; parts that no longer fit the 470-second budget are skipped and say so):

    tests            pytest -m gpu over the test files with GPU tests (attention backends vs fp64 math with
                     gradients, the CUDA update kernel, CUDA-graph U-ViT == eager for every schedule x prediction x
                     CFG, no host sync in training steps, DALI GPU decode, bf16 kernels vs Inductor vs reference)
    kernels          tests/test_kernels.py: every Triton kernel variant against its reference, on the GPU
    profile_*        python -m dpt_fast.profile for U-ViT-H/2 and U-ViT-L/2 latent-256: train (batch 128) and
                     50-step CFG sampling (batch 64, CUDA graph)
    bench_*          pytest bench/ -m gpu: train step per kernel mode and the real loop, fused kernels vs eager vs
                     compiled, sampler update and 50-step generation with / without graphs, attention backends,
                     DALI mixed decode

Writes into OUT_DIR: <part>.log for each part, the pytest JSON / JUnit files, profile_*.json, and summary.json +
summary.md (printed at the end). On a machine without CUDA and without --dry-run it writes a summary saying so
and exits 0. Exit code 1 when a part failed or timed out.

What it needs: the repository (a fresh copy is fine), a
Python with torch (CUDA build), numpy, triton, safetensors, tqdm, pyyaml, pytest, pytest-benchmark, Pillow and
(for the DALI parts) nvidia-dali-cuda130 -- the preflight lists what is missing. The C++/CUDA extension:
dpt_fast/_C*.so built with DPT_FAST_BUILD_CUDA=1 (carry it), else gpu_check.sh builds it for this GPU when nvcc is
found (`pip install "cuda-toolkit[nvcc,cccl]"`), else the CUDA update kernel's tests skip and the sampler uses its
PyTorch update.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 470  # 8 minutes less the preflight and the summary
REQUIRED = ("torch", "numpy", "triton", "safetensors", "tqdm", "yaml", "pytest", "pytest_benchmark", "PIL")
OPTIONAL = {"nvidia.dali": "the DALI GPU decode test and benchmark skip (pip install nvidia-dali-cuda130)",
            "xformers": "the xformers attention backend skips"}
GPU_TESTS = ["tests/test_attention.py", "tests/test_csrc.py", "tests/test_generate.py", "tests/test_train.py",
             "tests/test_uvit.py", "tests/test_data_imagefolder.py"]
BENCH_OPTS = ["--benchmark-only", "--benchmark-min-rounds=3", "--benchmark-max-time=0.2", "-p", "no:cacheprovider"]
DRY_BENCH_OPTS = ["--benchmark-only", "--benchmark-min-rounds=1", "--benchmark-max-time=0.01", "--benchmark-warmup=off",
                  "-p", "no:cacheprovider"]


@dataclass
class Part:
    name: str
    limit_s: int
    argv: list[str]  # on the GPU
    dry_argv: list[str]  # the CPU rehearsal
    outputs: list[str] = field(default_factory=list)  # files it writes into OUT_DIR (for the summary)


def _pytest(*args: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "-q", *args]


def _profile(mode: str, preset: str, batch: int, steps: int, out: str, device: str) -> list[str]:
    return [sys.executable, "-m", "dpt_fast.profile", "--mode", mode, "--preset", preset, "--batch-size", str(batch),
            "--steps", str(steps), "--device", device, "--json", out]


def parts(out: Path) -> list[Part]:
    def o(name: str) -> str:
        return str(out / name)

    def bench(name: str, files: list[str], limit: int, gpu_k: str, dry_k: str) -> Part:
        gpu = _pytest(*files, "-m", "gpu", *(["-k", gpu_k] if gpu_k else []), *BENCH_OPTS, f"--benchmark-json={o(name + '.json')}")
        dry = _pytest(*files, "-k", dry_k, *DRY_BENCH_OPTS, f"--benchmark-json={o(name + '.json')}")
        return Part(name, limit, gpu, dry, [name + ".json"])

    profiles = []
    for key, preset in (("h2", "U-ViT-H/2"), ("l2", "U-ViT-L/2")):
        for mode, batch, steps in (("train", 128, 10), ("sample", 64, 50)):
            name = f"profile_{key}_{mode}"
            profiles.append(Part(name, 45 if key == "h2" else 35,
                                 _profile(mode, preset, batch, steps, o(name + ".json"), "cuda"),
                                 _profile(mode, "uvit_digits", 8, 2 if mode == "train" else 5, o(name + ".json"), "cpu"),
                                 [name + ".json"]))
    return [
        Part("tests", 100, _pytest("-m", "gpu", *GPU_TESTS, "-p", "no:cacheprovider", f"--junitxml={o('tests.xml')}"),
             _pytest("-m", "gpu", *GPU_TESTS, "-p", "no:cacheprovider", f"--junitxml={o('tests.xml')}"), ["tests.xml"]),
        Part("kernels", 60, _pytest("tests/test_kernels.py", "-p", "no:cacheprovider", f"--junitxml={o('kernels.xml')}"),
             # CPU: the sm_90 cubin build of the widest kernel variants (the interpreter run is CI's)
             _pytest("tests/test_kernels.py", "-k", "cubin", "-p", "no:cacheprovider", f"--junitxml={o('kernels.xml')}"),
             ["kernels.xml"]),
        profiles[0], profiles[1],
        bench("bench_kernels", ["bench/bench_kernels.py"], 50, "", "cpu"),
        # compiling U-ViT-H/2's training step costs minutes: its compiled mode is left to bench_uvit by hand
        bench("bench_uvit", ["bench/bench_uvit.py"], 90, "not (compiled and h2)", "cpu"),
        bench("bench_sampler", ["bench/bench_sampler.py"], 70, "", "update_cpu"),
        bench("bench_attention", ["bench/bench_attention.py"], 30, "", "cpu"),
        bench("bench_dali", ["bench/bench_data.py"], 30, "dali_gpu", "decode_crop_cpu and dali_cpu"),
        profiles[2], profiles[3],
    ]


def preflight(dry: bool) -> tuple[dict, list[str]]:
    """(environment facts, problems that stop the check)."""
    missing = [m for m in REQUIRED if importlib.util.find_spec(m) is None]
    env = {"python": sys.version.split()[0], "missing": missing, "notes": []}
    if missing:
        return env, [f"missing Python modules: {', '.join(missing)} (pip install -r requirements.txt, or at least "
                     f"torch numpy triton safetensors tqdm pyyaml pytest pytest-benchmark pillow)"]
    for mod, what in OPTIONAL.items():
        try:
            found = importlib.util.find_spec(mod) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            env["notes"].append(f"{mod} not installed: {what}")
    import torch

    env.update(torch=torch.__version__, cuda=torch.version.cuda, gpu=None)
    if torch.cuda.is_available():
        env.update(gpu=torch.cuda.get_device_name(), capability=".".join(map(str, torch.cuda.get_device_capability())))
    elif not dry:
        return env, []
    sys.path.insert(0, str(ROOT))
    from dpt_fast.ops.dpm_solver_update import cpp_available

    env["cuda_update_kernel"] = cpp_available("cuda")
    if not env["cuda_update_kernel"]:
        env["notes"].append("dpt_fast._C has no CUDA kernel: the CUDA update tests skip, the sampler uses PyTorch's")
    return env, []


def run_part(p: Part, argv: list[str], out: Path, limit: int) -> dict:
    t0 = time.time()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with open(out / f"{p.name}.log", "w") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the part and everything it started
            proc.wait()
            rc, status = None, "timeout"
    return {"status": status, "rc": rc, "seconds": round(time.time() - t0, 1), "limit_s": limit, "log": f"{p.name}.log"}


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------
def _junit(path: Path) -> dict | None:
    if not path.is_file():
        return None
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    return {"passed": n["tests"] - n["failures"] - n["errors"] - n["skipped"], "failed": n["failures"] + n["errors"],
            "skipped": n["skipped"], "failed_tests": failed}


def _benchmarks(path: Path) -> list[dict] | None:
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return [{"name": b["name"], "mean_ms": round(b["stats"]["mean"] * 1e3, 3), **b.get("extra_info", {})}
            for b in data.get("benchmarks", [])]


def summarize(out: Path, env: dict, results: dict, dry: bool) -> dict:
    summary = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "dry_run": dry, "environment": env,
               "parts": results, "tests": {}, "benchmarks": {}, "profiles": {}}
    for name in ("tests", "kernels"):
        if (r := _junit(out / f"{name}.xml")) is not None:
            summary["tests"][name] = r
    for name in results:
        if name.startswith("bench_") and (b := _benchmarks(out / f"{name}.json")) is not None:
            summary["benchmarks"][name] = b
        if name.startswith("profile_") and (out / f"{name}.json").is_file():
            summary["profiles"][name] = json.loads((out / f"{name}.json").read_text())
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(summary))
    return summary


def markdown(s: dict) -> str:
    env = s["environment"]
    lines = [f"# GPU check {s['date']}{' (dry run on CPU)' if s['dry_run'] else ''}", "",
             f"GPU: {env.get('gpu') or 'none'} (capability {env.get('capability', '-')}), torch {env.get('torch', '?')} "
             f"(CUDA {env.get('cuda')}), Python {env['python']}, CUDA update kernel: {env.get('cuda_update_kernel')}"]
    lines += [f"- {n}" for n in env.get("notes", [])]
    if s.get("stopped"):
        lines += ["", f"**Not run: {s['stopped']}**"]
    lines += ["", "| part | status | seconds (limit) |", "|---|---|---|"]
    lines += [f"| {k} | {v['status']} | {v.get('seconds', '-')} ({v.get('limit_s', '-')}) |" for k, v in s["parts"].items()]
    for name, t in s["tests"].items():
        lines += ["", f"{name}: {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped"]
        lines += [f"- FAILED {f}" for f in t["failed_tests"]]
    if s["profiles"]:
        lines += ["", "| profile | images/s | model TFLOP/s | MFU | peak memory GiB | backends |", "|---|---|---|---|---|---|"]
        for k, p in s["profiles"].items():
            mfu = "-" if p["mfu"] is None else f"{100 * p['mfu']:.1f} %"
            backends = ", ".join(f"{a}={b}" for a, b in p["backends"].items())
            lines.append(f"| {k} ({p['preset']}, batch {p['batch_size']}) | {p['images_per_second']:.1f} | "
                         f"{p['tflops']:.3g} | {mfu} | {p['peak_memory_bytes'] / 2**30:.1f} | {backends} |")
    for name, rows in s["benchmarks"].items():
        lines += ["", f"{name}:", "", "| benchmark | mean ms | extra |", "|---|---|---|"]
        for r in rows:
            extra = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("name", "mean_ms"))
            lines.append(f"| {r['name']} | {r['mean_ms']} | {extra} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--dry-run", action="store_true", help="CPU rehearsal of every part at tiny sizes")
    ap.add_argument("--budget", type=int, default=BUDGET_S, help="seconds for all parts together")
    ap.add_argument("--only", nargs="*", help="run only these parts")
    args = ap.parse_args(argv)
    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env, problems = preflight(args.dry_run)
    results: dict[str, dict] = {}
    stopped = None
    if problems:
        stopped = "; ".join(problems)
    elif env.get("gpu") is None and not args.dry_run:
        stopped = "no CUDA GPU on this machine (use --dry-run for the CPU rehearsal)"
    if stopped:
        print(f"gpu_check: {stopped}", file=sys.stderr)
    else:
        start = time.time()
        for p in parts(out):
            if args.only and p.name not in args.only:
                continue
            left = int(args.budget - (time.time() - start))
            if left < 10:
                results[p.name] = {"status": "skipped (budget)", "limit_s": p.limit_s}
                continue
            limit = min(p.limit_s, left)
            print(f"gpu_check: {p.name} (limit {limit} s) ...", flush=True)
            results[p.name] = run_part(p, p.dry_argv if args.dry_run else p.argv, out, limit)
            print(f"gpu_check: {p.name}: {results[p.name]['status']} in {results[p.name]['seconds']} s", flush=True)
    summary = summarize(out, env, results, args.dry_run)
    if stopped:
        summary["stopped"] = stopped
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (out / "summary.md").write_text(markdown(summary))
    print((out / "summary.md").read_text())
    if problems:
        return 1
    return 1 if any(r["status"] in ("failed", "timeout") for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
