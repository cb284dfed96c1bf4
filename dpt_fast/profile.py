"""`python -m dpt_fast.profile` -- throughput, model FLOP/s, MFU and memory of a U-ViT preset, training or sampling.

    python -m dpt_fast.profile --mode train --preset U-ViT-H/2                 # batch 128, bf16 on CUDA
    python -m dpt_fast.profile --mode sample --preset U-ViT-H/2 --steps 50     # 50-step DPM-Solver++, CFG 0.4
    python -m dpt_fast.profile --mode train --preset uvit_digits --device cpu --batch-size 8 --steps 3
    options: [--batch-size B] [--steps S] [--device cpu|cuda] [--json OUT] [--trace DIR] [--compile] [--no-graph]

train: the real stage-2 loop (`train_diffusion`: draws, bf16 autocast on CUDA, backward, clipping, fused AdamW,
EMA, the loss window) on random data already on the device, timed over S steps after 3 warm-up steps (the run is
stopped before its final checkpoint). sample: `generate`'s batch sampler (one forward of 2B rows
per step for CFG, the fused update, the loop in a CUDA graph on CUDA), timed over 3 batches after one warm-up batch
(which captures the graph); S = solver steps.

Model FLOPs: 3 x `UViT.forward_flops()` per training image, NFE x forward (x 2 with CFG) per sampled image. MFU =
model FLOP/s over the GPU's dense bf16 peak (H100/H200 989 TFLOP/s, A100 312; --peak-tflops otherwise); null on
CPU. The JSON (--json) holds images_per_second, tflops, mfu, peak_memory_bytes (CUDA: max allocated; CPU: the
process's peak resident set), backends (attention, kernels, sampler update, CUDA graph, precision) and the
settings. --trace DIR writes a torch.profiler Chrome trace of 3 steps (or one batch) and prints its top kernels.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from .utils import UserError, setup_logging

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}
NUM_CLASSES = 1000  # ImageNet's; the null class is one more


def peak_tflops(device: torch.device) -> Optional[float]:
    """The dense bf16 peak of this CUDA device by its name, None if unknown or on CPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def _model(preset: str, device: torch.device):
    from .config import ModelConfig
    from .models import build_uvit

    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: U-ViT-H/2's 500M parameters are slow to fill on a CPU
        return build_uvit(ModelConfig(preset=preset), NUM_CLASSES + 1).eval()


def _backends(device: torch.device) -> dict:
    from .kernels import layernorm
    from .ops.attention import attention_backend
    from .ops.fused import kernels_mode

    mode = kernels_mode()
    triton_ = mode == "triton" or (mode == "auto" and device.type == "cuda" and layernorm.triton is not None)
    return {"attention": attention_backend(), "kernels": "triton" if triton_ else "reference"}


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Trace:
    """A torch.profiler run between `start` and `stop`, exported as a Chrome trace into `out_dir`."""

    def __init__(self, out_dir: Optional[str], device: torch.device, name: str):
        self.out_dir, self.device, self.name, self.prof = out_dir, device, name, None

    def start(self) -> None:
        if self.out_dir is not None:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.prof = profile(activities=acts)
            self.prof.start()

    def stop(self) -> None:
        if self.prof is not None:
            _sync(self.device)
            self.prof.stop()
            path = Path(self.out_dir) / f"{self.name}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            self.prof.export_chrome_trace(str(path))
            key = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
            print(self.prof.key_averages().table(sort_by=key, row_limit=20))
            print(f"trace: {path}")
            self.prof = None


class _Done(Exception):
    pass


def profile_train(preset: str, batch_size: int = 128, steps: int = 20, device: str | torch.device = "cuda",
                  compile_: bool = False, trace: Optional[str] = None, warmup: int = 3) -> dict:
    """Images/s of the real training loop (`train_diffusion`) on random data; see the module docstring."""
    from .config import DiffusionConfig, TrainConfig
    from .diffusion import make_schedule
    from .diffusion.train import autocast_dtype, train_diffusion

    device = torch.device(device)
    model = _model(preset, device)
    shape = (model.in_chans, model.img_size, model.img_size)
    g = torch.Generator(device).manual_seed(0)
    n = 4 * batch_size
    x = torch.randn((n, *shape), generator=g, device=device)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g, device=device)
    end = warmup + steps + (3 if trace else 0)  # 3 more steps for the trace, after the timed ones
    tcfg = TrainConfig(steps=end + 1, batch_size=batch_size, warmup_steps=1, ckpt_every=10**9, log_every=10**9,
                       compile=compile_)
    tracer, marks = _Trace(trace, device, f"train-{preset.replace('/', '_')}"), {}

    def on_step(done: int) -> None:
        if done in (warmup, warmup + steps):
            _sync(device)
            marks[done] = time.perf_counter()
        if done == warmup + steps:
            tracer.start()
        if done == end:
            tracer.stop()
            raise _Done  # before the final checkpoint, which would only cost time here

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            train_diffusion(model, x, y, make_schedule(DiffusionConfig()), tcfg, num_classes=NUM_CLASSES, seed=0,
                            ckpt_dir=tmp, fingerprint="profile", device=device, progress=False, on_step=on_step)
        except _Done:
            pass
    seconds = (marks[warmup + steps] - marks[warmup]) / steps
    flops = 3 * model.forward_flops() * batch_size / seconds
    return _result("train", preset, model, device, batch_size, steps, seconds, flops,
                   {**_backends(device), "precision": "bf16" if autocast_dtype("auto", device) else "fp32",
                    "compile": compile_})


