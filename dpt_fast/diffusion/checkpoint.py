"""Resumable training checkpoints: tensors in safetensors, everything else in a small JSON.

    ckpt_dir/step-00000200.safetensors   model.*, ema.*, optim.<param index>.<state name>
    ckpt_dir/step-00000200.json          {"step", "fingerprint", "optim_param_groups", ...}

Both files are written atomically, tensors first: a checkpoint exists once its JSON exists, so a kill at any
moment leaves the previous checkpoint usable. The newest checkpoints are kept, older ones deleted. Nothing is
unpickled on load.

The JSON records the size and sha256 of the tensors file, taken when it was written. `latest_checkpoint`
returns the newest checkpoint whose files check out (a damaged or overwritten one is skipped with a warning,
so training resumes from the previous kept one), and `load_checkpoint` refuses bytes that are not the ones
written, and NaN/inf weights.

The learning rate, the data order and every random draw of the training loop are functions of (seed, step)
(see `dpt_fast.diffusion.train`), so the step *is* the scheduler, RNG and data-loader state: restoring the
tensors and the step continues a run exactly where it stopped.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..utils import UserError, file_sha256, load_safetensors, log, read_json, save_safetensors, write_json

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


def checkpoint_problem(ckpt_dir: str | Path, step: int) -> str | None:
    """Why the checkpoint of `step` cannot be used (unreadable JSON, tensors missing or not the bytes that were
    written), or None when it checks out. Hashes the tensors file."""
    st_path, js_path = checkpoint_paths(ckpt_dir, step)
    try:
        meta = read_json(js_path)
    except UserError as e:
        return str(e)
    if not isinstance(meta, dict) or meta.get("step") != step:
        return f"{js_path} is not the JSON of step {step}"
    sha, size = meta.get("tensors_sha256"), meta.get("tensors_bytes")
    if sha is None:  # written before the hash was recorded
        return None
    try:
        if st_path.stat().st_size != size or file_sha256(st_path) != sha:
            return f"{st_path} is not the file written at step {step} (size or sha256 differ)"
    except OSError as e:
        return f"{st_path}: {e.strerror}"
    return None


def latest_checkpoint(ckpt_dir: str | Path) -> int | None:
    """The newest checkpoint that checks out (`checkpoint_problem`); damaged newer ones are skipped (warned)."""
    for step in reversed(list_checkpoints(ckpt_dir)):
        problem = checkpoint_problem(ckpt_dir, step)
        if problem is None:
            return step
        log.warning("checkpoint of step %d is damaged (%s); falling back to the previous one", step, problem)
    return None


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
    save_safetensors(st_path, tensors)
    write_json(js_path, {**meta, "step": step, "optim_param_groups": groups, "tensors_bytes": st_path.stat().st_size,
                         "tensors_sha256": file_sha256(st_path)})
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
    fix = f"delete {js_path} to fall back to an older checkpoint"
    problem = checkpoint_problem(ckpt_dir, step)
    if problem is not None:
        raise UserError(f"{problem}; {fix}")
    meta = read_json(js_path, fix)
    tensors = load_safetensors(st_path, fix, finite=True)
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
    problem = checkpoint_problem(ckpt_dir, step)
    if problem is not None:
        raise UserError(f"{problem}; re-run stage 2 to rebuild it")
    tensors = load_safetensors(st_path, "re-run stage 2 to rebuild it", finite=True, keys=lambda k: k.startswith("ema."))
    return {k[4:]: v for k, v in tensors.items()}
