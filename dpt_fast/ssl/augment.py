"""The FreeMatch / FixMatch views, batched on tensors: weak = flip + padded crop; strong = TorchSSL's RandAugment
(3 random ops with random magnitudes + Cutout) followed by the weak view.

    g = torch.Generator().manual_seed(0)
    xw = weak_view(x, g, flip=True, pad=4)          # x: float [B, C, H, W] in [0, 255]
    xs = strong_view(x, g, flip=True, pad=4)        # same range; normalise afterwards

TorchSSL (DPT's `cifar10_experiment/TorchSSL/datasets/augmentation/randaugment.py`) works on one PIL image at a
time; here every op is a tensor op over the images of the batch that drew it, each with its own magnitude, so a
batch of 448 CIFAR images takes milliseconds on one CPU core. The op list and magnitude ranges are TorchSSL's:

    AutoContrast; Brightness, Color, Contrast, Sharpness: enhance factor U(0.05, 0.95); Equalize; Identity;
    Posterize: U(4, 8) bits (truncated); Rotate: U(-30, 30) degrees; ShearX/Y: U(-0.3, 0.3);
    Solarize: threshold U(0, 256); TranslateX/Y: U(-0.3, 0.3) of the side

3 ops drawn with replacement (`random.choices`), then Cutout of a square of side U(0, 0.5) of the width at a
uniform centre, filled with grey (125, 123, 114) (a grey image: its luma, 123). Each op reproduces PIL's
arithmetic (nearest-neighbour affine maps with black fill, PIL's enhance blends, its autocontrast and equalize
look-up tables) up to rounding: `tests/test_ssl_augment.py` compares every op with PIL on random images.

torchvision's `transforms.v2.RandAugment` is not used: it applies one op with one magnitude to the whole batch
when given a batched tensor, uses a fixed magnitude bin instead of TorchSSL's uniform draws, a signed
enhance factor 1 +- m (TorchSSL's lies in [0.05, 0.95]) and no Cutout. Its per-image `equalize` is used.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

CUTOUT_FILL = (125.0, 123.0, 114.0)

# (name, low, high) as TorchSSL's augment_list().
OPS: tuple[tuple[str, float, float], ...] = (
    ("AutoContrast", 0, 1),
    ("Brightness", 0.05, 0.95),
    ("Color", 0.05, 0.95),
    ("Contrast", 0.05, 0.95),
    ("Equalize", 0, 1),
    ("Identity", 0, 1),
    ("Posterize", 4, 8),
    ("Rotate", -30, 30),
    ("Sharpness", 0.05, 0.95),
    ("ShearX", -0.3, 0.3),
    ("ShearY", -0.3, 0.3),
    ("Solarize", 0, 256),
    ("TranslateX", -0.3, 0.3),
    ("TranslateY", -0.3, 0.3),
)


# ----------------------------------------------------------------------------------------------
# Single ops on a batch, each image with its own magnitude v [B] (float [B, C, H, W] in [0, 255])
# ----------------------------------------------------------------------------------------------
def _grey(x: torch.Tensor) -> torch.Tensor:
    """PIL's convert('L'): ITU-R 601-2 luma in PIL's fixed point, (19595 R + 38470 G + 7471 B + 2^15) >> 16;
    [B, 1, H, W] (exact in float32: the sum stays below 2^24)."""
    if x.shape[1] == 1:
        return x
    w = x.new_tensor([19595.0, 38470.0, 7471.0]).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True).add(32768.0).div(65536.0).floor()


def _blend(degenerate: torch.Tensor, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance: degenerate + v * (x - degenerate), clipped to [0, 255] and truncated to integers."""
    return (degenerate + v.view(-1, 1, 1, 1) * (x - degenerate)).clamp(0, 255).floor()


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """PIL's ImageFilter.SMOOTH (3x3 kernel [[1,1,1],[1,5,1],[1,1,1]] / 13), the border pixels left as they are."""
    c = x.shape[1]
    k = x.new_tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]]).div(13).expand(c, 1, 3, 3)
    inner = F.conv2d(x, k, groups=c).round()
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = inner
    return out


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    """PIL's ImageOps.autocontrast (cutoff 0): each channel's [lo, hi] stretched to [0, 255], truncated."""
    xd = x.double()  # PIL builds its table in double precision: int(i * scale + offset)
    lo = xd.amin(dim=(2, 3), keepdim=True)
    hi = xd.amax(dim=(2, 3), keepdim=True)
    scale = 255.0 / (hi - lo).clamp(min=1)
    return torch.where(hi > lo, (xd * scale + -lo * scale).clamp(0, 255).floor(), xd).to(x.dtype)


