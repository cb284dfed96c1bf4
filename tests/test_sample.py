"""`python -m dpt_fast.sample`: N samples of a finished stage-2 run (FID-50K), labels drawn as the official
scripts draw them, resumable, sharded across ranks, in stage 2's shard format."""
import json
import os

import numpy as np
import pytest
import torch

import dpt_fast.stages.stage2 as stage2
from dpt_fast.config import dump_yaml, load_config
from dpt_fast.diffusion import make_schedule
from dpt_fast.diffusion.train import train_diffusion
from dpt_fast.models import build_uvit
from dpt_fast.sample import main
from dpt_fast.sampling import load_generated
from dpt_fast.stages.rundir import RunDir
from dpt_fast.stages.stage2 import draw_labels, train_fingerprint
from dpt_fast.utils import save_npz, write_text

TINY = ["model.embed_dim=32", "model.depth=2", "train.steps=2", "train.ckpt_every=2", "train.batch_size=16",
        "sample.steps=3", "gen.batch_size=8", "gen.shard_size=8", "device=cpu"]
PSEUDO_CLASSES = (3, 7)  # the fake stage 1 labels every image 3 or 7 (3 : 1)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run directory whose stage 2 finished: config.yaml, stage-1 pseudo-labels, the step-2 checkpoint."""
    from dpt_fast.data import load_dataset, to_float

    root = tmp_path_factory.mktemp("run")
    rd = RunDir(root)
    cfg = load_config("digits", TINY)
    write_text(rd.config, dump_yaml(cfg))
    ds = load_dataset(cfg.data)
    n = len(ds.y_train)
    label = np.where(np.arange(n) % 4 == 0, PSEUDO_CLASSES[1], PSEUDO_CLASSES[0])
    save_npz(rd.pseudo_labels, index=np.arange(n), label=label, prob=np.ones(n, np.float32))
    y = torch.from_numpy(label)
    torch.manual_seed(0)
    train_diffusion(build_uvit(cfg.model, 11), to_float(ds.x_train), y, make_schedule(cfg.diffusion), cfg.train,
                    num_classes=10, seed=cfg.seed, ckpt_dir=rd.checkpoints, fingerprint=train_fingerprint(cfg, y),
                    device=torch.device("cpu"), progress=False)
    return rd


def _sample(rd, out, num, labels="uniform", *extra):
    return main(["--run-dir", str(rd.root), "--num", str(num), "--labels", labels, "--out", str(out), "--quiet", *extra])


def test_labels_are_drawn_iid_as_the_official_sample_label_and_extend_by_prefix():
    uniform = draw_labels("uniform", 20000, 10, seed=0)
    counts = np.bincount(uniform, minlength=10)
    assert counts.min() > 1800 and counts.max() < 2200  # randint(0, K): 2000 +- 4.5 sd
    pseudo = np.array([3] * 300 + [7] * 100)
    drawn = draw_labels("pseudo", 20000, 10, seed=0, pseudo_labels=pseudo)
    assert set(drawn.tolist()) == {3, 7} and abs((drawn == 3).mean() - 0.75) < 0.015  # multinomial(counts)
    np.testing.assert_array_equal(draw_labels("uniform", 500, 10, seed=0), uniform[:500])
    assert not np.array_equal(draw_labels("uniform", 500, 10, seed=1), uniform[:500])


def test_sample_writes_stage2_shards_with_drawn_labels_and_a_larger_num_keeps_them(finished_run, tmp_path):
    out = tmp_path / "fid"
    assert _sample(finished_run, out, 16) == 0
    images, labels = load_generated(out)
    assert images.shape == (16, 1, 8, 8) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, draw_labels("uniform", 16, 10, seed=0))
    info = json.loads((out / "sample.json").read_text())
    assert (info["images"], info["labels"], info["step"], info["seed"]) == (16, "uniform", 2, 0)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["identity"]["steps"] == 3 and manifest["identity"]["t_end"] == pytest.approx(1e-4)

    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.npz")}
    assert _sample(finished_run, out, 20) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.npz") if p.name in before} == before
    more, more_labels = load_generated(out)
    np.testing.assert_array_equal(more[:16], images)
    np.testing.assert_array_equal(more_labels, draw_labels("uniform", 20, 10, seed=0))


class _Killed(Exception):
    pass


def test_an_interrupted_sampling_resumes_to_the_same_images(finished_run, tmp_path, monkeypatch):
    assert _sample(finished_run, tmp_path / "one_go", 24, "pseudo") == 0
    real = stage2.as_eps_model

    def dies_in_the_second_shard(model, schedule, prediction):
        net = real(model, schedule, prediction)
        calls = []

        def forward(x, t, y):
            calls.append(1)
            if len(calls) > 3 + 1:  # 3 evaluations per batch of 8 = one shard
                raise KeyboardInterrupt
            return net(x, t, y)

        return forward

    monkeypatch.setattr(stage2, "as_eps_model", dies_in_the_second_shard)
    assert _sample(finished_run, tmp_path / "resumed", 24, "pseudo") == 130
    assert sorted(p.name for p in (tmp_path / "resumed").glob("shard-*")) == ["shard-00000.npz"]
    monkeypatch.setattr(stage2, "as_eps_model", real)
    assert _sample(finished_run, tmp_path / "resumed", 24, "pseudo") == 0
    a, b = load_generated(tmp_path / "one_go"), load_generated(tmp_path / "resumed")
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert set(a[1].tolist()) <= set(PSEUDO_CLASSES)


def test_unfinished_runs_and_training_overrides_are_one_line_errors(finished_run, tmp_path, capsys):
    assert _sample(finished_run, tmp_path / "x", 4, "uniform", "train.steps=5") == 2
    assert "train.steps is part of the trained run" in capsys.readouterr().err
    assert _sample(finished_run, tmp_path / "x", 4, "uniform", "model.depth=4") == 2
    assert main(["--run-dir", str(tmp_path / "none"), "--num", "4", "--labels", "uniform", "--out", str(tmp_path / "x")]) == 2
    assert "--stage 2" in capsys.readouterr().err
    unfinished = RunDir(tmp_path / "unfinished")
    write_text(unfinished.config, dump_yaml(load_config("digits", [*TINY, "train.steps=4"])))
    assert _sample(unfinished, tmp_path / "x", 4) == 2
    err = capsys.readouterr().err
    assert "train.steps=4" in err and "--stage 2" in err and err.count("\n") == 1


def _rank_main(rank, world, port, run_root, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        assert _sample(RunDir(run_root), out, 20) == 0
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@pytest.mark.slow  # two spawned processes
def test_two_gloo_ranks_split_the_shards_and_match_one_process(finished_run, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(2, port, str(finished_run.root), str(tmp_path / "ddp")), nprocs=2, join=True)
    assert _sample(finished_run, tmp_path / "single", 20) == 0
    for a, b in zip(load_generated(tmp_path / "ddp"), load_generated(tmp_path / "single")):
        np.testing.assert_array_equal(a, b)
