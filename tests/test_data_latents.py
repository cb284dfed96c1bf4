"""Latent extraction (`python -m dpt_fast.data.prepare`) with a tiny random AutoencoderKL, resume, rank split,
and the LatentDataset that stage 2 reads."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dpt_fast.data import latents as L
from dpt_fast.data import prepare
from dpt_fast.data.dali import ImageDecoder
from dpt_fast.data.imagefolder import scan_imagefolder
from dpt_fast.data.latents import ImageShards, LatentDataset, prepare_shards, rank_shards
from dpt_fast.data.vae import SCALE, decode, encode_moments, load_vae, sample_latents
from dpt_fast.utils import UserError

TINY = dict(
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=16,
)
RES = 16  # 16 px images -> 8x8 latents (the tiny VAE downsamples by 2)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest (conftest.py)


@pytest.fixture
def quiet_cli(monkeypatch):
    """The CLI installs a log handler on the current stderr, which pytest swaps per test: keep it out."""
    monkeypatch.setattr(prepare, "setup_logging", lambda quiet=False: None)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae") / "tiny"
    AutoencoderKL(**TINY).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """3 classes x 3 images (different sizes, JPEG and PNG) + one bad file + one empty class folder."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for c, level in (("a", 40), ("b", 120), ("c", 200)):
        (root / c).mkdir()
        for i in range(3):
            x = np.clip(level + rng.normal(0, 25, (20 + 3 * i, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(x).save(root / c / (f"{c}{i}.jpg" if i != 1 else f"{c}{i}.png"))
    (root / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (root / "d").mkdir()
    return root


def _prepare(images, out, vae_dir=None, **kw):
    args = dict(vae_path=str(vae_dir) if vae_dir else None, resolution=RES, shard_size=4, batch_size=3, dtype="float32", device="cpu", progress=False)
    args.update(kw)
    return prepare_shards(images, out, **args)


def test_prepare_writes_aligned_latent_shards_and_manifest(images, vae_dir, tmp_path):
    m = _prepare(images, tmp_path / "lat", vae_dir)
    assert m["num_images"] == 9 and m["num_classes"] == 4 and m["classes"] == ["a", "b", "c", "d"]
    assert m["skipped"] == ["b/broken.jpg"] and m["empty_classes"] == ["d"]
    assert m["crop"] == "adm" and m["backend"] == "pil"  # ADM's center_crop_arr by default: PIL, whatever is installed
    assert m["shards"] == ["latents-00000.npy", "latents-00001.npy", "latents-00002.npy"]
    assert json.loads((tmp_path / "lat" / "manifest.json").read_text())["num_images"] == 9
    ds = LatentDataset(tmp_path / "lat")
    assert len(ds) == 9 and ds.latent_shape == (4, 8, 8) and ds.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert ds.files[4] == "b/b1.png"
    # moments i are the VAE's moments of file i and of its mirror image
    index = scan_imagefolder(images, progress=False)
    vae = load_vae(vae_dir)
    pos, imgs = next(iter(ImageDecoder(index.entries(), RES, batch_size=9, backend=m["backend"], crop="adm")))
    want = encode_moments(vae, imgs)  # [9, 2, 8, 8, 8]
    for flip in (0, 1):
        got = ds.moments(np.arange(9), np.full(9, flip))
        assert torch.allclose(got, want[:, flip], atol=1e-5)
    mirror = encode_moments(vae, imgs.flip(-1), flip=False)[:, 0]
    assert torch.allclose(ds.moments(np.arange(9), np.ones(9)), mirror, atol=1e-4)


def test_latent_sample_draws_scaled_posterior_samples_with_random_flip(images, vae_dir, tmp_path):
    _prepare(images, tmp_path / "lat", vae_dir)
    ds = LatentDataset(tmp_path / "lat")
    idx = np.array([8, 0, 3, 3, 5])
    z = ds.sample(idx, generator=torch.Generator().manual_seed(7))
    assert z.shape == (5, 4, 8, 8) and z.dtype == torch.float32
    # the same draws by hand: mirror bits, then eps, from the generator; z = (mean + std * eps) * 0.18215
    g = torch.Generator().manual_seed(7)
    flips = torch.randint(0, 2, (5,), generator=g).numpy()
    mean, logvar = ds.moments(idx, flips).chunk(2, dim=1)
    eps = torch.randn(mean.shape, generator=g)
    assert torch.allclose(z, (mean + torch.exp(0.5 * logvar) * eps) * SCALE, atol=1e-6)
    assert torch.equal(ds.sample(idx, generator=torch.Generator().manual_seed(7)), z)
    no_flip = ds.sample(idx, generator=torch.Generator().manual_seed(1), flip=False)
    assert torch.allclose(no_flip, sample_latents(ds.moments(idx), torch.Generator().manual_seed(1)), atol=1e-6)
    with pytest.raises(IndexError):
        ds.moments([9])


def test_prepare_resumes_after_interruption(images, vae_dir, tmp_path, monkeypatch):
    out = tmp_path / "lat"
    real_save = L._save_shard
    calls = []

    def killed_after_first(path, array):
        if path.name.startswith("latents"):
            if calls:
                raise KeyboardInterrupt  # the process dies while shard 1 is being written
            calls.append(path.name)
        real_save(path, array)

    monkeypatch.setattr(L, "_save_shard", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        _prepare(images, out, vae_dir)
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".npy" and p.name.startswith("latents")) == ["latents-00000.npy"]
    assert not (out / "manifest.json").exists() and not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    first = (out / "latents-00000.npy").stat().st_mtime_ns

    saved = []
    monkeypatch.setattr(L, "_save_shard", lambda p, a: (p.name.startswith("latents") and saved.append(p.name), real_save(p, a)))
    m = _prepare(images, out, vae_dir)
    assert saved == ["latents-00001.npy", "latents-00002.npy"]  # only the unfinished shards
    assert (out / "latents-00000.npy").stat().st_mtime_ns == first and m["num_images"] == 9
    fresh = _prepare(images, tmp_path / "fresh", vae_dir)
    for name in fresh["shards"]:
        assert np.array_equal(np.load(out / name), np.load(tmp_path / "fresh" / name))


def test_rank_split_covers_every_shard_once():
    for n, world in ((10, 3), (2, 4), (7, 1)):
        parts = [rank_shards(n, r, world) for r in range(world)]
        assert sorted(s for p in parts for s in p) == list(range(n))
    assert rank_shards(10, 1, 3) == [1, 4, 7]
    with pytest.raises(ValueError):
        rank_shards(4, 2, 2)


def test_two_ranks_split_the_shards_and_rank0_writes_the_manifest(images, vae_dir, tmp_path, monkeypatch):
    out = tmp_path / "lat"
    saved = []
    real_save = L._save_shard
    monkeypatch.setattr(L, "_save_shard", lambda p, a: (p.name.startswith("latents") and saved.append(p.name), real_save(p, a)))
    assert _prepare(images, out, vae_dir, rank=0, world_size=2) is None  # rank 1's shard still missing
    assert saved == ["latents-00000.npy", "latents-00002.npy"] and not (out / "manifest.json").exists()
    assert _prepare(images, out, vae_dir, rank=1, world_size=2) is None  # only rank 0 writes the manifest
    assert saved[2:] == ["latents-00001.npy"]
    m = _prepare(images, out, vae_dir, rank=0, world_size=2)
    assert m["num_images"] == 9 and len(saved) == 3
    single = _prepare(images, tmp_path / "one", vae_dir)
    for name in single["shards"]:
        assert np.array_equal(np.load(out / name), np.load(tmp_path / "one" / name))


def test_prepare_without_vae_stores_decoded_images(images, tmp_path):
    m = _prepare(images, tmp_path / "img")
    assert m["kind"] == "images" and m["latent_shape"] is None
    shards = ImageShards(tmp_path / "img")
    x = shards.images([0, 8, 4])
    assert x.shape == (3, 3, RES, RES) and x.dtype == np.uint8
    assert x[0].mean() < 80 and x[1].mean() > 160 and 90 < x[2].mean() < 150  # classes a, c, b by brightness
    with pytest.raises(UserError, match="not latents"):
        LatentDataset(tmp_path / "img")


def test_changed_settings_are_refused(images, tmp_path):
    _prepare(images, tmp_path / "img")
    with pytest.raises(UserError, match=r"other settings \(resolution\)"):
        _prepare(images, tmp_path / "img", resolution=8)
    assert _prepare(images, tmp_path / "img", resolution=8, fresh=True)["resolution"] == 8


def test_cli_on_bad_image_error_exits_2_naming_the_file(images, tmp_path, capsys, quiet_cli):
    rc = prepare.main(["--root", str(images), "--out", str(tmp_path / "o"), "--resolution", "16", "--on-bad-image", "error", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "b/broken.jpg" in err


def test_cli_missing_vae_exits_2_without_download(images, tmp_path, capsys, quiet_cli):
    rc = prepare.main(["--root", str(images), "--out", str(tmp_path / "o"), "--vae", str(tmp_path / "no_vae"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "no_vae: no such file or folder" in err


def test_latent_dataset_without_manifest_says_how_to_prepare(tmp_path):
    with pytest.raises(UserError, match="python -m dpt_fast.data.prepare"):
        LatentDataset(tmp_path)


def test_vae_single_file_checkpoint_and_decode(vae_dir, tmp_path):
    from safetensors.torch import save_file

    vae = load_vae(vae_dir)
    save_file(vae.state_dict(), tmp_path / "tiny.safetensors")
    again = load_vae(tmp_path / "tiny.safetensors", config=TINY)
    x = torch.randint(0, 256, (2, 3, RES, RES), dtype=torch.uint8)
    assert torch.equal(encode_moments(vae, x), encode_moments(again, x))
    z = sample_latents(encode_moments(vae, x)[:, 0], torch.Generator().manual_seed(0))
    out = decode(vae, z, batch_size=1)
    assert out.shape == (2, 3, RES, RES) and out.dtype == torch.uint8
    save_file({"foo.weight": torch.zeros(3)}, tmp_path / "other.safetensors")
    with pytest.raises(UserError, match="not a KL-f8 AutoencoderKL checkpoint"):
        load_vae(tmp_path / "other.safetensors", config=TINY)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_vae(tmp_path / "empty_dir")


def test_prepare_center_crop_and_folders_prepared_before_crops_had_names(images, tmp_path):
    """--crop center keeps the fast DALI/PIL crop; an index.json written before `crop` was a setting is reused as
    the "center" crop it was made with (images mode: no VAE needed)."""
    out = tmp_path / "img"
    m = _prepare(images, out, crop="center")
    assert m["crop"] == "center" and m["backend"] in ("dali_cpu", "pil")
    index = scan_imagefolder(images, progress=False)
    _, want = next(iter(ImageDecoder(index.entries(), RES, batch_size=9, backend="pil")))
    got = np.concatenate([np.load(out / s) for s in m["shards"]])
    assert np.abs(got.astype(int) - want.numpy().astype(int)).max() <= 1  # DALI vs PIL: rounding only
    saved = json.loads((out / "index.json").read_text())
    del saved["settings"]["crop"]
    (out / "index.json").write_text(json.dumps(saved))
    assert _prepare(images, out, crop="center")["num_images"] == 9
    with pytest.raises(UserError, match="other settings \\(crop\\)"):
        _prepare(images, out)  # the default crop is adm now: another preparation
