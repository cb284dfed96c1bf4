"""Class-conditional generation at scale: K images per class, batched across classes, sharded and resumable.

Item j of a run (j = 0 .. len(classes) * K - 1) is image `index = j // C` of class `classes[j % C]`
(C = len(classes)), so every batch mixes classes. With explicit `labels` (e.g. the 50,000 drawn labels of an
FID run, `python -m dpt_fast.sample`) item j has class labels[j] and index = how often that class occurs
before j. Its initial noise comes from a generator seeded by a hash of
(seed, class, index): an image depends only on those and the sampler settings, not on the batch size, the
shard layout, the rank that made it or whether the run was interrupted.

On disk (`out_dir`):
    shard-00000.npz, ...  items [s * shard_size, (s + 1) * shard_size), written atomically, loadable with
                          allow_pickle=False; arrays: images uint8 [n, C, H, W], labels int64 [n] (the class),
                          index int64 [n] (the per-class index)
    manifest.json         the generation parameters ("identity"), K, the shard count, timings and
                          "complete": true once every shard is written

A re-run skips the shards that are already complete and match; a manifest whose identity differs (another model,
scale, sampler, seed, ...) is never mixed with new shards: the old shards are deleted and regenerated
(on_mismatch='regenerate', logged) or the run stops with a UserError (on_mismatch='error'). Raising K keeps
the finished shards (item j does not depend on K).

Under torch.distributed (torchrun), rank r makes the shards s with s % world_size == r.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..diffusion.schedule import NoiseScheduleVP, model_time
from ..distributed import barrier, rank_world
from ..ops.dpm_solver_update import resolve_backend
from ..utils import UserError, load_npz, log, read_json, save_npz, write_json
from .dpm_solver import DPMSolver, model_wrapper

__all__ = ["generate", "load_generated", "item_noise"]

FORMAT = 1
MANIFEST = "manifest.json"


def _shard_path(out_dir: Path, s: int) -> Path:
    return out_dir / f"shard-{s:05d}.npz"


def _item_seed(seed: int, label: int, index: int) -> int:
    digest = hashlib.blake2b(f"dpt_fast:{seed}:{label}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def item_noise(seed: int, labels: Sequence[int], indices: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """The initial noise x_T [n, *shape] (float32, CPU) of items (label, index): one generator per item."""
    out = torch.empty((len(labels), *shape), dtype=torch.float32)
    gen = torch.Generator()
    for r, (c, i) in enumerate(zip(labels, indices)):
        gen.manual_seed(_item_seed(seed, int(c), int(i)))
        out[r] = torch.randn(tuple(shape), generator=gen)
    return out


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] float -> uint8 NCHW numpy (rounded, clamped)."""
    return x.float().add(1.0).mul(127.5).round_().clamp_(0, 255).to(torch.uint8).cpu().numpy()


def _shard_ok(path: Path, labels: np.ndarray, index: np.ndarray) -> bool:
    """A finished shard holds exactly the expected items (reads only the small arrays)."""
    if not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as z:
            return (
                "images" in z.files
                and np.array_equal(z["labels"], labels)
                and np.array_equal(z["index"], index)
                and z["images"].dtype == np.uint8
                and z["images"].shape[0] == len(labels)
            )
    except (OSError, ValueError, KeyError):
        return False


def _prepare_dir(out_dir: Path, identity: dict, on_mismatch: str) -> dict:
    """Check an existing manifest against `identity`; clear stale shards. Returns the previous manifest (or {})."""
    path = out_dir / MANIFEST
    if not path.exists():
        stale = sorted(out_dir.glob("shard-*.npz"))
        if stale:  # shards without a manifest: provenance unknown, never mix them in
            log.warning(f"{out_dir}: {len(stale)} shards without {MANIFEST}; deleting them and generating afresh")
            for p in stale:
                p.unlink()
        return {}
    old = read_json(path)
    if old.get("identity") == identity and old.get("format") == FORMAT:
        return old
    before = old.get("identity") or {}
    changed = sorted(k for k in set(before) | set(identity) if before.get(k) != identity.get(k))
    if on_mismatch == "error":
        raise UserError(
            f"{out_dir} holds images generated with other settings ({', '.join(changed) or 'format'} differ); "
            "delete the directory or re-run with on_mismatch='regenerate'"
        )
    log.warning(f"{out_dir}: generation settings changed ({', '.join(changed) or 'format'}); regenerating all shards")
    for p in out_dir.glob("shard-*.npz"):
        p.unlink()
    path.unlink()
    return {}


