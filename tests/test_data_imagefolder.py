"""ImageFolder scanning, bad files, and the DALI / PIL decoders (DALI's CPU pipeline runs for real here)."""
import io
import os
import zlib
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from dpt_fast.config import DataConfig
from dpt_fast.data import imagefolder
from dpt_fast.data.dali import ImageDecoder, dali_available, select_backend
from dpt_fast.data.imagefolder import crop_box, decode_pil, scan_imagefolder
from dpt_fast.utils import UserError

needs_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

LEVEL = {"a": 30, "b": 90, "c": 150, "e": 210}  # each class's brightness: decoded pixels reveal the label


def _texture(h, w, level, seed, channels=3):
    """A smooth random image around `level` (JPEG-friendly, with detail for the resize to act on)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 1, (h // 6 + 2, w // 6 + 2, channels))
    up = np.stack([np.asarray(Image.fromarray(base[..., c].astype(np.float32), "F").resize((w, h), Image.BICUBIC)) for c in range(channels)], -1)
    return np.clip(level + 12 * up + rng.normal(0, 3, up.shape), 0, 255).astype(np.uint8)


def _png16(path, arr16):
    """A 16-bit-per-sample RGB PNG (Pillow cannot write one)."""
    h, w, _ = arr16.shape
    raw = b"".join(b"\x00" + arr16[y].astype(">u2").tobytes() for y in range(h))
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)  # noqa: E731
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _jpeg_bytes(arr, **kw):
    b = io.BytesIO()
    Image.fromarray(arr).save(b, "JPEG", quality=92, **kw)
    return b.getvalue()


def make_folder(root):
    """Every bad case docs/REAL_DATA.md lists plus every odd-but-valid format, spread over 5 class folders (one empty).

    Returns {relative file: expected state} with 'ok' or the start of the skip reason.
    """
    for c in ("a", "b", "c", "d_empty", "e", "e/sub"):
        (root / c).mkdir(parents=True, exist_ok=True)
    exp = {}
    a = _texture(40, 52, LEVEL["a"], 0)
    Image.fromarray(a).save(root / "a/a0_rgb.jpg", quality=92)
    Image.fromarray(_texture(33, 47, LEVEL["a"], 1, 1)[..., 0]).save(root / "a/a1_gray.png")
    Image.fromarray(np.dstack([_texture(41, 36, LEVEL["a"], 2), np.full((41, 36), 77, np.uint8)])).save(root / "a/a2_rgba.png")
    Image.fromarray(_texture(38, 44, LEVEL["a"], 3)).convert("CMYK").save(root / "a/a3_cmyk.jpg", quality=92)
    full = _jpeg_bytes(_texture(64, 80, LEVEL["a"], 4))
    (root / "a/a4_truncated.jpg").write_bytes(full[: len(full) // 2])
    (root / "a/a5_zero.jpg").write_bytes(b"")
    exp.update({"a/a0_rgb.jpg": "ok", "a/a1_gray.png": "ok", "a/a2_rgba.png": "ok", "a/a3_cmyk.jpg": "ok",
                "a/a4_truncated.jpg": "cannot decode", "a/a5_zero.jpg": "empty file"})
    Image.fromarray(_texture(50, 39, LEVEL["b"], 5)).save(root / "b/b0_rgb.jpg", quality=92)
    g16 = _texture(35, 45, LEVEL["b"], 6, 1)[..., 0].astype(np.uint16) * 257 + 100
    Image.fromarray(g16).save(root / "b/b1_gray16.png")
    Image.fromarray(_texture(37, 37, LEVEL["b"], 7)).convert("P").save(root / "b/b2_palette.png")
    _png16(root / "b/b3_rgb16.png", _texture(30, 42, LEVEL["b"], 8).astype(np.uint16) * 257)
    (root / "b/b4_text.jpg").write_text("this is not an image\n")
    (root / "b/b5_notes.txt").write_text("class notes\n")
    (root / "b/.DS_Store").write_bytes(b"\x00\x01hidden")  # hidden: ignored, not listed
    exp.update({"b/b0_rgb.jpg": "ok", "b/b1_gray16.png": "ok", "b/b2_palette.png": "ok", "b/b3_rgb16.png": "ok",
                "b/b4_text.jpg": "not an image", "b/b5_notes.txt": "not an image"})
    Image.fromarray(_texture(45, 60, LEVEL["c"], 9, 1)[..., 0]).save(root / "c/c0_gray.jpg", quality=92)
    Image.fromarray(_texture(31, 29, LEVEL["c"], 10, 1)[..., 0]).convert("LA").save(root / "c/c1_la.png")
    corrupt = bytearray(_jpeg_bytes(_texture(64, 64, LEVEL["c"], 11)))
    start = corrupt.index(b"\xff\xda") + 40  # scramble the entropy-coded data, keep the headers
    corrupt[start:-10] = np.random.default_rng(0).integers(0, 256, len(corrupt) - 10 - start, dtype=np.uint8).tobytes()
    (root / "c/c2_corrupt.jpg").write_bytes(bytes(corrupt))
    Image.fromarray(_texture(40, 40, LEVEL["c"], 12)).save(root / "c/c3_locked.jpg", quality=92)
    exp.update({"c/c0_gray.jpg": "ok", "c/c1_la.png": "ok", "c/c2_corrupt.jpg": "cannot decode", "c/c3_locked.jpg": "unreadable"})
    Image.fromarray(_texture(48, 70, LEVEL["e"], 13)).save(root / "e/e0.jpg", quality=92)
    Image.fromarray(_texture(70, 48, LEVEL["e"], 14)).save(root / "e/e1.png")
    Image.fromarray(_texture(36, 36, LEVEL["e"], 15)).save(root / "e/sub/e2.jpg", quality=92)
    exp.update({"e/e0.jpg": "ok", "e/e1.png": "ok", "e/sub/e2.jpg": "ok"})
    return exp


@pytest.fixture
def folder(tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    exp = make_folder(root)
    locked = root / "c/c3_locked.jpg"
    os.chmod(locked, 0)
    if os.access(locked, os.R_OK):  # root reads through chmod 000: make the open fail as it would for a user
        real_open = open

        def guarded_open(path, *a, **k):
            if os.fspath(path) == os.fspath(locked):
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return real_open(path, *a, **k)

        monkeypatch.setattr(imagefolder, "open", guarded_open, raising=False)
    yield root, exp
    os.chmod(locked, 0o644)


def test_scan_lists_every_bad_file_and_keeps_class_indices(folder):
    root, exp = folder
    index = scan_imagefolder(root, progress=False)
    assert index.classes == ["a", "b", "c", "d_empty", "e"]
    assert index.files == sorted(f for f, s in exp.items() if s == "ok")
    skipped = {s["file"]: s["reason"] for s in index.skipped}
    assert set(skipped) == {f for f, s in exp.items() if s != "ok"}
    for f, reason in skipped.items():
        assert reason.startswith(exp[f]), (f, reason)
    # labels travel with files; the empty folder keeps its index, so 'e' is 4, not 3
    assert [index.classes[y] for y in index.labels] == [f.split("/")[0] for f in index.files]
    assert index.empty_classes == ["d_empty"]
    assert [tuple(s) for s in index.sizes[:2]] == [(52, 40), (47, 33)]


def test_on_bad_image_error_is_one_line_naming_the_file(folder):
    root, _ = folder
    with pytest.raises(UserError) as e:
        scan_imagefolder(root, on_bad_image="error", progress=False)
    msg = str(e.value)
    assert "\n" not in msg and str(root / "a/a4_truncated.jpg") in msg and "--on-bad-image skip" in msg


def test_empty_class_folder_is_an_error_in_error_mode(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
    Image.fromarray(_texture(20, 20, 50, 0)).save(tmp_path / "a/x.png")
    with pytest.raises(UserError, match="b: class folder has no valid image"):
        scan_imagefolder(tmp_path, on_bad_image="error", progress=False)


def test_missing_or_classless_root_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        scan_imagefolder(tmp_path / "nope", progress=False)
    with pytest.raises(UserError, match="no class folders"):
        scan_imagefolder(tmp_path, progress=False)


@needs_dali
@pytest.mark.parametrize("backend", ["dali_cpu", "pil"])
def test_decoded_labels_match_pixels_with_odd_formats(folder, backend):
    root, _ = folder
    index = scan_imagefolder(root, progress=False)
    dec = ImageDecoder(index.entries(), 24, batch_size=3, backend=backend)
    seen = []
    for pos, images in dec:
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 24, 24)
        for p, im in zip(pos, images):
            level = im.float().mean().item()
            cls = min(LEVEL, key=lambda c: abs(LEVEL[c] - level))
            assert index.classes[index.labels[p]] == cls, (index.files[p], level)
            seen.append(int(p))
    assert sorted(seen) == list(range(len(index))) and dec.failed == []


@needs_dali
def test_sixteen_bit_png_is_rescaled_not_clipped(tmp_path):
    (tmp_path / "k").mkdir()
    g16 = np.full((20, 30), 40000, np.uint16)
    Image.fromarray(g16).save(tmp_path / "k/g.png")
    _png16(tmp_path / "k/rgb.png", np.full((20, 30, 3), 40000, np.uint16))
    index = scan_imagefolder(tmp_path, progress=False)
    want = round(40000 / 257)  # 156; PIL's own I;16 -> RGB conversion would give 255
    for backend in ("dali_cpu", "pil"):
        for _, images in ImageDecoder(index.entries(), 16, backend=backend):
            assert (images.int() - want).abs().max() <= 1, backend


def _parity_set(root):
    """JPEGs in the layouts real data sets use (4:2:0, 4:4:4, progressive, grayscale, CMYK) and PNGs (RGB,
    RGBA, palette, gray+alpha), at sizes that exercise down- and up-scaling, odd sizes, both orientations."""
    (root / "p").mkdir(parents=True)
    sizes = [(375, 500), (500, 333), (64, 80), (37, 45), (100, 33), (48, 48), (257, 256), (20, 28)]
    for i, (h, w) in enumerate(sizes):
        x = _texture(h, w, 128, 100 + i)
        Image.fromarray(x).save(root / f"p/{i}_420.jpg", quality=90)
        Image.fromarray(x).save(root / f"p/{i}_444.jpg", quality=90, subsampling=0)
        Image.fromarray(x).save(root / f"p/{i}_png.png")
    Image.fromarray(_texture(300, 400, 100, 1)).save(root / "p/prog.jpg", quality=85, progressive=True)
    Image.fromarray(_texture(120, 90, 100, 2)[..., 0]).save(root / "p/gray.jpg", quality=85)
    Image.fromarray(_texture(90, 120, 100, 3)).convert("CMYK").save(root / "p/cmyk.jpg", quality=85)
    Image.fromarray(np.dstack([_texture(70, 50, 100, 4), _texture(70, 50, 100, 5, 1)])).save(root / "p/rgba.png")
    Image.fromarray(_texture(50, 70, 100, 6)).convert("P").save(root / "p/palette.png")
    Image.fromarray(_texture(60, 60, 100, 7, 1)[..., 0]).convert("LA").save(root / "p/la.png")


def _decode_all(index, size, backend):
    out = {}
    for pos, images in ImageDecoder(index.entries(), size, batch_size=8, backend=backend):
        for p, im in zip(pos, images.cpu()):
            out[int(p)] = im.numpy().astype(np.int16)
    return out


@needs_dali
@pytest.mark.parametrize("size", [32, 64])
def test_dali_cpu_matches_pil_within_rounding(tmp_path, size):
    """Measured: identical JPEG decode (both libjpeg-turbo, same chroma upsampling), then the resize differs
    only by rounding (PIL uses fixed-point weights, DALI float): max 1 level, mean < 0.25."""
    _parity_set(tmp_path)
    index = scan_imagefolder(tmp_path, progress=False)
    dali, pil = _decode_all(index, size, "dali_cpu"), _decode_all(index, size, "pil")
    assert sorted(dali) == sorted(pil) == list(range(len(index)))
    worst = max(np.abs(dali[i] - pil[i]).max() for i in dali)
    mean = np.mean([np.abs(dali[i] - pil[i]).mean() for i in dali])
    assert worst <= 1 and mean < 0.25, (worst, mean)


def test_crop_box_is_shorter_side_resize_then_center_crop():
    # 500x375 -> resize to 341x256 (341.33 rounded), crop x offset (341 - 256) // 2 = 42
    x0, y0, x1, y1 = crop_box(500, 375, 256)
    assert (y0, y1) == (0, 375)
    s = 500 / 341
    assert x0 == pytest.approx(42 * s) and x1 == pytest.approx(298 * s)
    assert crop_box(256, 256, 256) == (0, 0, 256, 256)
    # upscaling a small image works the same way
    assert crop_box(10, 20, 32)[2] == pytest.approx(10)


def test_pil_decoder_center_crops_the_right_region(tmp_path):
    # left half black, right half white, wide image: the centre crop straddles the edge half/half
    x = np.zeros((40, 120, 3), np.uint8)
    x[:, 60:] = 255
    Image.fromarray(x).save(tmp_path / "w.png")
    out = decode_pil(tmp_path / "w.png", 40)
    assert out.shape == (40, 40, 3)
    assert out[:, :19].max() == 0 and out[:, 21:].min() == 255


@needs_dali
@pytest.mark.parametrize("mode", ["skip", "error"])
def test_dali_runtime_failure_is_mapped_to_its_file(folder, mode):
    """A file that breaks after the scan makes DALI fail mid-run: the in-flight batches are redone with PIL,
    the broken file is named, and every other image keeps its label."""
    root, _ = folder
    index = scan_imagefolder(root, progress=False)
    broken = index.files.index("b/b0_rgb.jpg")
    (root / "b/b0_rgb.jpg").write_bytes(b"garbage that is no longer a JPEG")
    dec = ImageDecoder(index.entries(), 16, batch_size=2, backend="dali_cpu", on_bad_image=mode)
    if mode == "error":
        with pytest.raises(UserError, match="b0_rgb.jpg: not an image"):
            list(dec)
        return
    seen = []
    for pos, images in dec:
        for p, im in zip(pos, images):
            cls = min(LEVEL, key=lambda c: abs(LEVEL[c] - im.float().mean().item()))
            assert index.classes[index.labels[p]] == cls
            seen.append(int(p))
    assert [p for p, _ in dec.failed] == [broken]
    assert sorted(seen) == [i for i in range(len(index)) if i != broken]


@needs_dali
def test_file_vanishing_before_read_is_skipped_and_listed(folder):
    root, _ = folder
    index = scan_imagefolder(root, progress=False)
    (root / "e/e0.jpg").unlink()
    dec = ImageDecoder(index.entries(), 16, batch_size=4, backend="dali_cpu")
    n = sum(len(p) for p, _ in dec)
    assert n == len(index) - 1 and dec.failed[0][0] == index.files.index("e/e0.jpg")


@pytest.mark.parametrize("backend", ["dali_cpu", "pil"])
def test_random_flip_mirrors_some_images_and_keeps_the_rest(tmp_path, backend):
    if backend.startswith("dali") and not dali_available():
        pytest.skip("DALI not installed")
    (tmp_path / "k").mkdir()
    x = _texture(32, 32, 128, 0)
    x[:, :8] = 0  # asymmetric
    Image.fromarray(x).save(tmp_path / "k/a.png")
    index = scan_imagefolder(tmp_path, progress=False)
    plain = torch.from_numpy(decode_pil(tmp_path / "k/a.png", 32)).permute(2, 0, 1)
    entries = index.entries() * 24
    flipped = 0
    for _, images in ImageDecoder(entries, 32, batch_size=8, backend=backend, random_flip=True, seed=3):
        for im in images:
            same = (im.int() - plain.int()).abs().max() <= 1
            mirrored = (im.int() - plain.flip(-1).int()).abs().max() <= 1
            assert same or mirrored
            flipped += bool(mirrored)
    assert 3 <= flipped <= 21


def test_decoder_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv("DPT_FAST_DECODER", "pil")
    assert select_backend() == "pil"
    monkeypatch.setenv("DPT_FAST_DECODER", "nvjpeg")
    with pytest.raises(UserError, match="not one of dali_gpu, dali_cpu, pil"):
        select_backend()
    if not torch.cuda.is_available():
        monkeypatch.setenv("DPT_FAST_DECODER", "dali_gpu")
        with pytest.raises(UserError, match="CUDA is not available"):
            select_backend()
    monkeypatch.delenv("DPT_FAST_DECODER")
    expected = "pil" if not dali_available() else ("dali_gpu" if torch.cuda.is_available() else "dali_cpu")
    assert select_backend() == expected


def test_load_dataset_imagefolder_with_train_val(tmp_path):
    from dpt_fast.data import load_dataset

    for split, n in (("train", 4), ("val", 2)):
        for c, lvl in (("cat", 40), ("dog", 200)):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(_texture(30 + i, 40, lvl, i)).save(tmp_path / split / c / f"{i}.jpg", quality=90)
    ds = load_dataset(DataConfig(name="imagefolder", root=str(tmp_path), image_size=16))
    assert ds.x_train.shape == (8, 3, 16, 16) and ds.x_test.shape == (4, 3, 16, 16)
    assert ds.classes == ["cat", "dog"] and ds.y_train.tolist() == [0] * 4 + [1] * 4
    assert ds.train_files[4] == "dog/0.jpg"
    assert (ds.x_train[ds.y_train == 1].mean() > 150) and (ds.x_test[ds.y_test == 0].mean() < 90)
    with pytest.raises(UserError, match="data.image_size"):
        load_dataset(DataConfig(name="imagefolder", root=str(tmp_path)))


def test_load_dataset_imagefolder_holds_out_a_tenth_per_class(tmp_path):
    from dpt_fast.data import load_dataset

    for c in ("x", "y"):
        (tmp_path / c).mkdir()
        for i in range(10):
            Image.fromarray(_texture(20, 20, 100, i)).save(tmp_path / c / f"{i}.png")
    ds = load_dataset(DataConfig(name="imagefolder", root=str(tmp_path), image_size=8))
    assert len(ds.x_train) == 18 and np.bincount(ds.y_test).tolist() == [1, 1]
    assert not set(ds.train_files) & set(ds.test_files)


@pytest.mark.gpu
@needs_cuda
@needs_dali
def test_dali_gpu_matches_pil_within_decoder_tolerance(tmp_path):
    """nvJPEG (with libjpeg's fancy chroma upsampling switched on) vs libjpeg-turbo: IDCT rounding differs,
    so allow a mean of 1 level and at most 1% of values more than 4 apart (not measured on this machine)."""
    _parity_set(tmp_path)
    index = scan_imagefolder(tmp_path, progress=False)
    gpu, pil = _decode_all(index, 64, "dali_gpu"), _decode_all(index, 64, "pil")
    assert sorted(gpu) == sorted(pil)
    d = np.concatenate([np.abs(gpu[i] - pil[i]).ravel() for i in gpu])
    assert d.mean() <= 1.0 and (d > 4).mean() <= 0.01, (d.mean(), (d > 4).mean())


class _Stop(Exception):
    pass


@needs_dali
def test_a_streamed_folder_trains_exactly_like_the_in_memory_one_and_resumes_exactly(tmp_path):
    """data.stream: stage 2's images decoded by DALI (CPU pipeline here) in the trainer's order, step by step."""
    from dpt_fast.config import load_config
    from dpt_fast.data import to_float
    from dpt_fast.data.imagefolder import load_imagefolder, split_imagefolder
    from dpt_fast.data.stream import TrainingStream
    from dpt_fast.diffusion import make_schedule
    from dpt_fast.diffusion.train import train_diffusion
    from dpt_fast.models import build_uvit

    root = tmp_path / "imgs"
    for c, level in (("a", 40), ("b", 120), ("c", 200)):
        (root / c).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(_texture(12 + i % 3, 10 + 2 * (i % 2), level, i)).save(root / c / f"{i}.{'png' if i % 4 else 'jpg'}")
    cfg = load_config("digits", ["data.name=imagefolder", f"data.root={root}", "data.image_size=8", "model.in_chans=3",
                                 "model.embed_dim=32", "model.depth=2", "train.steps=7", "train.batch_size=8",
                                 "train.ckpt_every=2", "train.log_every=2", "train.warmup_steps=1"])
    train, test = split_imagefolder(cfg.data, progress=False)
    assert len(train) == 27  # 3 per epoch-boundary batch: steps 3 and 6 mix two epochs
    y = torch.from_numpy(train.labels)

    def run(x, name, on_step=None):
        torch.manual_seed(0)
        return train_diffusion(build_uvit(cfg.model, 4), x, y, make_schedule(cfg.diffusion), cfg.train, num_classes=3,
                               seed=0, ckpt_dir=tmp_path / name, fingerprint="fp", device=torch.device("cpu"),
                               log_dir=tmp_path / name, progress=False, on_step=on_step)

    in_memory = run(to_float(load_imagefolder(cfg.data, False, (train, test)).x_train), "memory")

    def stop_at_5(step):
        if step == 5:
            raise _Stop

    with pytest.raises(_Stop):
        run(TrainingStream(train, 8), "stream", on_step=stop_at_5)
    streamed = run(TrainingStream(train, 8), "stream")
    assert streamed.start_step == 4
    for a, b in zip(streamed.ema.state_dict().values(), in_memory.ema.state_dict().values()):
        assert torch.equal(a, b)
    assert streamed.history == in_memory.history
    # Stage 2 streams with data.stream=true (and keeps the folder in memory without it, as it is small).
    from dpt_fast.stages.stage2 import _load_data

    data = _load_data(load_config("digits", [f"data.root={root}", "data.name=imagefolder", "data.image_size=8",
                                             "data.stream=true"]), torch.device("cpu"), progress=False)
    assert isinstance(data.x, TrainingStream) and len(data.x) == 27 and data.shape == (3, 8, 8)
    assert data.real_images().shape == (3, 3, 8, 8)  # the held-out tenth, decoded for FID
    data = _load_data(cfg, torch.device("cpu"), progress=False)
    assert isinstance(data.x, torch.Tensor) and torch.equal(data.x, to_float(load_imagefolder(cfg.data, False).x_train))


def _official_center_crop_arr(pil_image, image_size):
    """guided-diffusion (ADM) / U-ViT / DPT datasets.py `center_crop_arr`, copied as the reference."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def _official(path, fn):
    with Image.open(path) as im:
        im.load()
        return fn(im.convert("RGB")).transpose(2, 0, 1).astype(np.int16)


@pytest.mark.parametrize("size", [16, 64])
def test_adm_crop_is_the_official_center_crop_arr_whatever_the_backend(tmp_path, size):
    """Sizes from 20x28 (upscaled) to 500x375 (halved twice at 64 px), JPEG and PNG modes: identical pixels."""
    _parity_set(tmp_path)
    index = scan_imagefolder(tmp_path, progress=False)
    for backend in ("pil", "dali_cpu") if dali_available() else ("pil",):
        got = {}
        for pos, images in ImageDecoder(index.entries(), size, batch_size=8, backend=backend, crop="adm"):
            got.update({int(p): im.numpy().astype(np.int16) for p, im in zip(pos, images)})
        for i, (path, _, _) in enumerate(index.entries()):
            assert np.array_equal(got[i], _official(path, lambda im: _official_center_crop_arr(im, size))), path


@pytest.mark.parametrize("resize,size", [(36, 32), (73, 64)])
def test_eval_crop_is_torchvision_resize_then_center_crop(tmp_path, resize, size):
    """MSN / DPT's feature transform (Resize(256) + CenterCrop(224) at full size): PIL path identical to
    torchvision's own transforms; DALI samples the same box with its linear filter."""
    import torchvision.transforms as T

    _parity_set(tmp_path)
    index = scan_imagefolder(tmp_path, progress=False)
    official = T.Compose([T.Resize(resize), T.CenterCrop(size), np.asarray])
    backends = ("pil", "dali_cpu") if dali_available() else ("pil",)
    for backend in backends:
        got = {}
        for pos, images in ImageDecoder(index.entries(), size, batch_size=8, backend=backend, crop="eval",
                                        resize=resize):
            got.update({int(p): im.numpy().astype(np.int16) for p, im in zip(pos, images)})
        diff = [np.abs(got[i] - _official(path, official)) for i, (path, _, _) in enumerate(index.entries())]
        if backend == "pil":
            assert max(d.max() for d in diff) == 0
        else:
            assert max(d.max() for d in diff) <= 1 and np.mean([d.mean() for d in diff]) < 0.25
