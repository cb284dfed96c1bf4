"""The one home for reading weight files: safetensors, or `torch.load(weights_only=True)`; never pickled code.

    state = read_weights("vitb4_300ep.pth.tar")        # {name: tensor}, CPU, wrappers and prefixes removed
    state = read_weights(path, hint="pass the SD VAE") # the hint ends every error message about this file

Every checkpoint format the package imports goes through here: official U-ViT / DPT `nnet(_ema).pth`, MSN
training checkpoints, timm backbone weights and the SD VAE. Training checkpoints nest the state dict in a
wrapper entry (`{"target_encoder": {...}, "opt": {...}, "epoch": 300}`); the first wrapper of `WRAPPERS`
(in that order) that holds a mapping is taken, until every value is a tensor. Key prefixes left by
DistributedDataParallel (`module.`), torch.compile (`_orig_mod.`) and some SSL codebases (`backbone.`) are
removed. Every failure is a one-line `UserError` naming the file and the fix.
"""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any, Mapping, Union

import torch

from ..utils import UserError

PathLike = Union[str, os.PathLike]

# Entries that hold the weights in training checkpoints, in order of preference: EMA before raw weights
# (U-ViT/DPT `nnet_ema`), MSN's target encoder (what DPT loads) before its online `encoder`.
WRAPPERS = ("nnet_ema", "nnet", "ema", "target_encoder", "state_dict", "model", "module", "encoder")
PREFIXES = ("module.", "_orig_mod.", "backbone.")


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (at most 200 characters), else its type."""
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    return lines[0][:200] if lines else type(e).__name__


def load_weights_file(path: PathLike, hint: str = "") -> Any:
    """The object stored in a .safetensors file (a dict of tensors) or a torch file, read without unpickling
    code: tensors, containers, numbers and strings only (optimizer state, epochs and learning rates pass)."""
    path = Path(path).expanduser()
    tail = f"; {hint}" if hint else ""
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file{tail}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - safetensors raises its own types for torn or foreign files
            raise UserError(f"{path}: not a readable safetensors file ({first_line(e)}){tail}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:
            raise UserError(f"{path}: refused, it holds pickled objects other than tensors (it calls "
                            f"{found.group(1)}); only weight files are loaded, re-save the state_dict alone or as "
                            f"safetensors{tail}") from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
        raise UserError(f"{path}: not a readable PyTorch weights file "
                        f"({detail.group(1).strip()[:200] if detail else first_line(e)}){tail}") from None
    except Exception as e:  # noqa: BLE001 - torn zip archives, foreign bytes, ...: the same problem to the user
        raise UserError(f"{path}: not a readable PyTorch weights file ({first_line(e)}); is it truncated? "
                        f"download it again{tail}") from None


def _is_state(obj: Mapping) -> bool:
    return len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap(obj: Any, source: str = "state dict", hint: str = "") -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint object: wrappers (WRAPPERS) opened, key prefixes (PREFIXES) removed."""
    tail = f"; {hint}" if hint else ""
    path = []
    while isinstance(obj, Mapping) and not _is_state(obj):
        inner = next((k for k in WRAPPERS if isinstance(obj.get(k), Mapping) and obj[k]), None)
        if inner is None:
            break
        path.append(inner)
        obj = obj[inner]
    where = "".join(f"[{k!r}]" for k in path)
    if not isinstance(obj, Mapping):
        raise UserError(f"{source}: holds a {type(obj).__name__}, not a state_dict of tensors{tail}")
    if not obj:
        raise UserError(f"{source}{where}: an empty state_dict{tail}")
    bad = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        keys = ", ".join(map(str, list(obj)[:6]))
        raise UserError(f"{source}{where}: entry '{bad}' is a {type(obj[bad]).__name__}, not a tensor, and no "
                        f"state_dict is nested under {'/'.join(WRAPPERS)} (keys: {keys}){tail}")
    out = {}
    for k, v in obj.items():
        k = str(k)
        stripped = True
        while stripped:
            stripped = False
            for p in PREFIXES:
                if k.startswith(p):
                    k, stripped = k[len(p):], True
        out[k] = v
    return out


def read_weights(path: PathLike, hint: str = "") -> dict[str, torch.Tensor]:
    """{name: CPU tensor} of a weights file (see the module docstring); UserErrors end with `hint`."""
    return unwrap(load_weights_file(path, hint), str(Path(path).expanduser()), hint)