@torch.no_grad()
def generate(
    model: Callable,
    schedule: NoiseScheduleVP,
    classes: Sequence[int],
    k_per_class: int,
    shape: Sequence[int],
    out_dir: str | Path,
    *,
    null_class: int,
    cfg_scale: float,
    steps: int,
    order: int,
    method: str,
    algorithm: str,
    skip_type: str,
    batch_size: int,
    shard_size: int,
    seed: int,
    device: str | torch.device,
    backend: str = "auto",
    cuda_graph: bool = True,
    decode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    progress: bool = True,
    t_end: Optional[float] = None,
    lower_order_final: bool = True,
    denoise_to_zero: bool = False,
    model_id: str = "",
    on_mismatch: str = "regenerate",
    labels: Optional[Sequence[int]] = None,
) -> dict:
    """Generate `k_per_class` images for each class of `classes` into sharded npz files under `out_dir`.

    Args:
        model: the eps-prediction network, `model(x [N, *shape], t_in [N], y [N] int64) -> [N, *shape]` (a U-ViT;
            in eval mode, on `device`). Its time input is `model_time(schedule, t)`.
        schedule: the noise schedule it was trained with.
        classes: class ids to generate; k_per_class: images per class (K).
        labels: instead of classes x K, the class of each item in order (classes and k_per_class are then
            ignored).
        shape: the sampler's [C, H, W] (latent shape for latent models).
        null_class: the label of the unconditional model (U-ViT: num_classes - 1).
        cfg_scale: U-ViT/DPT convention s: eps = eps_c + s (eps_c - eps_u) (DPT: 0.4); 0 = no guidance. One
            forward of 2B rows per step ([x; x], [y; null]).
        steps, order, method, algorithm, skip_type, t_end, lower_order_final, denoise_to_zero: the DPM-Solver
            settings (`DPMSolver.sample`); t_end defaults to 1e-4 for the continuous linear schedule (as the
            official U-ViT sampler) and 1 / N for discrete ones.
        batch_size: images per sampler batch (with CUDA graphs a short last batch is padded to it).
        shard_size: images per shard file.
        seed: the generation seed (with class and index it fixes each image's noise).
        device: where to sample ('cpu', 'cuda', 'cuda:N').
        backend: per-step update 'auto' | 'cpp' | 'python'. cuda_graph: capture the sampling loop on CUDA.
            On CUDA the model runs under bf16 autocast; the solver state stays float32.
        decode: optional `decode(z) -> x` in [-1, 1], [N, 3, H', W'] (e.g. a VAE decoder) applied per batch.
        progress: tqdm bar with images/s.
        model_id: identifies the model weights in the manifest (e.g. a checkpoint step) so that new weights never
            mix with old shards.
        on_mismatch: 'regenerate' or 'error' when `out_dir` holds images made with other settings.

    Returns:
        {'images', 'generated', 'shards', 'skipped_shards', 'seconds', 'images_per_second', 'nfe', 'backend',
         'cuda_graph', 'out_dir'}; images_per_second counts this call's images (or the last run's when all shards
         were already there).
    """
    if labels is not None:
        labels_all = np.asarray(labels, dtype=np.int64).reshape(-1)
        classes, k_per_class = sorted(set(labels_all.tolist())), 0
    else:
        classes = [int(c) for c in classes]
    if not classes or (labels is None and k_per_class < 1) or batch_size < 1 or shard_size < 1:
        raise UserError("generate: need at least one class and k_per_class, gen.batch_size, gen.shard_size >= 1")
    if on_mismatch not in ("regenerate", "error"):
        raise ValueError(f"on_mismatch={on_mismatch!r}; use 'regenerate' or 'error'")
    device = torch.device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rank, world = rank_world()
    if t_end is None:
        t_end = 1e-4 if schedule.schedule == "linear" else 1.0 / schedule.total_N
    backend = resolve_backend(backend, device)
    use_graph = cuda_graph and device.type == "cuda"

    if labels is None:
        C, n = len(classes), len(classes) * k_per_class
        labels_all = np.array([classes[j % C] for j in range(n)], dtype=np.int64)
        index_all = np.arange(n, dtype=np.int64) // C
        items = {"classes": classes}
    else:
        n = len(labels_all)
        index_all = np.zeros(n, dtype=np.int64)  # occurrence count of each item's class before it
        seen: dict[int, int] = {}
        for j, c in enumerate(labels_all.tolist()):
            index_all[j] = seen.get(c, 0)
            seen[c] = index_all[j] + 1
        # Not a hash of the labels: every finished shard is checked against its items' labels anyway, so a
        # longer prefix-consistent label list (a larger FID run) keeps the shards it shares with a shorter one.
        items = {"labels": "explicit"}
    n_shards = -(-n // shard_size)
    identity = {
        **items, "shape": [int(v) for v in shape], "null_class": int(null_class), "cfg_scale": float(cfg_scale),
        "steps": steps, "order": order, "method": method, "algorithm": algorithm, "skip_type": skip_type,
        "t_end": float(t_end), "lower_order_final": lower_order_final, "denoise_to_zero": denoise_to_zero,
        "seed": int(seed), "shard_size": int(shard_size), "schedule": schedule.describe(), "model_id": model_id,
        "decoded": decode is not None,
    }

    if rank == 0:
        previous = _prepare_dir(out_dir, identity, on_mismatch)
        for p in out_dir.glob("shard-*.npz"):  # a smaller K leaves shards beyond the new count
            if int(p.stem.split("-")[1]) >= n_shards:
                p.unlink()
        write_json(out_dir / MANIFEST, {**previous, "format": FORMAT, "identity": identity, "k_per_class": k_per_class or None,
                                        "num_images": n, "num_shards": n_shards, "complete": False})
    barrier()
    previous = read_json(out_dir / MANIFEST)

    def shard_items(s: int) -> slice:
        return slice(s * shard_size, min(n, (s + 1) * shard_size))

    mine = [s for s in range(n_shards) if s % world == rank]
    todo = [s for s in mine if not _shard_ok(_shard_path(out_dir, s), labels_all[shard_items(s)], index_all[shard_items(s)])]

    # One solver per batch size (the conditioning lives in a per-size buffer the wrapper reads in place, so a
    # captured CUDA graph sees each new batch's labels after copy_).
    samplers: dict[int, tuple[torch.Tensor, DPMSolver]] = {}

    def net(x, t, y):
        if device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):  # required under CUDA graph capture
                return model(x, t, y)
        return model(x, t, y)

    def sampler_for(b: int) -> tuple[torch.Tensor, DPMSolver]:
        if b not in samplers:
            y = torch.full((b,), int(null_class), dtype=torch.int64, device=device)
            y_null = torch.full((b,), int(null_class), dtype=torch.int64, device=device)
            fn = model_wrapper(net, schedule, "noise", guidance_type="classifier-free", condition=y,
                               unconditional_condition=y_null, guidance_scale=1.0 + float(cfg_scale),
                               model_time_fn=model_time)  # the U-ViT's time input (999 t / N t)
            samplers[b] = (y, DPMSolver(fn, schedule, algorithm, backend=backend, cuda_graph=use_graph))
        return samplers[b]

    def sample_batch(lab: np.ndarray, idx: np.ndarray) -> np.ndarray:
        b = len(lab)
        width = batch_size if use_graph else b  # one captured graph: pad short batches
        x = item_noise(seed, lab, idx, shape)
        y_host = torch.as_tensor(lab)
        if width > b:
            x = torch.cat([x, x.new_zeros((width - b, *x.shape[1:]))])
            y_host = torch.cat([y_host, y_host.new_full((width - b,), int(null_class))])
        y, solver = sampler_for(width)
        y.copy_(y_host)
        z = solver.sample(x.to(device), steps=steps, t_end=t_end, order=order, skip_type=skip_type, method=method,
                          lower_order_final=lower_order_final, denoise_to_zero=denoise_to_zero)[:b]
        return _to_uint8(decode(z) if decode is not None else z)

    try:  # bad sampler settings fail here, before any work, as one-line errors
        sampler_for(min(batch_size, n))[1]._plan(steps, None, t_end, order, skip_type, method, lower_order_final,
                                                 denoise_to_zero, "dpmsolver")
    except ValueError as e:
        raise UserError(f"sample settings: {e}") from None
    n_todo = sum(shard_items(s).stop - shard_items(s).start for s in todo)
    if todo:
        log.info(f"generating {n_todo} images ({len(todo)} of {n_shards} shards{f', rank {rank}/{world}' if world > 1 else ''}) "
                 f"into {out_dir}: {algorithm} {method} order {order}, {steps} steps, cfg {cfg_scale}, batch {batch_size}, "
                 f"{backend} update{', CUDA graph' if use_graph else ''}")
    t0 = time.perf_counter()
    bar = tqdm(total=n_todo, unit="img", desc="generate", disable=not progress or rank != 0, dynamic_ncols=True)
    for s in todo:
        sl = shard_items(s)
        lab, idx = labels_all[sl], index_all[sl]
        images = []
        for i in range(0, len(lab), batch_size):
            images.append(sample_batch(lab[i: i + batch_size], idx[i: i + batch_size]))
            bar.update(len(images[-1]))
        save_npz(_shard_path(out_dir, s), images=np.concatenate(images), labels=lab, index=idx)
    bar.close()
    seconds = time.perf_counter() - t0
    barrier()

    rate = n_todo / seconds if n_todo and seconds > 0 else float(previous.get("images_per_second", 0.0))
    if rank == 0:
        missing = [s for s in range(n_shards) if not _shard_path(out_dir, s).is_file()]
        if missing:
            raise UserError(f"{out_dir}: shards {missing[:5]} are missing after generation; re-run to complete them")
        write_json(out_dir / MANIFEST, {**read_json(out_dir / MANIFEST), "complete": True, "images_per_second": rate,
                                        "last_run_seconds": seconds})
    barrier()
    nfe = next(iter(samplers.values()))[1].last_nfe if samplers else None
    return {"images": n, "generated": n_todo, "shards": n_shards, "skipped_shards": len(mine) - len(todo),
            "seconds": seconds, "images_per_second": rate, "nfe": nfe, "backend": backend, "cuda_graph": use_graph,
            "out_dir": str(out_dir)}


