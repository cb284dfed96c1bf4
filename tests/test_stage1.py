"""Stage 1 on the digits preset: contract files, determinism, exact resume, encoder reuse, baselines."""
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dpt_fast.config import load_config
from dpt_fast.data import load_dataset, load_split
from dpt_fast.stages import stage1
from dpt_fast.stages.rundir import RunDir
from dpt_fast.utils import UserError, load_npz


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One finished stage-1 run on digits (default seeds), shared by the tests of this module."""
    cfg = load_config("digits")
    rd = RunDir(tmp_path_factory.mktemp("s1") / "run")
    metrics = stage1.run(cfg, rd, progress=False)
    return cfg, rd, metrics


def test_stage1_writes_contract_files_with_dtypes_and_sane_accuracy(digits_run):
    cfg, rd, m = digits_run
    ds = load_dataset(cfg.data)
    n = len(ds.y_train)
    z = load_npz(rd.pseudo_labels, ("index", "label", "prob"))
    assert z["index"].dtype == np.int64 and np.array_equal(z["index"], np.arange(n))
    assert z["label"].dtype == np.int64 and z["label"].shape == (n,)
    assert z["prob"].dtype == np.float32 and z["prob"].shape == (n,)
    assert z["label"].min() >= 0 and z["label"].max() < 10
    assert np.all((z["prob"] > 0) & (z["prob"] <= 1))
    lab = load_split(rd.split, n)
    assert len(lab) == 10 and np.array_equal(np.unique(ds.y_train[lab]), np.arange(10))
    assert np.array_equal(z["label"][lab], ds.y_train[lab]) and np.all(z["prob"][lab] == 1.0)
    for key in ("pseudo_label_accuracy", "labelled", "unlabelled", "seconds", "test_top1", "unlabelled_accuracy"):
        assert key in m
    assert m["labelled"] == 10 and m["unlabelled"] == n - 10
    assert m["pseudo_label_accuracy"] == pytest.approx(float((z["label"] == ds.y_train).mean()))
    # chance is 0.1; 3 SimCLR epochs of a width-8 CNN on 8x8 digits already reach ~0.5
    assert m["pseudo_label_accuracy"] > 0.3 and m["test_top1"] > 0.3
    for f in ("encoder.safetensors", "space.npz", "space.json", "head.safetensors"):
        assert (rd.stage(1) / f).is_file()
    assert not (rd.stage(1) / "simclr_ckpt.safetensors").exists()  # removed once training finished


def test_simclr_killed_after_epoch_1_resumes_and_ends_identical_to_an_uninterrupted_run(digits_run, tmp_path):
    """Also the determinism check: a second run with the same seeds gives the same weights and pseudo-labels."""
    cfg, rd, _ = digits_run
    rd2 = RunDir(tmp_path / "killed")
    ds = load_dataset(cfg.data)

    def kill(epoch):
        if epoch == 1:
            raise Killed

    with pytest.raises(Killed):
        stage1.train_simclr(ds.x_train, cfg, rd2.stage(1), progress=False, on_epoch=kill)
    ckpt = rd2.stage(1) / "simclr_ckpt.safetensors"
    assert ckpt.is_file() and not (rd2.stage(1) / "encoder.safetensors").exists()

    epochs_run = []
    stage1.train_simclr(ds.x_train, cfg, rd2.stage(1), progress=False, on_epoch=epochs_run.append)
    assert epochs_run == [2, 3]  # continued after the saved epoch, did not start over
    a = load_file(str(rd.stage(1) / "encoder.safetensors"))
    b = load_file(str(rd2.stage(1) / "encoder.safetensors"))
    assert a.keys() == b.keys()
    for k in a:  # same weights as the uninterrupted run: model, Adam moments and augmentation RNG restored
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    m = stage1.run(cfg, rd2, progress=False)  # the stage picks the finished encoder up
    a, b = load_npz(rd.pseudo_labels), load_npz(rd2.pseudo_labels)
    assert np.array_equal(a["label"], b["label"])
    np.testing.assert_allclose(a["prob"], b["prob"], atol=1e-5)
    assert m["pseudo_label_accuracy"] == pytest.approx(digits_run[2]["pseudo_label_accuracy"])


def test_changed_split_reuses_encoder_and_umap(digits_run, tmp_path, monkeypatch):
    cfg, rd, m0 = digits_run
    root = tmp_path / "resplit"
    shutil.copytree(rd.root, root)

    def must_not_run(*a, **k):
        raise AssertionError("retrained although only the labels changed")

    monkeypatch.setattr(stage1, "train_simclr", must_not_run)
    monkeypatch.setattr(stage1, "fit_umap", must_not_run)
    cfg2 = load_config("digits", ["split.seed=1", "split.labels_per_class=2"])
    m = stage1.run(cfg2, RunDir(root), progress=False)
    assert m["labelled"] == 20
    assert not np.array_equal(load_split(root / "split.json"), load_split(rd.split))


def test_changed_ssl_config_retrains_the_encoder(digits_run, tmp_path):
    cfg, rd, _ = digits_run
    assert stage1.ssl_fingerprint(cfg) != stage1.ssl_fingerprint(load_config("digits", ["stage1.ssl_lr=0.002"]))
    assert stage1.ssl_fingerprint(cfg) == stage1.ssl_fingerprint(load_config("digits", ["split.seed=4", "stage1.logreg_c=3"]))
    assert stage1.ssl_fingerprint(cfg) != stage1.ssl_fingerprint(load_config("digits", ["seed=1"]))


def test_split_fraction_labels_a_share_of_each_class(digits_run, tmp_path):
    cfg, rd, _ = digits_run
    root = tmp_path / "frac"
    shutil.copytree(rd.root, root)
    m = stage1.run(load_config("digits", ["split.fraction=0.1"]), RunDir(root), progress=False)
    assert 140 <= m["labelled"] <= 160  # ~10 % of 1,497, at least one per class
    assert m["pseudo_label_accuracy"] > 0.3


def test_pca_logreg_baseline_writes_the_same_contract(run_dir):
    rd = RunDir(run_dir)
    m = stage1.run(load_config("digits", ["stage1.method=pca_logreg", "split.labels_per_class=5"]), rd, progress=False)
    z = load_npz(rd.pseudo_labels, ("index", "label", "prob"))
    assert z["label"].shape == (1497,) and m["labelled"] == 50
    assert m["pseudo_label_accuracy"] > 0.5 and m["test_top1"] > 0.5  # PCA + LR on digits, 5 labels per class
    assert m["logreg_c"] == 1.0


def test_features_method_with_a_local_timm_backbone(run_dir, tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=32)
    weights = tmp_path / "test_vit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    cfg = load_config("digits", ["stage1.method=features", "stage1.backbone=test_vit",
                                 f"stage1.backbone_weights={weights}", "stage1.backbone_image_size=32"])
    rd = RunDir(run_dir)
    m = stage1.run(cfg, rd, progress=False)
    assert m["logreg_c"] == 400.0  # the paper's lambda = 0.0025 / N
    assert 0.0 <= m["test_top1"] <= 1.0 and m["pseudo_label_accuracy"] > 0.1
    assert load_npz(rd.pseudo_labels)["label"].shape == (1497,)


def test_features_method_without_weights_is_a_one_line_user_error(run_dir, tmp_path):
    cfg = load_config("digits", ["stage1.method=features", "stage1.backbone=test_vit",
                                 f"stage1.backbone_weights={tmp_path / 'nope.safetensors'}"])
    with pytest.raises(UserError, match="stage1.backbone_weights") as e:
        stage1.run(cfg, RunDir(run_dir), progress=False)
    assert "\n" not in str(e.value)


def test_fit_umap_puts_back_the_torch_thread_count_that_numba_resets(monkeypatch):
    """numba's OpenMP start-up sets the process-wide thread count to the core count (seen: 1 -> 2 on the
    first UMAP fit); stage 1 must put torch's back so later stages run with cfg.num_threads."""
    import umap

    class NumbaLike(umap.UMAP):
        def fit_transform(self, x, *a, **k):
            torch.set_num_threads(3)
            return np.zeros((len(x), self.n_components), np.float32)

    monkeypatch.setattr(umap, "UMAP", NumbaLike)
    f = np.eye(20, 16, dtype=np.float32)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        coords = stage1.fit_umap(f, load_config("digits"), progress=False)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(n)
    assert coords.shape == (20, 10) and coords.dtype == np.float32


