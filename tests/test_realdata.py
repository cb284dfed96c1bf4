"""Real-data paths through `python -m dpt_fast.stage --stage all` on tiny data made here: an ImageFolder prepared
into VAE latents (tiny random AutoencoderKL, stage 1 on a tiny random timm backbone), CIFAR-10 python batches and
a small ImageFolder in memory; plus the resumable feature cache the streamed stages use."""
import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import dpt_fast.stage as cli
from dpt_fast.data import prepare
from dpt_fast.data.imagefolder import decode_pil
from dpt_fast.data.stream import ArraySource, cached_features
from dpt_fast.models.classifier import BackboneSpace
from dpt_fast.utils import load_npz

CLASSES = ("cat", "dog", "emu")
RES = 16  # prepare's crop: 16 px -> 4x8x8 latents with the tiny VAE (one downsampling)
TINY_UVIT = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "train.steps=2", "train.batch_size=8",
             "sample.steps=2", "gen.k_per_class=2", "gen.batch_size=4"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest (conftest.py)


@pytest.fixture(autouse=True)
def quiet_cli(monkeypatch):
    """The CLIs install a log handler on the current stderr, which pytest swaps per test: keep it out."""
    monkeypatch.setattr(cli, "setup_logging", lambda quiet=False: None)
    monkeypatch.setattr(prepare, "setup_logging", lambda quiet=False: None)


def _stage_all(run_dir, *overrides) -> None:
    assert cli.main(["--stage", "all", "--config", "digits", "--run-dir", str(run_dir), "--quiet", *overrides]) == 0


