"""The batched RandAugment against TorchSSL's PIL ops (a faithful copy of DPT's
`cifar10_experiment/TorchSSL/datasets/augmentation/randaugment.py` below), and the weak view."""
import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageEnhance
import PIL.ImageOps
import pytest
import torch

from dpt_fast.ssl.augment import OPS, apply_op, cutout, flip_crop, randaugment


# ---- TorchSSL's ops, as in the official file (one PIL image, one magnitude) ----
def _official(name, img, v):
    if name == "AutoContrast":
        return PIL.ImageOps.autocontrast(img)
    if name == "Brightness":
        return PIL.ImageEnhance.Brightness(img).enhance(v)
    if name == "Color":
        return PIL.ImageEnhance.Color(img).enhance(v)
    if name == "Contrast":
        return PIL.ImageEnhance.Contrast(img).enhance(v)
    if name == "Equalize":
        return PIL.ImageOps.equalize(img)
    if name == "Identity":
        return img
    if name == "Posterize":
        return PIL.ImageOps.posterize(img, max(1, int(v)))
    if name == "Rotate":
        return img.rotate(v)
    if name == "Sharpness":
        return PIL.ImageEnhance.Sharpness(img).enhance(v)
    if name == "ShearX":
        return img.transform(img.size, PIL.Image.AFFINE, (1, v, 0, 0, 1, 0))
    if name == "ShearY":
        return img.transform(img.size, PIL.Image.AFFINE, (1, 0, 0, v, 1, 0))
    if name == "Solarize":
        return PIL.ImageOps.solarize(img, v)
    if name == "TranslateX":
        return img.transform(img.size, PIL.Image.AFFINE, (1, 0, v * img.size[0], 0, 1, 0))
    if name == "TranslateY":
        return img.transform(img.size, PIL.Image.AFFINE, (1, 0, 0, 0, 1, v * img.size[1]))
    raise KeyError(name)


def _official_cutout_abs(img, v, x0, y0):
    """TorchSSL's CutoutAbs with the two uniform draws given (x0, y0 in pixels)."""
    w, h = img.size
    x0 = int(max(0, x0 - v / 2.0))
    y0 = int(max(0, y0 - v / 2.0))
    x1, y1 = min(w, x0 + v), min(h, y0 + v)
    img = img.copy()
    PIL.ImageDraw.Draw(img).rectangle((x0, y0, x1, y1), (125, 123, 114))
    return img


def _images(n=6, size=32, seed=0):
    """Smooth random RGB images with a full range of values (uint8 [n, 3, size, size])."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 3, size // 4, size // 4)).astype(np.float32)
    x = torch.nn.functional.interpolate(torch.from_numpy(base), size=(size, size), mode="bilinear", align_corners=False)
    x = x + torch.from_numpy(rng.normal(0, 20, x.shape).astype(np.float32))
    return x.clamp(0, 255).round().to(torch.uint8)


def _to_pil(x):
    return PIL.Image.fromarray(x.permute(1, 2, 0).numpy())


def _from_pil(img):
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float()


# magnitudes per op: TorchSSL's range ends and a middle value
_MAGS = {name: [lo, (lo + hi) / 2 + 0.123, hi] for name, lo, hi in OPS}
_MAGS["Solarize"] = [0.0, 128.0, 200.5]  # 256 would solarise nothing, as would PIL


@pytest.mark.parametrize("name", [o[0] for o in OPS])
def test_each_randaugment_op_matches_torchssl_pil_op(name):
    x = _images()
    for v in _MAGS[name]:
        ours = apply_op(name, x.float(), torch.full((len(x),), float(v)))
        ref = torch.stack([_from_pil(_official(name, _to_pil(im), v)) for im in x])
        diff = (ours - ref).abs()
        if name in ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"):
            # nearest-neighbour maps: the same source pixel except where float rounding falls on a pixel edge
            assert (diff == 0).float().mean() > 0.999, (name, v)
        else:
            # enhance blends and look-up tables: PIL's integer arithmetic, at most one level off anywhere
            assert diff.max() <= 1.0, (name, v, diff.max())
            assert (diff == 0).float().mean() > 0.999, (name, v)


def test_each_image_gets_its_own_magnitude():
    x = _images(n=3)
    v = torch.tensor([-30.0, 0.0, 30.0])
    out = apply_op("Rotate", x.float(), v)
    for i in range(3):
        ref = _from_pil(_official("Rotate", _to_pil(x[i]), float(v[i])))
        assert (out[i] == ref).float().mean() > 0.999


def test_cutout_matches_torchssl_cutout_abs():
    x = _images(n=4)
    gen = torch.Generator().manual_seed(3)
    v = torch.tensor([0.0, 0.1, 0.3, 0.5])
    ours = cutout(x.float(), v, gen)
    replay = torch.Generator().manual_seed(3)
    x0s, y0s = torch.rand(4, generator=replay) * 32, torch.rand(4, generator=replay) * 32
    for i in range(4):
        ref = _to_pil(x[i]) if v[i] == 0 else _official_cutout_abs(_to_pil(x[i]), float(v[i]) * 32, float(x0s[i]), float(y0s[i]))
        assert torch.equal(ours[i], _from_pil(ref))


def test_randaugment_keeps_range_and_shape_and_is_reproducible_from_the_generator():
    x = _images(n=16).float()
    a = randaugment(x, torch.Generator().manual_seed(0))
    b = randaugment(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 255 and torch.equal(a, a.round())
    assert not torch.equal(a, x)
    grey = randaugment(x[:, :1], torch.Generator().manual_seed(0))  # one channel works too
    assert grey.shape == x[:, :1].shape


def test_flip_crop_is_a_shifted_window_of_the_reflect_padded_image():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    out = flip_crop(x, torch.Generator().manual_seed(1), flip=False, pad=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for i in range(2):
        windows = [padded[i, :, r:r + 6, c:c + 6] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)
    assert torch.equal(flip_crop(x, torch.Generator(), flip=False, pad=0), x)
    flipped = flip_crop(x, torch.Generator().manual_seed(0), flip=True, pad=0)
    assert all(torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(2)) for i in range(2))