def test_simclr_noise_augmentation_speckles_half_the_views_and_leaves_the_rest_as_before():
    import torch

    from dpt_fast.models.encoder import augment

    x = torch.zeros(64, 1, 12, 12)
    x[:, :, 4:8, 4:8] = 1.0
    plain = augment(x, torch.Generator().manual_seed(0))
    same = augment(x, torch.Generator().manual_seed(0), noise=0.0)
    assert torch.equal(plain, same)  # noise=0 draws nothing more: the old views exactly
    noisy = augment(x, torch.Generator().manual_seed(0), noise=0.3)
    assert noisy.min() >= -1.0 and noisy.max() <= 1.0
    changed = (noisy != plain).flatten(1).any(1).float().mean().item()
    assert 0.25 < changed < 0.75  # about half of the views
    # the background of a speckled view is no longer flat black
    assert (noisy[(noisy != plain).flatten(1).any(1)] > -1.0).float().mean() > 0.3


def test_mnist5k_preset_is_the_tuned_cpu_recipe_and_the_dataclass_defaults_uvits_optimiser():
    from dpt_fast.config import Config, load_config
    from dpt_fast.models.uvit import uvit_kwargs

    cfg = load_config("mnist5k")
    assert (cfg.diffusion.prediction, cfg.train.lr, tuple(cfg.train.betas), cfg.sample.cfg_scale) == ("v", 2e-3, (0.9, 0.99), 3.0)
    default = Config()
    assert load_config("base").to_dict() == {**default.to_dict(), "name": "base"}
    assert (default.diffusion.prediction, default.train.lr, tuple(default.train.betas), default.sample.cfg_scale) == ("eps", 2e-4, (0.99, 0.99), 0.4)
    kw = uvit_kwargs(cfg.model, 11)
    assert (kw["patch_size"], kw["embed_dim"], kw["depth"], kw["pos_embed_init"], kw["conv"]) == (7, 128, 6, "sincos", False)
    assert uvit_kwargs(load_config("mnist5k", ["model.pos_embed_init=trunc_normal"]).model, 11)["pos_embed_init"] == "trunc_normal"