def _images(root, per_class: int, seed: int) -> None:
    """Class folders of noisy flat-colour images (class = brightness), mixed sizes, JPEG and PNG."""
    rng = np.random.default_rng(seed)
    for c, level in zip(CLASSES, (40, 120, 200)):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            x = np.clip(level + rng.normal(0, 25, (18 + i % 3, 20, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(x).save(root / c / f"{c}_{i:02d}.{'jpg' if i % 2 else 'png'}")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """ImageNet layout: train/ (3 classes x 12) and val/ (3 x 4)."""
    root = tmp_path_factory.mktemp("folder")
    _images(root / "train", 12, 0)
    _images(root / "val", 4, 1)
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny random diffusers AutoencoderKL folder and tiny random timm ViT weights (safetensors)."""
    import timm
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=8,
                  sample_size=16).save_pretrained(d / "vae")
    vit = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=32)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(d / "vit.safetensors"))
    return d


def _backbone(weights) -> list[str]:
    return ["stage1.method=features", "stage1.backbone=test_vit", f"stage1.backbone_weights={weights / 'vit.safetensors'}",
            "stage1.backbone_image_size=32"]


@pytest.fixture(scope="module")
def prepared(folder, weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "lat"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prepare, "setup_logging", lambda quiet=False: None)
        assert prepare.main(["--root", str(folder / "train"), "--out", str(out), "--vae", str(weights / "vae"),
                             "--resolution", str(RES), "--shard-size", "16", "--batch-size", "8", "--dtype", "float32",
                             "--device", "cpu", "--quiet"]) == 0
    return out


def _latents_cfg(prepared, weights, *more) -> list[str]:
    return ["data.name=latents", f"data.root={prepared}", *_backbone(weights), "model.img_size=8", "model.in_chans=4",
            *TINY_UVIT, *more]


@pytest.fixture(scope="module")
def latents_run(prepared, weights, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "latents"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "setup_logging", lambda quiet=False: None)
        _stage_all(run, *_latents_cfg(prepared, weights))
    return run


def _assert_contract(run, n_train: int, n_test: int, num_classes: int, gen_shape: tuple, k: int = 2) -> dict:
    """Every run-directory file of the README's contract, with sane shapes and values; returns the three stages' metrics."""
    from dpt_fast.sampling import load_generated

    for f in ("config.yaml", "split.json", "report.json", "report.md", "samples.png"):
        assert (run / f).is_file(), f
    z = load_npz(run / "stage1" / "pseudo_labels.npz", ("index", "label", "prob"))
    assert z["index"].dtype == np.int64 and np.array_equal(z["index"], np.arange(n_train))
    assert z["label"].dtype == np.int64 and z["label"].min() >= 0 and z["label"].max() < num_classes
    assert z["prob"].dtype == np.float32 and np.all((z["prob"] > 0) & (z["prob"] <= 1))
    m = {n: json.loads((run / f"stage{n}" / "metrics.json").read_text()) for n in (1, 2, 3)}
    for key in ("pseudo_label_accuracy", "labelled", "unlabelled", "seconds", "test_top1"):
        assert m[1][key] is not None, key
    assert m[1]["labelled"] + m[1]["unlabelled"] == n_train and m[1]["num_test"] == n_test
    assert any((run / "stage2" / "checkpoints").glob("*.safetensors"))
    images, labels = load_generated(run / "stage2" / "generated")
    assert images.dtype == np.uint8 and images.shape == (k * num_classes, *gen_shape)
    assert np.bincount(labels, minlength=num_classes).tolist() == [k] * num_classes
    for key in ("fid", "is", "cas", "images_per_second", "seconds"):
        assert key in m[2], key
    for key in ("top1", "stage1_top1", "seconds"):
        assert isinstance(m[3][key], float), key
    assert 0 <= m[3]["top1"] <= 1 and m[3]["stage1_top1"] == pytest.approx(m[1]["test_top1"])
    assert m[3]["generated"] == k * num_classes
    assert json.loads((run / "report.json").read_text())["stages_finished"] == [1, 2, 3]
    return m


def test_latents_run_all_three_stages_through_the_cli(latents_run, prepared):
    m = _assert_contract(latents_run, 36, 12, 3, (3, RES, RES))
    assert m[2]["fid"] is None  # no feature network given for latent data: skipped, not a crash
    labels = np.load(prepared / "labels.npy")
    z = load_npz(latents_run / "stage1" / "pseudo_labels.npz")
    lab = json.loads((latents_run / "split.json").read_text())["labelled"]
    assert np.array_equal(z["label"][lab], labels[lab])  # labelled rows keep the prepared folder's labels
    assert m[1]["pseudo_label_accuracy"] == pytest.approx(float((z["label"] == labels).mean()))
    s1 = latents_run / "stage1"
    assert np.load(s1 / "train_features.npy", mmap_mode="r").shape == (36, 64)
    assert np.load(s1 / "test_features.npy", mmap_mode="r").shape == (12, 64)
    assert load_npz(s1 / "test_labels.npz")["label"].tolist() == [0] * 4 + [1] * 4 + [2] * 4  # val/ class folders
    assert np.load(latents_run / "stage3" / "generated_features.npy").shape == (6, 64)
    assert not (s1 / "train_features.done").exists() and json.loads((s1 / "train_features.json").read_text())["complete"]


def test_stage3_rerun_with_new_settings_reuses_the_generated_features(latents_run, prepared, weights, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(latents_run, run)
    before = (run / "stage3" / "generated_features.npy").stat().st_mtime_ns
    assert cli.main(["--stage", "3", "--config", "digits", "--run-dir", str(run), "--quiet",
                     *_latents_cfg(prepared, weights, "stage3.generated_weight=0.5")]) == 0
    assert (run / "stage3" / "generated_features.npy").stat().st_mtime_ns == before
    assert json.loads((run / "stage3" / "metrics.json").read_text())["generated_used"] == 6


def test_backbone_crop_is_resize_then_center_crop(weights):
    """crop c at input side S: torchvision Resize(round(S / c)) + CenterCrop(S), as MSN's Resize 256 + Crop 224."""
    import torchvision.transforms.functional as TF

    space = BackboneSpace("test_vit", str(weights / "vit.safetensors"), image_size=32, crop=0.5)
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8))
    assert (space.resize, space.input_size, space.crop) == (64, (32, 32), 0.5)
    done = TF.center_crop(TF.resize(x, [64], antialias=True), [32, 32])
    torch.testing.assert_close(space.embed_tensor(x), space.embed_tensor(done, transformed=True))
    full = BackboneSpace("test_vit", str(weights / "vit.safetensors"), image_size=32)  # timm: crop 1 by default
    assert full.resize == 32 and torch.equal(full.transform(x), x)
    assert not torch.allclose(space.embed_tensor(x), full.embed_tensor(x), atol=1e-3)


def test_latent_row_i_gets_the_features_of_files_txt_line_i(latents_run, prepared, folder, weights):
    """Alignment: the stage-1 features of row i are those of the image latent i was encoded from (file i, decoded
    with the backbone's own Resize + CenterCrop)."""
    files = (prepared / "files.txt").read_text().splitlines()
    feats = np.load(latents_run / "stage1" / "train_features.npy")
    space = BackboneSpace("test_vit", str(weights / "vit.safetensors"), image_size=32)
    rows = [0, 13, 35]
    x = np.stack([decode_pil(folder / "train" / files[i], 32, "eval", space.resize).transpose(2, 0, 1) for i in rows])
    ref = space.embed_tensor(torch.from_numpy(x), transformed=True).numpy()
    # PIL here, DALI or PIL in the run (at most 1 grey level apart): nearly the same vector, and nearest its own row
    np.testing.assert_allclose(feats[rows], ref, atol=0.05)
    assert (ref @ feats.T).argmax(1).tolist() == rows


def test_subset_file_of_prepared_file_names_selects_the_labelled_rows(latents_run, prepared, weights, tmp_path):
    files = (prepared / "files.txt").read_text().splitlines()
    chosen = [4, 17, 30]
    subset = tmp_path / "1imgs_class.txt"
    subset.write_text("".join(files[i].rsplit("/", 1)[1] + "\n" for i in chosen))  # bare names, as MSN/DPT lists
    run = tmp_path / "run"
    shutil.copytree(latents_run / "stage1", run / "stage1")  # the feature files are reused (same backbone, images)
    assert cli.main(["--stage", "1", "--config", "digits", "--run-dir", str(run), "--quiet",
                     *_latents_cfg(prepared, weights, f"split.subset_file={subset}")]) == 0
    assert json.loads((run / "split.json").read_text())["labelled"] == chosen
    z = load_npz(run / "stage1" / "pseudo_labels.npz")
    assert np.array_equal(z["label"][chosen], np.load(prepared / "labels.npy")[chosen]) and np.all(z["prob"][chosen] == 1)


def test_moved_images_via_image_root_and_a_missing_test_split_is_a_one_line_error(latents_run, prepared, folder,
                                                                                   weights, tmp_path, capsys):
    moved = tmp_path / "elsewhere" / "imgs"
    shutil.copytree(folder / "train", moved)
    base = _latents_cfg(prepared, weights, f"data.image_root={moved}")
    assert cli.main(["--stage", "1", "--config", "digits", "--run-dir", str(tmp_path / "a"), "--quiet", *base]) == 2
    err = capsys.readouterr().err.strip()
    assert "data.test_root" in err and "\n" not in err  # no val/ beside the moved folder
    assert cli.main(["--stage", "1", "--config", "digits", "--run-dir", str(tmp_path / "b"), "--quiet", *base,
                     f"data.test_root={folder / 'val'}"]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "b" / "stage1" / "train_features.npy"),
                               np.load(latents_run / "stage1" / "train_features.npy"), atol=1e-5)


