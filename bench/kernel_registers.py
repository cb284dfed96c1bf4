"""Registers and spills of every Triton kernel variant, from ptxas, without a GPU (static tuning aid).

    python bench/kernel_registers.py [--arch 90] [--widths 72 512 1152]

Compiles each LayerNorm flag combination at the tile `kernels/layernorm._tile(D)` picks, and bias+GELU at its
tile, to PTX with triton (bundled LLVM), then runs triton's bundled ptxas with -v. High register counts cap
occupancy (65,536 registers per SM), which memory-bound kernels need.
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dpt_fast.kernels import bias_gelu, layernorm

LN_FWD, LN_BWD, GELU = layernorm.FWD_SIGNATURE, layernorm.BWD_SIGNATURE, bias_gelu.SIGNATURE


def ptxas_report(fn, types: dict, consts: dict, warps: int, arch: int) -> str:
    sig = {n: "constexpr" if n in consts else types[n] for n in fn.arg_names}
    k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": warps})
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    err = "no bundled ptxas accepted the PTX"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(k.asm["ptx"])
        f.flush()
        # triton bundles more than one ptxas; only a recent enough one accepts the PTX version it emits
        for ptxas in sorted(p for p in os.listdir(bindir) if p.startswith("ptxas")):
            r = subprocess.run([os.path.join(bindir, ptxas), f"-arch=sm_{arch}a" if arch >= 90 else f"-arch=sm_{arch}",
                                "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
            if r.returncode == 0:
                err = r.stderr
                break
    regs = re.search(r"Used (\d+) registers", err)
    spills = re.search(r"(\d+) bytes spill stores", err)
    return f"{regs.group(1) if regs else '?':>4} regs, {spills.group(1) if spills else '?'} B spilled"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--widths", type=int, nargs="+", default=[72, 512, 1152])
    args = ap.parse_args()
    for D in args.widths:
        bm, bd, wf, wb = layernorm._tile(D)
        print(f"LayerNorm D={D}: tile {bm} x {bd}, {wf} / {wb} warps (fwd / bwd)")
        for res, gate, aff, mod in itertools.product((0, 1), repeat=4):
            if gate and not res:
                continue
            f = dict(HAS_GATE=bool(gate), HAS_AFFINE=bool(aff), HAS_MOD=bool(mod), BLOCK_M=bm, BLOCK_D=bd)
            fwd = ptxas_report(layernorm._ln_fwd_kernel, LN_FWD, dict(HAS_RES=bool(res), **f), wf, args.arch)
            bwd = ptxas_report(layernorm._ln_bwd_kernel, LN_BWD, dict(HAS_DXNEW=bool(res), STORE_DDELTA=bool(gate), **f),
                               wb, args.arch)
            name = "+".join(n for n, on in (("res", res), ("gate", gate), ("affine", aff), ("mod", mod)) if on) or "plain"
            print(f"  {name:<22} fwd {fwd}   bwd {bwd}")
    tiles = dict(BLOCK_M=bias_gelu._BLOCK_M, BLOCK_N=bias_gelu._BLOCK_N)
    print(f"bias+GELU: tile {bias_gelu._BLOCK_M} x {bias_gelu._BLOCK_N}, {bias_gelu._WARPS} warps")
    print(f"  fwd {ptxas_report(bias_gelu._bias_gelu_fwd_kernel, GELU, tiles, bias_gelu._WARPS, args.arch)}   "
          f"bwd {ptxas_report(bias_gelu._bias_gelu_bwd_kernel, GELU, tiles, bias_gelu._WARPS, args.arch)}")


if __name__ == "__main__":
    main()