def test_a_diverging_simclr_stops_with_one_line_naming_the_key_and_saves_no_encoder(run_dir):
    rd = RunDir(run_dir)
    with pytest.raises(UserError, match="lower stage1.ssl_lr") as e:
        stage1.run(load_config("digits", ["stage1.ssl_lr=1e6"]), rd, progress=False)
    assert "\n" not in str(e.value) and "diverged at epoch" in str(e.value)
    assert not (rd.stage(1) / "encoder.safetensors").exists() and not rd.pseudo_labels.exists()
    for ckpt in rd.stage(1).glob("simclr_ckpt.safetensors"):  # the kept epochs are finite
        assert all(torch.isfinite(v).all() for v in load_file(ckpt).values() if v.is_floating_point())


def test_a_damaged_encoder_is_trained_again_to_the_same_weights(digits_run, tmp_path):
    cfg, rd, m = digits_run
    root = tmp_path / "run"
    shutil.copytree(rd.root, root)
    enc = root / "stage1" / "encoder.safetensors"
    enc.write_bytes(enc.read_bytes()[:100])  # truncated
    m2 = stage1.run(cfg, RunDir(root), progress=False)
    assert m2["pseudo_label_accuracy"] == m["pseudo_label_accuracy"]
    a, b = load_file(rd.stage(1) / "encoder.safetensors"), load_file(enc)
    assert all(torch.equal(a[k], b[k]) for k in a)
