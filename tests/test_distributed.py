"""DDP on CPU (gloo, 2 processes): each rank trains on its rows of the same global batch, so the result equals a
single-process run up to float summation order, for in-memory images and for VAE latents (whose per-sample
flips and posterior draws must not depend on the world size); only rank 0 writes checkpoints."""
import json
import os
import socket
import subprocess
import sys
import time

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


def _learner_stage3_worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    setup_distributed(torch.device("cpu"))
    import dpt_fast.stages.learner as learner
    from dpt_fast.stages import stage3
    from dpt_fast.stages.rundir import RunDir

    def train_again(cfg, rd, progress=True):  # stands in for the learner's stage 3: which ranks run it?
        (out_dir / f"trained-on-rank{rank}").write_text("")
        return {"top1": 0.5, "method": cfg.stage1.method}

    learner.run_stage3 = train_again
    res = stage3.run(load_config("digits", ["stage1.method=freematch"]), RunDir(out_dir / "run"), progress=False)
    (out_dir / f"metrics-rank{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()


def test_the_learners_stage3_runs_on_rank0_only_and_every_rank_gets_its_metrics(tmp_path):
    mp.spawn(_learner_stage3_worker, args=(2, _free_port(), tmp_path), nprocs=2, join=True)
    assert sorted(p.name for p in tmp_path.glob("trained-on-*")) == ["trained-on-rank0"]  # no two ranks write
    for rank in (0, 1):
        assert json.loads((tmp_path / f"metrics-rank{rank}.json").read_text()) == {"top1": 0.5, "method": "freematch"}


# ----------------------------------------------------------------------------------------------
# A failure on one rank ends every rank (dpt_fast.distributed.report_failure + the watcher), as the CLI does it
# ----------------------------------------------------------------------------------------------
_RANK_SCRIPT = r'''
import sys, time, torch, torch.distributed as dist
from dpt_fast.distributed import barrier, report_failure, run_on_rank0, setup_distributed
from dpt_fast.utils import UserError

case = sys.argv[1]
rank, world, _ = setup_distributed(torch.device("cpu"))
try:
    assert run_on_rank0(lambda: {"from": rank}) == {"from": 0}  # every rank gets rank 0's result
    if case == "rank1_fails_while_rank0_is_in_a_collective":
        if rank == 1:
            time.sleep(2)
            raise UserError("rank one cannot read its shard")
        dist.all_reduce(torch.ones(1))  # rank 0 blocks here: rank 1 never joins
    elif case == "rank0_fails_in_rank0_only_work":
        def fit():
            time.sleep(1)
            raise UserError("the logistic regression got one class")
        run_on_rank0(fit)  # rank 1 waits for the result that never comes
    barrier()
    time.sleep(300)
except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    report_failure(str(e))
    sys.exit(2)
'''


@pytest.mark.slow
@pytest.mark.parametrize("case, origin", [("rank1_fails_while_rank0_is_in_a_collective", "rank one cannot read"),
                                          ("rank0_fails_in_rank0_only_work", "the logistic regression got one class")])
def test_an_error_on_one_rank_ends_every_rank_within_seconds(tmp_path, case, origin):
    port, root = _free_port(), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = [subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, case], stderr=subprocess.PIPE, text=True, cwd=root,
                              env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for r in range(2)]
    ended: dict[int, float] = {}
    try:
        deadline = time.time() + 120  # start-up (imports, rendezvous) included; without the fix: for ever
        while len(ended) < 2 and time.time() < deadline:
            ended.update({r: time.time() for r, p in enumerate(procs) if r not in ended and p.poll() is not None})
            time.sleep(0.05)
    finally:
        for p in procs:
            p.kill()
    assert len(ended) == 2, "a rank was still running 120 s after the start"
    assert max(ended.values()) - min(ended.values()) < 30  # the other rank ended within 30 s of the failed one
    for p in procs:
        err = p.stderr.read()
        lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
        assert p.returncode == 2 and lines and origin in lines[-1], err[-2000:]
