"""Stage 2 end to end on the digits preset: contract files, resume after a kill, config mismatch, reuse."""
import json

import numpy as np
import pytest
import torch

import dpt_fast.stages.stage2 as stage2
from dpt_fast.config import load_config
from dpt_fast.diffusion.checkpoint import list_checkpoints
from dpt_fast.sampling import load_generated
from dpt_fast.stages import fingerprint, run_stages
from dpt_fast.stages.rundir import RunDir
from dpt_fast.utils import UserError, save_npz, write_json

TINY = ["model.embed_dim=32", "model.depth=2", "train.steps=6", "train.ckpt_every=3", "train.batch_size=32",
        "sample.steps=3", "gen.k_per_class=4", "gen.shard_size=16"]


def _cfg(*overrides):
    return load_config("digits", [*TINY, *overrides])


def _fake_stage1(cfg, rd: RunDir):
    """A finished stage 1: every training image pseudo-labelled (true labels, a few of them wrong)."""
    from dpt_fast.data import load_dataset

    y = load_dataset(cfg.data).y_train
    label = np.where(np.arange(len(y)) % 7 == 0, (y + 1) % 10, y)
    save_npz(rd.pseudo_labels, index=np.arange(len(y)), label=label, prob=np.ones(len(y), np.float32))
    write_json(rd.metrics(1), {"pseudo_label_accuracy": float((label == y).mean()), "fingerprint": fingerprint(cfg, 1)})


@pytest.fixture
def rd(run_dir):
    rd = RunDir(run_dir)
    _fake_stage1(_cfg(), rd)
    return rd


def test_stage2_writes_checkpoints_generated_images_samples_and_metrics(rd):
    cfg = _cfg()
    metrics = run_stages(cfg, rd.root, [2], progress=False)[2]

    assert list_checkpoints(rd.checkpoints)[-1] == 6
    assert {p.suffix for p in rd.checkpoints.iterdir()} == {".safetensors", ".json"}
    images, labels = load_generated(rd.generated)
    assert images.shape == (40, 1, 8, 8) and images.dtype == np.uint8
    assert np.bincount(labels, minlength=10).tolist() == [4] * 10
    assert len(list(rd.generated.glob("shard-*.npz"))) == 3
    assert rd.samples_png.exists()
    saved = json.loads(rd.metrics(2).read_text())
    for key in ("fid", "is", "cas", "images_per_second", "seconds", "train_steps_per_second", "train_seconds", "gen_seconds"):
        assert isinstance(saved[key], float), key
    assert 0.0 <= saved["cas"] <= 1.0 and saved["train_steps"] == 6 == metrics["train_steps"]
    hist = json.loads((rd.stage(2) / "train_history.json").read_text())
    assert hist["step"][-1] == 6 and len(hist["loss"]) == len(hist["lr"]) == len(hist["step"])


class _Killed(Exception):
    pass


def test_stage2_killed_mid_training_resumes_from_its_last_checkpoint(rd, monkeypatch):
    cfg = _cfg()
    real_train = stage2.train_diffusion

    def dies_at_step_4(*args, **kwargs):
        def hook(step):
            if step == 4:
                raise _Killed

        return real_train(*args, on_step=hook, **kwargs)

    monkeypatch.setattr(stage2, "train_diffusion", dies_at_step_4)
    with pytest.raises(_Killed):
        run_stages(cfg, rd.root, [2], progress=False)
    assert list_checkpoints(rd.checkpoints) == [3] and not rd.metrics(2).exists()

    monkeypatch.setattr(stage2, "train_diffusion", real_train)
    metrics = run_stages(cfg, rd.root, [2], progress=False)[2]
    assert metrics["train_resumed_from"] == 3 and metrics["train_steps"] == 6


def test_new_sampler_settings_reuse_the_trained_weights(rd):
    run_stages(_cfg(), rd.root, [2], progress=False)
    assert json.loads((rd.generated / "manifest.json").read_text())["identity"]["t_end"] == pytest.approx(1e-4)
    metrics = run_stages(_cfg("sample.cfg_scale=1.5", "sample.t_end=0.002"), rd.root, [2], progress=False)[2]
    assert metrics["train_resumed_from"] == 6  # no training step repeated
    identity = json.loads((rd.generated / "manifest.json").read_text())["identity"]
    assert identity["cfg_scale"] == 1.5 and identity["t_end"] == 0.002


