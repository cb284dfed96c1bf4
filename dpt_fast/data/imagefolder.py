"""ImageFolder data sets: one folder per class (ImageNet layout), JPEG or PNG files.

    index = scan_imagefolder("imagenet/train", on_bad_image="skip")   # validated, labelled file list
    for pos, images in ImageDecoder(index.entries(), size=256):       # dpt_fast.data.dali
        ...                                                           # uint8 [n, 3, 256, 256]

Class index = position of the folder name in the sorted list of class folders (as torchvision's
ImageFolder). Labels travel with the files: every file is validated *before* any pipeline is built, and a
file that is not a decodable JPEG/PNG is removed from the index (listed in `index.skipped` with the reason)
or, with `on_bad_image="error"`, stops the scan with a one-line `UserError` naming it.

Pixels. Decoding gives 8-bit RGB ignoring EXIF orientation (grayscale replicated, CMYK converted, alpha
dropped, 16-bit samples rounded to 8 bits), then one of three crops (`CROPS`, the `crop` argument of
`decode_pil` and `ImageDecoder`):

- "center": resize so the *shorter* side is `size` (long side rounded half up) with an antialiased bilinear
  (triangle) filter that clamps at the image border, then crop the centre `size` x `size` at integer offsets
  ((W' - size) // 2, (H' - size) // 2). Resize and crop are fused: the crop is a box in source coordinates
  (`crop_box`), which both DALI's `fn.resize(roi_start, roi_end)` and PIL's `resize(box=...)` take, so DALI
  (GPU or CPU) and PIL give the same pixels. The fast path, and the in-memory ImageFolders' crop.
- "adm": ADM's / U-ViT's / DPT's `center_crop_arr` (`adm_center_crop`): halve with PIL BOX while the short
  side is at least 2 * size, resize the short side to `size` with PIL BICUBIC (long side Python-rounded),
  crop the centre (floor offsets). What the official latents and the ADM reference batches were made with;
  PIL only (no DALI filter reproduces the chain), so `ImageDecoder` decodes "adm" with PIL threads.
- "eval": torchvision's `Resize(resize)` + `CenterCrop(size)` on a PIL image (`eval_resize_crop`): the short
  side to `resize` (long side truncated), PIL BILINEAR, then the centre at round((W' - size) / 2) offsets --
  the MSN / DPT feature transform (Resize 256, CenterCrop 224). DALI samples the same box (`eval_crop_box`)
  with its linear filter (at most a grey level or so from PIL's).
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..utils import UserError, log
from .embedded import ArrayDataset

FORMATS = ("JPEG", "PNG")
CROPS = ("center", "adm", "eval")
# Modes PIL opens JPEG/PNG files in, all of which both decoders turn into the same 8-bit RGB.
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I")
_PARALLEL_MIN_FILES = 512  # below this, validating in-process is faster than starting workers


class BadImage(Exception):
    """A file that is not a decodable JPEG/PNG image; the message is the reason."""


# ----------------------------------------------------------------------------------------------
# Validation: a cheap but complete check that a file decodes.
# ----------------------------------------------------------------------------------------------
@contextmanager
def _reason():
    """Turn whatever opening/decoding a file raises into BadImage with a short reason."""
    try:
        yield
    except BadImage:
        raise
    except PermissionError:
        raise BadImage("unreadable (permission denied)") from None
    except UnidentifiedImageError:
        raise BadImage("not an image") from None
    except FileNotFoundError:
        raise BadImage("unreadable (missing or a broken link)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImage(f"cannot decode ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def _check_format(im: Image.Image) -> None:
    if im.format not in FORMATS:
        raise BadImage(f"{im.format} image; only JPEG and PNG are read")


def inspect_image(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of a decodable JPEG/PNG file; raise BadImage with the reason otherwise.

    JPEGs are decoded at 1/8 scale (libjpeg DCT scaling via PIL `draft`): that still entropy-decodes the
    whole stream, so truncated and corrupt files fail, at about half the cost of a full decode. PNGs are
    decoded fully (zlib stream and CRCs).
    """
    with _reason():
        if os.path.getsize(path) == 0:
            raise BadImage("empty file (0 bytes)")
        with open(path, "rb") as f, Image.open(f) as im:
            _check_format(im)
            size = im.size
            if im.format == "JPEG":
                im.draft(im.mode, (1, 1))
            im.load()
    if min(size) < 1:
        raise BadImage(f"degenerate size {size[0]}x{size[1]}")
    return size