def _posterize(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    bits = v.floor().clamp(min=1).view(-1, 1, 1, 1)
    step = torch.pow(2.0, 8 - bits)
    return (x / step).floor() * step


def _solarize(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= v.view(-1, 1, 1, 1), 255.0 - x, x)


def _equalize(x: torch.Tensor) -> torch.Tensor:
    return TF.equalize(x.to(torch.uint8)).float()  # per image and channel, PIL's algorithm


def _affine(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """PIL's Image.transform(AFFINE, nearest, black fill): output pixel (i, j) takes the input pixel at
    floor(m @ (j + 0.5, i + 0.5, 1)). m: float [B, 2, 3] in pixels (x = column, y = row)."""
    b, _, h, w = x.shape
    # grid_sample works in [-1, 1] coordinates (align_corners=False): u = 2 x / W - 1 for a pixel position x.
    to_norm = x.new_tensor([[2.0 / w, 0, -1], [0, 2.0 / h, -1], [0, 0, 1]])
    from_norm = x.new_tensor([[w / 2.0, 0, w / 2.0], [0, h / 2.0, h / 2.0], [0, 0, 1]])
    full = torch.cat([m, x.new_tensor([0, 0, 1]).expand(b, 1, 3)], dim=1)
    theta = (to_norm @ full @ from_norm)[:, :2]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Nearest rounds the sampling position x - 0.5 to the nearest integer (ties to even); PIL floors x. A
    # shift by a hair makes the ties (x an integer) round up, i.e. to floor(x), as PIL does.
    grid = grid + x.new_tensor([1e-4 / w, 1e-4 / h])
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _affine_matrix(name: str, v: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The PIL affine data (a, b, c, d, e, f) of a geometric op as [B, 2, 3] (input = m @ output)."""
    b = v.shape[0]
    m = torch.zeros(b, 2, 3, device=v.device)
    m[:, 0, 0] = m[:, 1, 1] = 1.0
    if name == "ShearX":
        m[:, 0, 1] = v
    elif name == "ShearY":
        m[:, 1, 0] = v
    elif name == "TranslateX":
        m[:, 0, 2] = v * w
    elif name == "TranslateY":
        m[:, 1, 2] = v * h
    elif name == "Rotate":  # Image.rotate(v): counter-clockwise about the centre (w / 2, h / 2)
        a = -v * (math.pi / 180)
        cos, sin = torch.cos(a), torch.sin(a)
        cx, cy = w / 2.0, h / 2.0
        m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = cos, sin, -sin, cos
        m[:, 0, 2] = cos * -cx + sin * -cy + cx
        m[:, 1, 2] = -sin * -cx + cos * -cy + cy
    return m


def apply_op(name: str, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One TorchSSL RandAugment op on every image of x (float [B, C, H, W] in 0..255), magnitudes v [B]."""
    if name == "Identity":
        return x
    if name == "AutoContrast":
        return _autocontrast(x)
    if name == "Equalize":
        return _equalize(x)
    if name == "Brightness":
        return _blend(torch.zeros_like(x), x, v)
    if name == "Color":
        return _blend(_grey(x).expand_as(x), x, v)
    if name == "Contrast":  # PIL: the mean of the grey image, rounded, as a constant image
        mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True).add(0.5).floor()
        return _blend(mean.expand_as(x), x, v)
    if name == "Sharpness":
        return _blend(_smooth(x), x, v)
    if name == "Posterize":
        return _posterize(x, v)
    if name == "Solarize":
        return _solarize(x, v)
    return _affine(x, _affine_matrix(name, v, x.shape[2], x.shape[3]).to(x))


def cutout(x: torch.Tensor, v: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """TorchSSL's Cutout(v): a square of side v * width, its centre uniform over the image, clipped to it.
    v: [B] in [0, 0.5]; v = 0 leaves the image as it is."""
    b, c, h, w = x.shape
    side = (v * w).view(b, 1, 1)
    x0 = (torch.rand(b, generator=gen) * w).view(b, 1, 1)
    y0 = (torch.rand(b, generator=gen) * h).view(b, 1, 1)
    x0 = (x0 - side / 2).clamp(min=0).floor()
    y0 = (y0 - side / 2).clamp(min=0).floor()
    # PIL's rectangle (x0, y0, x1, y1) fills the pixels from x0 to x1 inclusive, x1 = min(w, x0 + side).
    x1, y1 = (x0 + side).clamp(max=w), (y0 + side).clamp(max=h)
    cols = torch.arange(w).view(1, 1, w)
    rows = torch.arange(h).view(1, h, 1)
    hole = (cols >= x0) & (cols <= x1) & (rows >= y0) & (rows <= y1) & (side > 0)
    fill = x.new_tensor(CUTOUT_FILL).view(1, 3, 1, 1)
    if c == 1:
        fill = _grey(fill)
    return torch.where(hole.unsqueeze(1).to(x.device), fill, x)


def randaugment(x: torch.Tensor, gen: torch.Generator, num_ops: int = 3) -> torch.Tensor:
    """TorchSSL's RandAugment(num_ops) on a batch: per image, `num_ops` ops drawn with replacement, each with a
    uniform magnitude in its range, applied in order, then Cutout(U(0, 0.5)). float [B, C, H, W] in 0..255."""
    b = x.shape[0]
    choice = torch.randint(len(OPS), (num_ops, b), generator=gen)
    u = torch.rand(num_ops, b, generator=gen)
    lo = torch.tensor([o[1] for o in OPS], dtype=torch.float32)
    hi = torch.tensor([o[2] for o in OPS], dtype=torch.float32)
    mag = lo[choice] + (hi - lo)[choice] * u
    x = x.clone()
    for k in range(num_ops):
        for op, (name, _, _) in enumerate(OPS):
            sel = (choice[k] == op).nonzero().flatten()
            if len(sel):
                x[sel.to(x.device)] = apply_op(name, x[sel.to(x.device)], mag[k, sel].to(x.device))
    return cutout(x, torch.rand(b, generator=gen) * 0.5, gen)


# ----------------------------------------------------------------------------------------------
# The views
# ----------------------------------------------------------------------------------------------
def flip_crop(x: torch.Tensor, gen: torch.Generator, flip: bool, pad: int) -> torch.Tensor:
    """RandomHorizontalFlip (p = 0.5, when `flip`) then RandomCrop(side, padding=pad, reflect), per image."""
    b, _, h, w = x.shape
    if flip:
        f = (torch.rand(b, generator=gen) < 0.5).to(x.device).view(b, 1, 1, 1)
        x = torch.where(f, x.flip(3), x)
    if pad <= 0:
        return x
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(x.device)
    rows = (oy.view(b, 1) + torch.arange(h, device=x.device)).view(b, 1, h, 1).expand(b, xp.shape[1], h, xp.shape[3])
    xp = xp.gather(2, rows)
    cols = (ox.view(b, 1) + torch.arange(w, device=x.device)).view(b, 1, 1, w).expand(b, xp.shape[1], h, w)
    return xp.gather(3, cols)


def weak_view(x: torch.Tensor, gen: torch.Generator, flip: bool = True, pad: int = 4) -> torch.Tensor:
    return flip_crop(x, gen, flip, pad)


def strong_view(x: torch.Tensor, gen: torch.Generator, flip: bool = True, pad: int = 4, num_ops: int = 3) -> torch.Tensor:
    """TorchSSL's strong transform: RandAugment(num_ops) inserted before the weak view's flip and crop."""
    return flip_crop(randaugment(x, gen, num_ops), gen, flip, pad)
