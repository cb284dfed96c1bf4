"""Convert an official U-ViT / DPT `nnet.pth` / `nnet_ema.pth` to safetensors + a JSON of constructor kwargs.

    python -m dpt_fast.convert IN.pth OUT.safetensors [--num-heads N] [--qk-scale S] [--dtype fp32|bf16|fp16]

Writes OUT.safetensors (our UViT's state dict) and OUT.json ({"uvit_kwargs": {...}, "source": ...}), so that
`dpt_fast.models.load_official_uvit("OUT.safetensors")` rebuilds the model without pickle. The input is read
with `torch.load(weights_only=True)`: a file that holds anything but tensors is refused.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from .models.official import load_official_uvit
from .utils import UserError, atomic_path, write_json

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def uvit_kwargs_of(model: torch.nn.Module) -> dict:
    """The constructor kwargs that rebuild `model` (a UViT)."""
    blk = model.mid_block
    return dict(img_size=model.img_size, patch_size=model.patch_size, in_chans=model.in_chans,
                embed_dim=model.embed_dim, depth=2 * len(model.in_blocks), num_heads=blk.attn.num_heads,
                mlp_ratio=blk.mlp.fc1.out_features / model.embed_dim, qkv_bias=blk.attn.qkv.bias is not None,
                qk_scale=blk.attn.scale if blk.attn.scale != (model.embed_dim // blk.attn.num_heads) ** -0.5 else None,
                mlp_time_embed=not isinstance(model.time_embed, torch.nn.Identity), num_classes=model.num_classes,
                conv=not isinstance(model.final_layer, torch.nn.Identity),
                skip=model.out_blocks[0].skip_linear is not None if len(model.out_blocks) else True)


def convert(src: str | Path, dst: str | Path, dtype: str = "fp32", **kwargs) -> dict:
    """Convert `src` to `dst` (.safetensors) + `dst` with suffix .json; returns the kwargs written."""
    from safetensors.torch import save_file

    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise UserError(f"{dst}: the output must end in .safetensors")
    model = load_official_uvit(src, **kwargs)
    arch = uvit_kwargs_of(model)
    state = {k: v.to(DTYPES[dtype]).contiguous() for k, v in model.state_dict().items()}
    with atomic_path(dst) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "source": Path(src).name})
    write_json(dst.with_suffix(".json"), {"uvit_kwargs": arch, "source": str(src), "dtype": dtype})
    return arch


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dpt_fast.convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="official nnet.pth / nnet_ema.pth (a U-ViT state_dict)")
    ap.add_argument("dst", help="output .safetensors (a .json of constructor kwargs is written beside it)")
    ap.add_argument("--num-heads", type=int, help="attention heads (needed when the width is not a paper width)")
    ap.add_argument("--qk-scale", type=float, help="attention scale if the model was built with qk_scale")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    args = ap.parse_args(argv)
    kwargs = {k: v for k, v in (("num_heads", args.num_heads), ("qk_scale", args.qk_scale)) if v is not None}
    try:
        arch = convert(args.src, args.dst, args.dtype, **kwargs)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst} and {Path(args.dst).with_suffix('.json')}: U-ViT {arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