def test_latents_with_an_in_memory_stage1_method_is_a_user_error(prepared, tmp_path, capsys):
    assert cli.main(["--stage", "1", "--config", "digits", "--run-dir", str(tmp_path / "r"), "--quiet",
                     "data.name=latents", f"data.root={prepared}", "stage1.method=simclr_umap"]) == 2
    assert "stage1.method=features" in capsys.readouterr().err


def _write_cifar(folder, n: int) -> None:
    """CIFAR-10 python batches (protocol-2 pickles of dicts with bytes keys): n images per batch, 3 classes
    told apart by brightness."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = (np.arange(n) % 3).tolist()
        data = np.clip(np.array(labels)[:, None] * 80 + rng.normal(40, 20, (n, 3072)), 0, 255).astype(np.uint8)
        d = {b"batch_label": name.encode(), b"labels": labels, b"data": data}
        (folder / name).write_bytes(pickle.dumps(d, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))


def test_cifar10_runs_all_three_stages_on_32px_rgb(tmp_path):
    _write_cifar(tmp_path / "cifar-10-batches-py", 12)
    run = tmp_path / "run"
    _stage_all(run, "data.name=cifar10", f"data.root={tmp_path}", "model.preset=uvit_s2_pixel32", *TINY_UVIT,
               "stage1.ssl_epochs=1", "stage1.ssl_batch_size=16")
    m = _assert_contract(run, 60, 12, 3, (3, 32, 32))
    assert m[1]["method"] == "simclr_umap"
    assert m[2]["fid"] is None and m[2]["cas"] is None and "eval.feature_net" in m[2]["metrics_skipped"]


def test_imagefolder_in_memory_runs_all_three_stages_with_backbone_features(folder, weights, tmp_path):
    run = tmp_path / "run"
    _stage_all(run, "data.name=imagefolder", f"data.root={folder}", "data.image_size=32", *_backbone(weights),
               "model.preset=uvit_s2_pixel32", *TINY_UVIT)
    m = _assert_contract(run, 36, 12, 3, (3, 32, 32))
    assert m[1]["method"] == "features" and m[2]["fid"] is None
    assert np.load(run / "stage1" / "train_features.npy").shape == (36, 64)


class _Killed(Exception):
    pass


def test_feature_cache_resumes_after_a_kill_and_recomputes_for_another_key(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (21, 1, 4, 4), dtype=np.uint8)
    src = ArraySource(x)
    seen = []

    def embed(images):
        seen.append(len(images))
        return images.flatten(1).float()

    def dies_in_chunk_2(images):
        if sum(seen) >= 16:
            raise _Killed
        return embed(images)

    path = tmp_path / "f.npy"
    with pytest.raises(_Killed):
        cached_features(dies_in_chunk_2, src, path, key={"m": 1}, dim=16, batch_size=4, chunk_rows=8, progress=False)
    assert sorted(p.name for p in (tmp_path / "f.done").iterdir()) == ["000000", "000001"]
    seen.clear()
    f = cached_features(embed, src, path, key={"m": 1}, dim=16, batch_size=4, chunk_rows=8, progress=False)
    assert sum(seen) == 5  # only the unfinished chunk (rows 16..20) was computed again
    np.testing.assert_array_equal(f, x.reshape(21, 16).astype(np.float32))
    seen.clear()
    cached_features(embed, src, path, key={"m": 1}, dim=16, batch_size=4, chunk_rows=8, progress=False)
    assert seen == []  # finished: reused as is
    cached_features(embed, src, path, key={"m": 2}, dim=16, batch_size=4, chunk_rows=8, progress=False)
    assert sum(seen) == 21  # another model: all again


def test_head_label_prob_in_row_chunks_matches_the_full_probabilities():
    from dpt_fast.models.classifier import LinearHead

    rng = np.random.default_rng(0)
    head = LinearHead(rng.normal(size=(4, 5)), rng.normal(size=4))
    x, y = rng.normal(size=(11, 5)), rng.integers(0, 4, 11)
    p = head.predict_proba(x)
    pred, prob = head.label_prob(x, rows=3)
    assert np.array_equal(pred, p.argmax(1)) and pred.dtype == np.int64
    np.testing.assert_allclose(prob, p.max(1), rtol=1e-6)
    np.testing.assert_allclose(head.label_prob(x, y, rows=3)[1], p[np.arange(11), y], rtol=1e-6)