def test_checkpoints_of_another_config_are_a_one_line_error_naming_fresh(rd):
    run_stages(_cfg(), rd.root, [2], progress=False)
    with pytest.raises(UserError, match="--fresh") as e:
        run_stages(_cfg("train.lr=3e-4"), rd.root, [2], progress=False)
    assert "\n" not in str(e.value)
    metrics = run_stages(_cfg("train.lr=3e-4"), rd.root, [2], fresh=True, progress=False)[2]
    assert metrics["train_resumed_from"] == 0


def test_stage2_without_pseudo_labels_names_stage_1(run_dir):
    with pytest.raises(UserError, match="--stage 1"):
        stage2.run(_cfg(), RunDir(run_dir), progress=False)


def test_stage2_trains_on_vae_latents_and_decodes_what_it_generates(tmp_path):
    """data.name=latents: train on prepared latents (tiny random VAE), generate latents, save decoded images."""
    from diffusers import AutoencoderKL
    from PIL import Image

    from dpt_fast.data.latents import LatentDataset, prepare_shards

    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for c, level in (("a", 60), ("b", 190)):
        (root / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.clip(level + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8)).save(root / c / f"{i}.png")
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=8,
                  sample_size=16).save_pretrained(tmp_path / "vae")
    prepare_shards(root, tmp_path / "lat", vae_path=str(tmp_path / "vae"), resolution=16, shard_size=4, batch_size=4,
                   dtype="float32", device="cpu", progress=False)

    cfg = load_config("digits", ["data.name=latents", f"data.root={tmp_path / 'lat'}", "model.img_size=8",
                                 "model.in_chans=4", *TINY[:2], "train.steps=2", "train.batch_size=4", "sample.steps=2",
                                 "gen.k_per_class=2", "gen.batch_size=4"])
    rd = RunDir(tmp_path / "run")
    labels = LatentDataset(tmp_path / "lat").labels
    save_npz(rd.pseudo_labels, index=np.arange(len(labels)), label=labels, prob=np.ones(len(labels), np.float32))
    metrics = stage2.run(cfg, rd, progress=False)

    images, gen_labels = load_generated(rd.generated)
    assert images.shape == (4, 3, 16, 16) and images.dtype == np.uint8 and sorted(gen_labels.tolist()) == [0, 0, 1, 1]
    assert list_checkpoints(rd.checkpoints)[-1] == 2 and rd.samples_png.exists()
    assert metrics["cas"] is None and metrics["train_steps"] == 2  # no feature network for latents: metrics skipped


def test_eval_num_gen_per_class_evaluates_a_per_class_subsample(rd):
    metrics = run_stages(_cfg("eval.num_gen_per_class=2"), rd.root, [2], progress=False)[2]
    assert metrics["num_generated"] == 20  # 2 of the 4 images of each of 10 classes
    images, labels = load_generated(rd.generated, per_class=2)
    full, full_labels = load_generated(rd.generated)
    assert np.bincount(labels, minlength=10).tolist() == [2] * 10
    # the first two of each class, in generation order
    first = np.concatenate([np.flatnonzero(full_labels == c)[:2] for c in range(10)])
    np.testing.assert_array_equal(np.sort(first), np.flatnonzero(np.isin(np.arange(len(full)), first)))
    np.testing.assert_array_equal(images, full[np.sort(first)])


def test_eval_fid_false_gives_cas_alone(rd):
    metrics = run_stages(_cfg("eval.fid=false"), rd.root, [2], progress=False)[2]
    assert metrics["fid"] is None and 0.0 <= metrics["cas"] <= 1.0 and len(metrics["cas_per_class"]) == 10


def test_cas_alone_without_a_feature_network_is_skipped_not_failed():
    from dpt_fast.eval import class_agreement

    m = class_agreement(np.zeros((4, 3, 8, 8), np.uint8), np.arange(4), "cifar10")
    assert m["cas"] is None and "eval.feature_net" in m["metrics_skipped"]


def test_train_fingerprint_ignores_the_test_split_and_source_images():
    y = torch.arange(10)
    base = stage2.train_fingerprint(_cfg(), y)
    assert stage2.train_fingerprint(_cfg("data.test_root=/x", "data.image_root=/y"), y) == base
    assert stage2.train_fingerprint(_cfg("train.lr=1e-3"), y) != base