def profile_sample(preset: str, batch_size: int = 64, steps: int = 50, device: str | torch.device = "cuda",
                   cfg_scale: float = 0.4, graph: bool = True, trace: Optional[str] = None, batches: int = 3) -> dict:
    """Images/s of `generate`'s batch sampler (multistep DPM-Solver++ order 2, CFG); see the module docstring."""
    from .diffusion.schedule import NoiseScheduleVP
    from .diffusion.train import autocast_dtype
    from .ops.dpm_solver_update import resolve_backend
    from .sampling.generate import BatchSampler, item_noise

    device = torch.device(device)
    model = _model(preset, device)
    shape = (model.in_chans, model.img_size, model.img_size)
    amp = autocast_dtype("auto", device)
    solver_args = dict(steps=steps, t_end=1e-4, order=2, skip_type="time_uniform", method="multistep",
                       lower_order_final=True, denoise_to_zero=False)
    sampler = BatchSampler(model, NoiseScheduleVP("linear"), NUM_CLASSES, cfg_scale, "dpmsolver++",
                           resolve_backend("auto", device), graph and device.type == "cuda", amp, device, batch_size,
                           solver_args)
    nfe = sampler.check(batch_size)
    labels = torch.arange(batch_size) % NUM_CLASSES
    noise = item_noise(0, labels.tolist(), list(range(batch_size)), shape)
    tracer = _Trace(trace, device, f"sample-{preset.replace('/', '_')}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        sampler(noise, labels.numpy())  # warm-up: lazy initialisation, autotuning, the graph capture
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(batches):
            sampler(noise, labels.numpy())
        _sync(device)
        seconds = (time.perf_counter() - t0) / batches
        tracer.start()
        sampler(noise, labels.numpy())
        tracer.stop()
    flops = nfe * (2 if cfg_scale else 1) * model.forward_flops() * batch_size / seconds
    return _result("sample", preset, model, device, batch_size, steps, seconds, flops,
                   {**_backends(device), "sampler_update": sampler.backend,
                    "cuda_graph": sampler.graph and sampler.fallback is None, "cuda_graph_fallback": sampler.fallback,
                    "precision": "bf16" if amp else "fp32"}, nfe=nfe)


def _result(mode, preset, model, device, batch_size, steps, seconds, flops, backends, **extra) -> dict:
    peak = peak_tflops(device)
    return {
        "mode": mode, "preset": preset, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "batch_size": batch_size, "steps": steps, "params": sum(p.numel() for p in model.parameters()),
        "seconds_per_batch": seconds, "images_per_second": batch_size / seconds, "tflops": flops / 1e12,
        "mfu": flops / 1e12 / peak if peak else None, "peak_tflops": peak,
        "peak_memory_bytes": _peak_memory(device), "backends": backends, "torch": torch.__version__, **extra,
    }


def format_table(r: dict) -> str:
    rows = [("mode", r["mode"]), ("preset", f"{r['preset']} ({r['params'] / 1e6:.1f}M parameters)"),
            ("device", r["device"]), ("batch / steps", f"{r['batch_size']} / {r['steps']}"),
            ("time per batch", f"{r['seconds_per_batch'] * 1e3:.1f} ms"),
            ("images/s", f"{r['images_per_second']:.1f}"), ("model TFLOP/s", f"{r['tflops']:.3g}"),
            ("MFU", "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f} % of {r['peak_tflops']:.0f}"),
            ("peak memory", f"{r['peak_memory_bytes'] / 2**30:.2f} GiB"),
            ("backends", ", ".join(f"{k} {v}" for k, v in r["backends"].items()))]
    return "\n".join(f"{k:<15} {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dpt_fast.profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=["train", "sample"], required=True)
    ap.add_argument("--preset", default="U-ViT-H/2", help="a U-ViT preset of dpt_fast.models.uvit (e.g. U-ViT-L/2)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 128 (train), 64 (sample)")
    ap.add_argument("--steps", type=int, default=None, help="timed training steps (default 20) or solver steps (50)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("--trace", help="write a torch.profiler Chrome trace into this directory")
    ap.add_argument("--compile", action="store_true", help="train: torch.compile the model (train.compile)")
    ap.add_argument("--no-graph", action="store_true", help="sample: no CUDA graph")
    ap.add_argument("--peak-tflops", type=float, help="dense bf16 peak of this GPU (default: from its name)")
    args = ap.parse_args(argv)
    setup_logging(quiet=True)
    try:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda but CUDA is not available; use --device cpu")
        from .models.uvit import UVIT_ALIASES, UVIT_PRESETS

        if args.preset not in UVIT_PRESETS and args.preset not in UVIT_ALIASES:
            raise UserError(f"--preset {args.preset}: not a U-ViT preset; use one of {', '.join([*UVIT_ALIASES, *UVIT_PRESETS])}")
        if args.mode == "train":
            r = profile_train(args.preset, args.batch_size or 128, args.steps or 20, args.device, args.compile, args.trace)
        else:
            r = profile_sample(args.preset, args.batch_size or 64, args.steps or 50, args.device,
                               graph=not args.no_graph, trace=args.trace)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.peak_tflops:
        r.update(peak_tflops=args.peak_tflops, mfu=r["tflops"] / args.peak_tflops)
    print(format_table(r))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