def _inspect_many(paths: Sequence[str]) -> list[tuple[int, int] | str]:
    out: list[tuple[int, int] | str] = []
    for p in paths:
        try:
            out.append(inspect_image(p))
        except BadImage as e:
            out.append(str(e))
    return out


def _inspect_all(paths: list[str], workers: int, progress: bool) -> list[tuple[int, int] | str]:
    from tqdm import tqdm

    bar = tqdm(total=len(paths), desc="checking images", unit="img", disable=not progress, smoothing=0.05)
    if workers <= 1 or len(paths) < _PARALLEL_MIN_FILES:
        out = []
        for i in range(0, len(paths), 256):
            out.extend(_inspect_many(paths[i : i + 256]))
            bar.update(min(256, len(paths) - i))
        bar.close()
        return out
    import multiprocessing as mp

    import torch

    # fork is cheap, but not after CUDA was initialised in this process
    ctx = mp.get_context("spawn" if torch.cuda.is_initialized() else None)
    chunk = 256
    chunks = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
    out = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
        for res in ex.map(_inspect_many, chunks):
            out.extend(res)
            bar.update(len(res))
    bar.close()
    return out


# ----------------------------------------------------------------------------------------------
# The index
# ----------------------------------------------------------------------------------------------
@dataclass
class ImageIndex:
    """The validated files of an ImageFolder, in a fixed order (sorted class folders, sorted files).

    files: paths relative to `root` (POSIX); labels: int64 [N] class indices; sizes: int32 [N, 2] as
    (width, height); skipped: [{"file", "reason"}] for files left out; empty_classes: class folders with
    no valid image (kept in `classes`, so no label moves).
    """

    root: str
    classes: list[str]
    files: list[str]
    labels: np.ndarray
    sizes: np.ndarray
    skipped: list[dict] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files)

    def paths(self) -> list[str]:
        return [os.path.join(self.root, f) for f in self.files]

    def entries(self, indices: Iterable[int] | None = None) -> list[tuple[str, int, int]]:
        """(absolute path, width, height) per image, for `ImageDecoder`."""
        idx = range(len(self.files)) if indices is None else indices
        return [(os.path.join(self.root, self.files[i]), int(self.sizes[i, 0]), int(self.sizes[i, 1])) for i in idx]

    def subset(self, keep: Sequence[int] | np.ndarray) -> "ImageIndex":
        """The images at positions `keep`, in that order (same root and classes; nothing skipped)."""
        keep = np.asarray(keep, dtype=np.int64)
        return ImageIndex(self.root, self.classes, [self.files[i] for i in keep], self.labels[keep], self.sizes[keep],
                          empty_classes=self.empty_classes)

    def to_dict(self) -> dict:
        return {
            "root": self.root,
            "classes": self.classes,
            "files": self.files,
            "labels": self.labels.tolist(),
            "sizes": self.sizes.tolist(),
            "skipped": self.skipped,
            "empty_classes": self.empty_classes,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ImageIndex":
        return cls(
            root=d["root"],
            classes=list(d["classes"]),
            files=list(d["files"]),
            labels=np.asarray(d["labels"], dtype=np.int64),
            sizes=np.asarray(d["sizes"], dtype=np.int32).reshape(-1, 2),
            skipped=list(d.get("skipped", [])),
            empty_classes=list(d.get("empty_classes", [])),
        )


def _visible(name: str) -> bool:
    return not name.startswith(".")


def list_classes(root: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and _visible(e.name))


def _class_files(class_dir: Path) -> list[str]:
    """Every non-hidden entry below a class folder that is not a folder (links included), sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if _visible(d))
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _visible(f))
    return out


def scan_imagefolder(
    root: str | os.PathLike,
    on_bad_image: str = "skip",
    classes: Sequence[str] | None = None,
    workers: int = 0,
    progress: bool = True,
) -> ImageIndex:
    """Find and validate every image under `root/<class>/`.

    classes: the class list to use (e.g. the train folder's, when scanning a val folder); a folder not in
    it is a UserError. workers: validation processes (0 = all cores). on_bad_image: "skip" (leave bad files
    out, list them) or "error" (UserError naming the first bad file).
    """
    if on_bad_image not in ("skip", "error"):
        raise UserError(f"on_bad_image={on_bad_image!r}: use skip or error")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"{root}: no such directory; pass an ImageFolder root with one sub-folder per class")
    found = list_classes(root)
    if not found:
        raise UserError(f"{root}: no class folders; an ImageFolder root holds one sub-folder per class")
    if classes is None:
        classes = found
    else:
        classes = list(classes)
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise UserError(f"{root / unknown[0]}: class folder not among the {len(classes)} training classes")
    candidates: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        if (root / name).is_dir():
            candidates.extend((p, label) for p in _class_files(root / name))
    paths = [p for p, _ in candidates]
    results = _inspect_all(paths, workers or os.cpu_count() or 1, progress)

    files, labels, sizes, skipped = [], [], [], []
    for (path, label), res in zip(candidates, results):
        rel = Path(path).relative_to(root).as_posix()
        if isinstance(res, str):
            if on_bad_image == "error":
                raise UserError(f"{path}: {res}; fix or remove the file, or use --on-bad-image skip (data.on_bad_image=skip)")
            skipped.append({"file": rel, "reason": res})
            continue
        files.append(rel)
        labels.append(label)
        sizes.append(res)
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
    empty = [c for c, n in zip(classes, counts) if n == 0]
    if empty and on_bad_image == "error":
        raise UserError(f"{root / empty[0]}: class folder has no valid image; add images or remove the folder")
    if not files:
        raise UserError(f"{root}: no valid JPEG/PNG image in any class folder")
    index = ImageIndex(
        root=str(root.resolve()),
        classes=list(classes),
        files=files,
        labels=np.asarray(labels, dtype=np.int64),
        sizes=np.asarray(sizes, dtype=np.int32).reshape(-1, 2),
        skipped=skipped,
        empty_classes=empty,
    )
    log.info("%s: %d images in %d classes", root, len(files), len(classes))
    if skipped:
        shown = ", ".join(f"{s['file']} ({s['reason']})" for s in skipped[:5])
        log.warning("skipped %d bad file(s): %s%s", len(skipped), shown, " ..." if len(skipped) > 5 else "")
    if empty:
        log.warning("class folder(s) with no valid image (kept, so labels do not move): %s", ", ".join(empty))
    return index


# ----------------------------------------------------------------------------------------------
# Geometry and the PIL reference decoder
# ----------------------------------------------------------------------------------------------
def crop_box(width: int, height: int, size: int) -> tuple[float, float, float, float]:
    """Source box (x0, y0, x1, y1), in pixels, that becomes the `size` x `size` output.

    Resize the shorter side to `size` (the longer one to round-half-up of its scaled length), then crop the
    centre at integer offsets of the resized image: the box is that crop mapped back to source pixels.
    """
    scale = size / min(width, height)
    rw = max(size, int(math.floor(width * scale + 0.5)))
    rh = max(size, int(math.floor(height * scale + 0.5)))
    ox, oy = (rw - size) // 2, (rh - size) // 2
    sx, sy = width / rw, height / rh
    return ox * sx, oy * sy, (ox + size) * sx, (oy + size) * sy


def to_rgb(im: Image.Image) -> np.ndarray:
    """A PIL image -> uint8 [H, W, 3], as DALI's decoder does it (16-bit samples: round(v / 257))."""
    if im.mode in _SIXTEEN_BIT:
        # PIL's own I;16 -> RGB conversion clips at 255 instead of rescaling
        a = np.asarray(im).astype(np.float64)
        g = np.clip(np.floor(a / 257.0 + 0.5), 0, 255).astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    if im.mode != "RGB":
        im = im.convert("RGB")  # L, LA, P, PA, RGBA (alpha dropped, not composited), CMYK, 1
    return np.asarray(im)


def resize_crop(rgb: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3] per the module's pixel convention (PIL implementation)."""
    h, w = rgb.shape[:2]
    x0, y0, x1, y1 = crop_box(w, h, size)
    # PIL renormalises the filter at the image border; DALI clamps (repeats the edge pixel). Padding the
    # needed region with its edge pixels makes PIL clamp too: the triangle filter reaches `scale` pixels.
    pad = int(math.ceil(max((x1 - x0), (y1 - y0)) / size)) + 2
    xa, xb = int(math.floor(x0)) - pad, int(math.ceil(x1)) + pad
    ya, yb = int(math.floor(y0)) - pad, int(math.ceil(y1)) + pad
    region = rgb[max(ya, 0) : min(yb, h), max(xa, 0) : min(xb, w)]
    region = np.pad(
        region, ((max(-ya, 0), max(yb - h, 0)), (max(-xa, 0), max(xb - w, 0)), (0, 0)), mode="edge"
    )
    out = Image.fromarray(region).resize(
        (size, size), Image.BILINEAR, box=(x0 - xa, y0 - ya, x1 - xa, y1 - ya), reducing_gap=None
    )
    return np.array(out)  # writable


def adm_center_crop(im: Image.Image, size: int) -> np.ndarray:
    """ADM's `center_crop_arr` (guided-diffusion, used by U-ViT and DPT): RGB PIL image -> uint8 [size, size, 3].

    Halving with BOX first is what PIL's `reducing_gap` does in newer versions; ADM does it by hand.
    """
    while min(im.size) >= 2 * size:
        im = im.resize((im.size[0] // 2, im.size[1] // 2), resample=Image.BOX)
    scale = size / min(im.size)
    im = im.resize((round(im.size[0] * scale), round(im.size[1] * scale)), resample=Image.BICUBIC)
    a = np.asarray(im)
    top, left = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return np.array(a[top:top + size, left:left + size])  # writable


def eval_resized(width: int, height: int, resize: int) -> tuple[int, int]:
    """torchvision `Resize(resize)`'s output (width, height): the short side `resize`, the long one truncated."""
    if width <= height:
        return resize, int(resize * height / width)
    return int(resize * width / height), resize


def eval_offsets(width: int, height: int, resize: int, size: int) -> tuple[int, int]:
    """(left, top) of torchvision's `CenterCrop(size)` after `Resize(resize)` (Python's round, half to even)."""
    rw, rh = eval_resized(width, height, resize)
    return int(round((rw - size) / 2.0)), int(round((rh - size) / 2.0))


def eval_crop_box(width: int, height: int, resize: int, size: int) -> tuple[float, float, float, float]:
    """Source box (x0, y0, x1, y1) of `Resize(resize)` + `CenterCrop(size)`, for DALI's ROI resize."""
    rw, rh = eval_resized(width, height, resize)
    left, top = eval_offsets(width, height, resize, size)
    sx, sy = width / rw, height / rh
    return left * sx, top * sy, (left + size) * sx, (top + size) * sy


def eval_resize_crop(im: Image.Image, resize: int, size: int) -> np.ndarray:
    """torchvision `Resize(resize)` + `CenterCrop(size)` (bilinear, as on PIL images) -> uint8 [size, size, 3]."""
    if resize < size:
        raise ValueError(f"resize {resize} < crop {size}")
    rw, rh = eval_resized(*im.size, resize)
    left, top = eval_offsets(*im.size, resize, size)
    if (rw, rh) != im.size:  # torchvision returns the image itself when it already has that size
        im = im.resize((rw, rh), Image.BILINEAR)
    return np.array(np.asarray(im)[top:top + size, left:left + size])


def decode_pil(path: str | os.PathLike, size: int, crop: str = "center", resize: int = 0) -> np.ndarray:
    """Decode one file with PIL and crop it (`crop`: see CROPS; `resize` is "eval"'s) -> uint8 [size, size, 3].
    Raises BadImage."""
    with _reason():
        with open(path, "rb") as f, Image.open(f) as im:
            _check_format(im)
            im.load()
            rgb = to_rgb(im)
    if crop == "center":
        return resize_crop(rgb, size)
    if crop == "adm":
        return adm_center_crop(Image.fromarray(rgb), size)
    if crop == "eval":
        return eval_resize_crop(Image.fromarray(rgb), resize, size)
    raise ValueError(f"crop={crop!r} is not one of {CROPS}")


# ----------------------------------------------------------------------------------------------
# As an in-memory ArrayDataset (small folders; ImageNet-size sets go through prepare + latents)
# ----------------------------------------------------------------------------------------------
@dataclass
class ImageFolderDataset(ArrayDataset):
    """An ArrayDataset decoded from an ImageFolder, with the file names behind each row."""

    train_files: list[str] = field(default_factory=list)
    test_files: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)


TEST_FRACTION = 0.1  # held-out share per class when the folder has no val/ (or test/) split
MAX_IN_MEMORY_BYTES = 16 << 30


def _held_out(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Boolean mask: floor(fraction * n_c) images of each class, seeded (fixed, like the embedded sets)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        mask[rng.choice(idx, size=int(fraction * len(idx)), replace=False)] = True
    return mask


def decode_all(index: ImageIndex, size: int, progress: bool) -> np.ndarray:
    from .dali import ImageDecoder

    out = np.zeros((len(index), 3, size, size), dtype=np.uint8)
    dec = ImageDecoder(index.entries(), size, on_bad_image="error", progress=progress, desc="decoding")
    for pos, images in dec:
        out[pos] = images.cpu().numpy()
    return out


def split_imagefolder(data_cfg, progress: bool = True) -> tuple[ImageIndex, ImageIndex]:
    """`data.name=imagefolder`: the (training, held-out) indices of `data.root`, validated, nothing decoded.

    `data.test_root` set: `root` holds the training classes, `test_root` the held-out images. Otherwise
    `root/train` + `root/val` (or `root/test`) are used as the split when present (ImageNet layout); else
    `root` itself holds the classes and a fixed 10% per class is held out (seed 0).
    """
    if not data_cfg.root:
        raise UserError("data.name=imagefolder needs data.root=DIR (one sub-folder per class)")
    if data_cfg.image_size <= 0:
        raise UserError("data.name=imagefolder needs data.image_size (the crop size, e.g. data.image_size=64)")
    root = Path(data_cfg.root).expanduser()
    test_root = getattr(data_cfg, "test_root", "")
    val = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if test_root:
        if not Path(test_root).expanduser().is_dir():
            raise UserError(f"data.test_root={test_root}: no such directory; give an ImageFolder with the training class folders")
        train = scan_imagefolder(root, data_cfg.on_bad_image, progress=progress)
        return train, scan_imagefolder(Path(test_root).expanduser(), data_cfg.on_bad_image, classes=train.classes, progress=progress)
    if (root / "train").is_dir() and val is not None:
        train = scan_imagefolder(root / "train", data_cfg.on_bad_image, progress=progress)
        return train, scan_imagefolder(val, data_cfg.on_bad_image, classes=train.classes, progress=progress)
    full = scan_imagefolder(root, data_cfg.on_bad_image, progress=progress)
    held = _held_out(full.labels, TEST_FRACTION)
    return _subset(full, ~held, full.skipped), _subset(full, held, [])


def in_memory_bytes(indices: Sequence[ImageIndex], size: int) -> int:
    """Bytes the decoded uint8 images of `indices` take at `size` x `size`."""
    return sum(len(i) for i in indices) * 3 * size * size


def load_imagefolder(data_cfg, progress: bool = True,
                     split: tuple[ImageIndex, ImageIndex] | None = None) -> ImageFolderDataset:
    """`data.name=imagefolder`: decode `data.root` into memory at `data.image_size`; `split`: the result of
    `split_imagefolder` when the caller already has it."""
    size = data_cfg.image_size
    indices = split or split_imagefolder(data_cfg, progress)
    if len(indices[0].classes) < 2:
        raise UserError(f"{data_cfg.root}: one class folder ({indices[0].classes[0]}); classification needs at least "
                        "two, one sub-folder per class")
    if in_memory_bytes(indices, size) > MAX_IN_MEMORY_BYTES:
        root = Path(data_cfg.root).expanduser()
        raise UserError(
            f"{root}: {sum(len(i) for i in indices)} images at {size}px do not fit in memory; prepare it once with "
            f"`python -m dpt_fast.data.prepare --root {root} --out DIR` and train on the shards"
        )
    x_train, x_test = (
        decode_all(i, size, progress) if len(i) else np.zeros((0, 3, size, size), np.uint8) for i in indices
    )
    tr, te = indices
    return ImageFolderDataset(
        name="imagefolder",
        x_train=x_train,
        y_train=tr.labels,
        x_test=x_test,
        y_test=te.labels,
        classes=tr.classes,
        train_files=tr.files,
        test_files=te.files,
        skipped=tr.skipped + te.skipped,
    )


def _subset(index: ImageIndex, mask: np.ndarray, skipped: list[dict]) -> ImageIndex:
    keep = np.flatnonzero(mask)
    return ImageIndex(
        root=index.root,
        classes=index.classes,
        files=[index.files[i] for i in keep],
        labels=index.labels[keep],
        sizes=index.sizes[keep],
        skipped=skipped,
        empty_classes=index.empty_classes,
    )
