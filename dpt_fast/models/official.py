"""Import U-ViT weights written by the official U-ViT (baofff/U-ViT) or DPT (ML-GSAI/DPT) training code.

Their `nnet.pth` / `nnet_ema.pth` is a plain `state_dict()` whose key names are exactly ours (`UViT` keeps the
official module names), so importing is: read the file without running pickle code, infer the architecture
from the tensor shapes, check the keys, load.

    model = load_official_uvit("imagenet256_uvit_huge.pth")          # U-ViT-H/2, num_heads from the width
    model = load_official_uvit(state_dict, num_heads=8, use_checkpoint=True)

Files are read by `dpt_fast.models.weights.read_weights` (`.pth` with `torch.load(weights_only=True)`,
`.safetensors` with safetensors, plus the JSON of constructor kwargs that `python -m dpt_fast.convert` writes
beside it, when present); `{'nnet_ema': ...}`-style nesting and DDP/compile key prefixes are removed there.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Union

import torch

from ..utils import UserError
from .uvit import UViT
from .weights import first_line, read_weights, unwrap

StateDict = Mapping[str, torch.Tensor]

# Widths of the paper's models -> their head count (the weights do not record it).
HEADS_BY_WIDTH = {512: 8, 768: 12, 1024: 16, 1152: 16}
_HINT = "pass an official U-ViT / DPT nnet.pth or nnet_ema.pth"


def infer_uvit_kwargs(sd: StateDict, source: str = "state dict") -> dict[str, Any]:
    """UViT constructor kwargs read off the tensor shapes of an official U-ViT state dict.

    `num_heads` comes from HEADS_BY_WIDTH (the paper's widths) and is absent for other widths;
    `qk_scale` is not recorded (the official default None is assumed).
    """
    for key in ("pos_embed", "patch_embed.proj.weight", "decoder_pred.weight", "mid_block.attn.qkv.weight"):
        if key not in sd:
            raise UserError(f"{source}: no '{key}', so this is not a U-ViT state dict "
                            f"(keys start {', '.join(list(sd)[:4])})")
    for key in sd:
        if key.startswith(("token_conv_layer.", "final_layer.1.")) or (key.startswith("out_blocks.") and
                                                                        key.endswith("skip_linear.weight")
                                                                        and sd[key].shape[1] == sd[key].shape[0]):
            raise UserError(f"{source}: '{key}' belongs to a DPT U-ViT variant (token_conv / nonlinear_conv / "
                            "add_linear skips) that dpt_fast does not implement")
    D, C, p, _ = sd["patch_embed.proj.weight"].shape
    tokens = sd["pos_embed"].shape[1]
    num_classes = sd["label_emb.weight"].shape[0] if "label_emb.weight" in sd else -1
    num_patches = tokens - (2 if num_classes > 0 else 1)
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise UserError(f"{source}: pos_embed has {tokens} tokens, which is not extras + a square number of patches")
    depth = 2 * len({k.split(".")[1] for k in sd if k.startswith("in_blocks.")})
    kwargs = dict(img_size=side * p, patch_size=p, in_chans=C, embed_dim=D, depth=depth,
                  mlp_ratio=sd["mid_block.mlp.fc1.weight"].shape[0] / D,
                  qkv_bias="mid_block.attn.qkv.bias" in sd, mlp_time_embed="time_embed.0.weight" in sd,
                  num_classes=num_classes, conv="final_layer.weight" in sd,
                  skip=any(k.startswith("out_blocks.") and ".skip_linear." in k for k in sd))
    if D in HEADS_BY_WIDTH:
        kwargs["num_heads"] = HEADS_BY_WIDTH[D]
    return kwargs


def load_official_uvit(path_or_state_dict: Union[str, Path, StateDict], **kwargs: Any) -> UViT:
    """Our UViT holding the weights of an official U-ViT / DPT checkpoint (fp32, CPU, eval mode).

    The architecture is inferred from the weights; `kwargs` (UViT constructor keywords, e.g. `num_heads`,
    `qk_scale`, `use_checkpoint`) fill in or override it. A `.safetensors` file written by
    `python -m dpt_fast.convert` brings its own kwargs in the JSON beside it.
    """
    if isinstance(path_or_state_dict, (str, Path)):
        source = str(path_or_state_dict)
        sd = read_weights(path_or_state_dict, _HINT)
        meta = Path(path_or_state_dict).with_suffix(".json")
        if Path(path_or_state_dict).suffix == ".safetensors" and meta.is_file():
            try:
                kwargs = {**json.loads(meta.read_text())["uvit_kwargs"], **kwargs}
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{meta}: not the JSON that dpt_fast.convert writes; delete it or fix it") from None
    else:
        source, sd = "state dict", unwrap(path_or_state_dict, "state dict", _HINT)
    arch = {**infer_uvit_kwargs(sd, source), **kwargs}
    if "num_heads" not in arch:
        raise UserError(f"{source}: embed_dim {arch['embed_dim']} is not one of the paper's widths "
                        f"({', '.join(map(str, HEADS_BY_WIDTH))}); pass num_heads=...")
    if arch.get("conditioning", "token") != "token":
        raise UserError("official U-ViT checkpoints use token conditioning; do not pass conditioning=")
    try:
        model = UViT(**arch)
    except (TypeError, ValueError) as e:
        raise UserError(f"{source}: cannot build a U-ViT with {arch}: {first_line(e)}") from None
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or wrong:
        what = "; ".join(f"{name}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                         for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape", wrong)) if keys)
        raise UserError(f"{source}: does not match the inferred U-ViT {arch} ({what}); pass the right kwargs")
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    return model.eval()
