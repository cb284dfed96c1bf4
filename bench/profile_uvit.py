"""Training throughput and model-FLOP utilisation (MFU) of a U-ViT, for a lent GPU.

    python bench/profile_uvit.py                                  # U-ViT-H/2, latent 256, batch 128, bf16
    python bench/profile_uvit.py --mode compiled --profile        # + torch.compile, + top CUDA kernels
    python bench/profile_uvit.py --device cpu --preset uvit_digits --batch 64 --steps 3   # smoke test

A step is forward + epsilon-MSE + backward + fused AdamW on random latents (the stage-2 inner loop; data
loading excluded). MFU = 3 x forward matmul FLOPs (`UViT.forward_flops`) x images/s / the GPU's dense bf16
peak (H100/H200 SXM 989 TFLOP/s, A100 312; --peak-tflops for others).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_uvit import make_train_step  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="uvit_h2_latent256")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--mode", choices=["kernels", "reference", "compiled"], default="kernels",
                    help="Triton kernels (default on CUDA), the PyTorch reference ops, or torch.compile")
    ap.add_argument("--checkpoint", action="store_true", help="gradient checkpointing in every block")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--peak-tflops", type=float, help="dense bf16 peak of this GPU (default: from its name)")
    ap.add_argument("--profile", action="store_true", help="print the top CUDA kernels of 3 profiled steps")
    args = ap.parse_args(argv)

    os.environ["DPT_FAST_KERNELS"] = "reference" if args.mode == "reference" else "auto"
    cuda = args.device == "cuda"
    step, model = make_train_step(args.preset, args.batch, args.device, bf16=cuda, compiled=args.mode == "compiled",
                                  num_classes=1001, use_checkpoint=args.checkpoint)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - t0) / args.steps

    name = torch.cuda.get_device_name() if cuda else "cpu"
    images_per_s = args.batch / seconds
    tflops = 3 * model.forward_flops() * images_per_s / 1e12
    peak = args.peak_tflops or (peak_tflops(name) if cuda else None)
    print(f"device        {name}")
    print(f"model         {args.preset}  params {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M  "
          f"batch {args.batch}  mode {args.mode}  checkpoint {args.checkpoint}  "
          f"attention {os.environ.get('DPT_FAST_ATTN', 'auto')}")
    print(f"step          {seconds * 1e3:.1f} ms")
    print(f"images/s      {images_per_s:.1f}")
    print(f"model TFLOP/s {tflops:.3g}" + (f"   MFU {100 * tflops / peak:.1f}% of {peak:.0f}" if peak else ""))
    if cuda:
        print(f"max memory    {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            for _ in range(3):
                step()
            sync()
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=25))
    return 0


if __name__ == "__main__":
    sys.exit(main())