def load_generated(out_dir: str | Path, per_class: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, C, H, W], labels int64 [N]) of a complete generation; UserError if missing/incomplete.

    per_class > 0 keeps only the first `per_class` images of each class (in generation order, so the same
    images every time) and holds only those in memory: evaluation of a large generation on a subsample.
    """
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST
    if not path.is_file():
        raise UserError(f"{out_dir}: no generated images ({MANIFEST} missing); run stage 2 first")
    man = read_json(path)
    if not man.get("complete"):
        raise UserError(f"{out_dir}: the generation is incomplete; re-run stage 2 to finish it")
    images, labels = [], []
    taken: dict[int, int] = {}
    for s in range(int(man["num_shards"])):
        p = _shard_path(out_dir, s)
        if not p.is_file():
            raise UserError(f"{p} is missing; re-run stage 2 to regenerate it")
        z = load_npz(p, keys=("images", "labels", "index"))
        x, y = z["images"], z["labels"]
        if per_class > 0:
            keep = np.zeros(len(y), dtype=bool)
            for i, c in enumerate(y.tolist()):
                if taken.get(c, 0) < per_class:
                    taken[c] = taken.get(c, 0) + 1
                    keep[i] = True
            x, y = x[keep], y[keep]
        images.append(x)
        labels.append(y)
    return np.concatenate(images), np.concatenate(labels).astype(np.int64)
