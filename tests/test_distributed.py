"""DDP on CPU (gloo, 2 processes): each rank trains on its rows of the same global batch, so the result equals a
single-process run up to float summation order, for in-memory images and for VAE latents (whose per-sample
flips and posterior draws must not depend on the world size); only rank 0 writes checkpoints."""
import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dpt_fast.config import load_config
from dpt_fast.data.latents import FORMAT, LatentDataset
from dpt_fast.diffusion import make_schedule
from dpt_fast.diffusion.checkpoint import list_checkpoints
from dpt_fast.diffusion.train import train_diffusion
from dpt_fast.distributed import setup_distributed
from dpt_fast.models import build_uvit
from dpt_fast.stages.stage2 import _Latents

STEPS = 3


def _cfg():
    return load_config("digits", ["model.embed_dim=32", "model.depth=2", f"train.steps={STEPS}", "train.batch_size=16",
                                  "train.ckpt_every=2", "train.warmup_steps=1", "train.lr=1e-3"])


def write_latents(root, n=40, c=1, size=8):
    """A prepared latents folder (as `python -m dpt_fast.data.prepare --vae` writes it) with random moments:
    float32 [n, (image, mirror), (mean, logvar) x c, size, size] in two shards."""
    root.mkdir(parents=True)
    g = np.random.default_rng(0)
    moments = g.normal(0, 1, (n, 2, 2 * c, size, size)).astype(np.float32)
    moments[:, :, c:] = np.log(0.1)  # small posterior variance
    shard_size = n // 2
    shards = []
    for s in range(2):
        np.save(root / f"latents-{s:05d}.npy", moments[s * shard_size:(s + 1) * shard_size])
        shards.append(f"latents-{s:05d}.npy")
    np.save(root / "labels.npy", g.integers(0, 10, n).astype(np.int64))
    (root / "manifest.json").write_text(json.dumps({
        "format": FORMAT, "kind": "latents", "shard_size": shard_size, "shards": shards, "labels": "labels.npy",
        "num_images": n, "classes": [str(i) for i in range(10)], "scale_factor": 0.5, "latent_shape": [c, size, size]}))
    return root


def _run(out_dir, latents=None, progress=False):
    cfg = _cfg()
    g = torch.Generator().manual_seed(0)
    if latents is None:
        x, y = torch.rand(40, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 10, (40,), generator=g)
    else:
        ds = LatentDataset(latents)
        x, y = _Latents(ds), torch.from_numpy(ds.labels)
    torch.manual_seed(0)
    model = build_uvit(cfg.model, 11)
    return train_diffusion(model, x, y, make_schedule(cfg.diffusion), cfg.train, num_classes=10, seed=0,
                           ckpt_dir=out_dir / "ckpt", fingerprint="fp", device=torch.device("cpu"),
                           log_dir=out_dir, progress=progress)


def _worker(rank, world, port, out_dir, latents):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    r, w, _ = setup_distributed(torch.device("cpu"))
    assert (r, w) == (rank, world)
    res = _run(out_dir, latents)
    if rank == 0:
        torch.save({"ema": res.ema.state_dict(), "loss": res.history["loss"]}, out_dir / "result.pt")
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("data", ["images", "latents"])
def test_two_process_ddp_matches_one_process_and_rank0_writes_checkpoints(tmp_path, data):
    latents = write_latents(tmp_path / "latents") if data == "latents" else None
    mp.spawn(_worker, args=(2, _free_port(), tmp_path / "ddp", latents), nprocs=2, join=True)
    assert list_checkpoints(tmp_path / "ddp" / "ckpt") == [2, 3]
    ddp = torch.load(tmp_path / "ddp" / "result.pt", weights_only=True)

    single = _run(tmp_path / "single", latents)
    ema = single.ema.state_dict()
    for k, v in ddp["ema"].items():
        torch.testing.assert_close(v, ema[k], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(ddp["loss"]), torch.tensor(single.history["loss"]), rtol=1e-4, atol=1e-5)
