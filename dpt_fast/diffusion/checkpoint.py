"""Resumable training checkpoints: tensors in safetensors, everything else in a small JSON.

    ckpt_dir/step-00000200.safetensors   model.*, ema.*, optim.<param index>.<state name>
    ckpt_dir/step-00000200.json          {"step", "fingerprint", "optim_param_groups", ...}

Both files are written atomically, tensors first: a checkpoint exists once its JSON exists, so a kill at any
moment leaves the previous checkpoint usable. The newest checkpoints are kept, older ones deleted. Nothing is
unpickled on load.

The learning rate, the data order and every random draw of the training loop are functions of (seed, step)
(see `dpt_fast.diffusion.train`), so the step *is* the scheduler, RNG and data-loader state: restoring the
tensors and the step continues a run exactly where it stopped.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..utils import UserError, atomic_path, read_json, write_json

_NAME = re.compile(r"^step-(\d{8})\.json$")


def checkpoint_paths(ckpt_dir: str | Path, step: int) -> tuple[Path, Path]:
    """(tensors file, JSON file) of the checkpoint at `step`."""
    stem = Path(ckpt_dir) / f"step-{step:08d}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def list_checkpoints(ckpt_dir: str | Path) -> list[int]:
    """Steps of the complete checkpoints in `ckpt_dir`, ascending."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    steps = []
    for p in d.iterdir():
        m = _NAME.match(p.name)
        if m and checkpoint_paths(d, int(m.group(1)))[0].exists():
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest_checkpoint(ckpt_dir: str | Path) -> int | None:
    steps = list_checkpoints(ckpt_dir)
    return steps[-1] if steps else None


# ----------------------------------------------------------------------------------------------
# Optimizer state <-> flat tensors + JSON
# ----------------------------------------------------------------------------------------------
def flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """torch optimizer state_dict -> ({'optim.<i>.<name>': tensor}, param_groups as JSON-able dicts)."""
    tensors = {}
    for idx, st in state_dict["state"].items():
        for name, v in st.items():
            if not torch.is_tensor(v):
                raise TypeError(f"optimizer state {idx}.{name} is not a tensor ({type(v).__name__}); cannot store it")
            tensors[f"optim.{idx}.{name}"] = v
    return tensors, [dict(g) for g in state_dict["param_groups"]]


def unflatten_optimizer(tensors: dict[str, torch.Tensor], param_groups: list[dict], template: dict) -> dict:
    """Inverse of `flatten_optimizer`. `template` (a fresh optimizer's state_dict) restores tuple types lost in JSON."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = v
    groups = []
    for g, fresh in zip(param_groups, template["param_groups"]):
        groups.append({k: tuple(v) if isinstance(fresh.get(k), tuple) else v for k, v in g.items()})
    return {"state": state, "param_groups": groups}


# ----------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------
def save_checkpoint(
    ckpt_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    ema: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write the checkpoint of `step` (model, EMA, optimizer + `meta` in the JSON); keep the newest `keep + 1`.

    Returns the JSON path. `model` must be the bare module (not the DDP wrapper).
    """
    ckpt_dir = Path(ckpt_dir)
    st_path, js_path = checkpoint_paths(ckpt_dir, step)
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in (("model", model), ("ema", ema)):
        for k, v in module.state_dict().items():
            tensors[f"{prefix}.{k}"] = v.detach().cpu().contiguous()
    opt_tensors, groups = flatten_optimizer(optimizer.state_dict())
    tensors.update({k: v.detach().cpu().contiguous() for k, v in opt_tensors.items()})
    with atomic_path(st_path) as tmp:
        save_file(tensors, str(tmp))
    write_json(js_path, {**meta, "step": step, "optim_param_groups": groups})
    for old in list_checkpoints(ckpt_dir)[: -(keep + 1)]:
        for p in checkpoint_paths(ckpt_dir, old)[::-1]:  # JSON first: the checkpoint stops existing at once
            p.unlink(missing_ok=True)
    return js_path


def read_meta(ckpt_dir: str | Path, step: int) -> dict:
    return read_json(checkpoint_paths(ckpt_dir, step)[1])


def load_checkpoint(
    ckpt_dir: str | Path,
    step: int,
    model: torch.nn.Module | None = None,
    ema: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict:
    """Load the checkpoint of `step` into whichever of model / EMA / optimizer are given; return its JSON."""
    st_path, js_path = checkpoint_paths(ckpt_dir, step)
    meta = read_json(js_path)
    try:
        tensors = load_file(str(st_path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{st_path}: cannot read ({e}); delete {js_path} to fall back to an older checkpoint") from None
    groups: dict[str, dict[str, torch.Tensor]] = {"model": {}, "ema": {}, "optim": {}}
    for k, v in tensors.items():
        prefix, rest = k.split(".", 1)
        groups[prefix][rest if prefix != "optim" else k] = v
    for prefix, module in (("model", model), ("ema", ema)):
        if module is not None:
            try:
                module.load_state_dict(groups[prefix])
            except RuntimeError as e:
                first = str(e).strip().splitlines()[0]
                raise UserError(f"{st_path}: {prefix} weights do not fit the model ({first}); use --fresh") from None
    if optimizer is not None:
        template = optimizer.state_dict()
        optimizer.load_state_dict(unflatten_optimizer(groups["optim"], meta["optim_param_groups"], template))
    return meta


def load_ema_weights(ckpt_dir: str | Path, step: int) -> dict[str, torch.Tensor]:
    """Only the EMA weights of a checkpoint (for sampling), as a state dict; the model and optimizer tensors
    beside them are not read."""
    st_path = checkpoint_paths(ckpt_dir, step)[0]
    try:
        with safe_open(str(st_path), framework="pt") as f:
            return {k[4:]: f.get_tensor(k) for k in f.keys() if k.startswith("ema.")}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{st_path}: cannot read ({e}); re-run stage 2 with --fresh") from None
