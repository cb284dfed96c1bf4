"""Batched image decoding: NVIDIA DALI on the GPU (`mixed`), DALI on the CPU, or PIL.

    from dpt_fast.data.dali import ImageDecoder
    dec = ImageDecoder(index.entries(), size=256, batch_size=128)      # index: imagefolder.scan_imagefolder
    for pos, images in dec:            # pos: int64 [n] positions in `entries`; images: uint8 [n, 3, 256, 256]
        labels = index.labels[pos]     # labels travel with positions, never with batch slots
    dec.failed                         # [(position, reason)] of files that failed at run time
    ImageDecoder(entries, 64, batch_size=32, positions=order)   # these positions, in this order (any iterable,
                                                                # endless too: stage 2 streams its training order)

Backend: `dali_gpu` when DALI is installed and CUDA is present (decode, resize, crop and flip on the GPU;
images come back as CUDA tensors), `dali_cpu` when DALI is installed without CUDA, `pil` when DALI is not
installed. `DPT_FAST_DECODER=dali_gpu|dali_cpu|pil` forces one. All three give the pixels documented in
`dpt_fast.data.imagefolder` for its "center" crop (DALI CPU vs PIL: at most 1 level apart, from rounding, see
tests); its "adm" crop is decoded with PIL whatever the backend, "eval" by all three.

Bad files. The index given here should come from `scan_imagefolder`, which already removed every file that
does not decode. Should DALI still fail at run time (a file changed on disk, a decoder limit), the pipeline
is discarded, the batches it had in flight are decoded with PIL one file at a time (so the error is mapped
to its file), and a fresh pipeline continues after them. A file PIL cannot decode either is skipped and
listed in `failed` (on_bad_image="skip") or raises a one-line UserError naming it ("error").
"""
from __future__ import annotations

import functools
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from ..utils import UserError, log
from .imagefolder import CROPS, BadImage, crop_box, decode_pil, eval_crop_box

DECODER_ENV = "DPT_FAST_DECODER"
BACKENDS = ("dali_gpu", "dali_cpu", "pil")


@functools.lru_cache(maxsize=None)
def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def select_backend(device: str | torch.device | None = None) -> str:
    """The decoding backend to use (see the module docstring); logs the choice.

    device: where the consumer wants the images; a CPU device keeps DALI on the CPU even with CUDA present.
    """
    forced = os.environ.get(DECODER_ENV, "").strip()
    if forced:
        if forced not in BACKENDS:
            raise UserError(f"{DECODER_ENV}={forced} is not one of {', '.join(BACKENDS)}")
        if forced.startswith("dali") and not dali_available():
            raise UserError(f"{DECODER_ENV}={forced} but NVIDIA DALI is not installed; pip install nvidia-dali-cuda130 or use pil")
        if forced == "dali_gpu" and not torch.cuda.is_available():
            raise UserError(f"{DECODER_ENV}=dali_gpu but CUDA is not available; use dali_cpu or pil")
        backend, why = forced, f"forced by {DECODER_ENV}"
    elif not dali_available():
        backend, why = "pil", "NVIDIA DALI is not installed"
    elif torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        backend, why = "dali_gpu", "DALI with CUDA"
    else:
        backend, why = "dali_cpu", "DALI without CUDA" if not torch.cuda.is_available() else "CPU output asked for"
    log.info("image decoder: %s (%s)", backend, why)
    return backend


def _default_threads() -> int:
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, (os.cpu_count() or 1) // max(local, 1))


def _read(path: str) -> np.ndarray | str:
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        return f"unreadable ({e.strerror or type(e).__name__})"
    return data if data.size else "empty file (0 bytes)"


class _Feeder:
    """DALI's external source: the next batch of (encoded bytes, crop box, position), read ahead in threads.

    Kept across pipeline rebuilds, so positions are taken from `todo` exactly once. `fed` holds the
    positions of the batches handed to DALI and not yet returned by it (DALI returns them in order).
    """

    def __init__(self, entries, box, batch_size, todo: Iterator[int], pool: ThreadPoolExecutor, on_fail):
        self.entries, self.box, self.batch_size = entries, box, batch_size
        self.todo, self.pool, self.on_fail = todo, pool, on_fail
        self.fed: deque[np.ndarray] = deque()
        self._ahead = None

    def _take(self):
        pos = [p for _, p in zip(range(self.batch_size), self.todo)]
        return pos, [self.pool.submit(_read, self.entries[p][0]) for p in pos]

    def __call__(self):
        while True:
            pos, reads = self._ahead or self._take()
            self._ahead = None
            data = [r.result() for r in reads]
            if not pos:
                raise StopIteration
            self._ahead = self._take()
            keep = []
            for p, d in zip(pos, data):
                if isinstance(d, str):
                    self.on_fail(p, d)
                else:
                    keep.append((p, d))
            if keep:
                break
        boxes = [self.box(self.entries[p][1], self.entries[p][2]) for p, _ in keep]
        positions = np.array([p for p, _ in keep], dtype=np.int64)
        self.fed.append(positions)
        return (
            [d for _, d in keep],
            [np.array([y0, x0], dtype=np.float32) for x0, y0, _, _ in boxes],  # DALI ROIs are (y, x)
            [np.array([y1, x1], dtype=np.float32) for _, _, x1, y1 in boxes],
            [np.array(p, dtype=np.int64) for p in positions],
        )


def _build_pipeline(feeder: _Feeder, size: int, gpu: bool, batch_size: int, threads: int, device_id, flip: bool, seed: int):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import Pipeline

    pipe = Pipeline(batch_size=batch_size, num_threads=threads, device_id=device_id if gpu else None, seed=seed, prefetch_queue_depth=2)
    with pipe:
        enc, roi0, roi1, pos = fn.external_source(
            source=feeder, num_outputs=4, batch=True, dtype=[types.UINT8, types.FLOAT, types.FLOAT, types.INT64]
        )
        decode_args = dict(output_type=types.RGB, adjust_orientation=False)
        if gpu:
            # the CPU decoder's (and PIL's) chroma upsampling, so the GPU path gives the same pixels
            decode_args["jpeg_fancy_upsampling"] = True
        img = fn.decoders.image(enc, device="mixed" if gpu else "cpu", **decode_args)
        img = fn.resize(
            img,
            size=[size, size],
            roi_start=roi0,
            roi_end=roi1,
            roi_relative=False,
            interp_type=types.INTERP_LINEAR,
            antialias=True,
            subpixel_scale=False,
        )
        mirror = fn.random.coin_flip(probability=0.5) if flip else 0
        img = fn.crop_mirror_normalize(img, dtype=types.UINT8, output_layout="CHW", mirror=mirror)
        pipe.set_outputs(img, pos)
    pipe.build()
    return pipe


class ImageDecoder:
    """Decode `entries` [(path, width, height), ...] to uint8 [n, 3, size, size] batches, in order.

    `positions` (default: every entry once) says which entries to decode in which order; it may repeat entries
    and be endless (batches then come as they are asked for, the files of the next ones read ahead).
    Yields (positions int64 [n], images uint8 tensor [n, 3, size, size]) with images on CUDA for the
    `dali_gpu` backend and on the CPU otherwise. crop: "center" | "adm" | "eval" (`imagefolder.CROPS`; "adm"
    always decodes with PIL, "eval" is Resize(`resize`) + CenterCrop(`size`)). random_flip: mirror each image
    with probability 1/2 (seeded by `seed`; on the GPU for dali_gpu). Files that fail are left out of the
    batches and listed in `failed` (or raise, with on_bad_image="error").
    """

    def __init__(
        self,
        entries: Sequence[tuple[str, int, int]],
        size: int,
        *,
        batch_size: int = 64,
        backend: str | None = None,
        device: str | torch.device | None = None,
        random_flip: bool = False,
        seed: int = 0,
        num_threads: int = 0,
        on_bad_image: str = "skip",
        progress: bool = False,
        desc: str = "decoding",
        positions: Iterable[int] | None = None,
        crop: str = "center",
        resize: int = 0,
    ):
        self.entries = list(entries)
        self.positions = positions
        self.size, self.batch_size = size, batch_size
        if crop not in CROPS or (crop == "eval") != (resize > 0) or 0 < resize < size:
            raise ValueError(f"crop={crop!r}, resize={resize}: crop is one of {CROPS}; resize >= size is eval's only")
        self.crop, self.resize = crop, resize
        self.backend = backend or select_backend(device)
        if self.backend not in BACKENDS:
            raise UserError(f"decoder backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if crop == "adm" and self.backend != "pil":
            log.info("image decoder: pil for the ADM crop (BOX halvings + BICUBIC have no DALI equivalent)")
            self.backend = "pil"
        self.device = torch.device(device) if device is not None else None
        if self.backend == "dali_gpu" and (self.device is None or self.device.type != "cuda"):
            self.device = torch.device("cuda")
        if self.device is not None and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())  # DALI needs a device id
        self.random_flip, self.seed = random_flip, seed
        self.threads = num_threads or _default_threads()
        self.on_bad_image = on_bad_image
        self.progress, self.desc = progress, desc
        self.failed: list[tuple[int, str]] = []
        self._bar = None

    # -- failures ---------------------------------------------------------------------------------
    def _fail(self, pos: int, reason: str) -> None:
        path = self.entries[pos][0]
        if self.on_bad_image == "error":
            raise UserError(f"{path}: {reason}; fix or remove the file, or use --on-bad-image skip (data.on_bad_image=skip)")
        log.warning("skipping %s: %s", path, reason)
        self.failed.append((pos, reason))
        if self._bar is not None:
            self._bar.update(1)

    # -- the PIL path (also the fallback for batches a DALI pipeline failed on) -------------------
    def _decode_pil_batch(self, positions, pool: ThreadPoolExecutor, rng: np.random.Generator):
        def one(p):
            try:
                return decode_pil(self.entries[p][0], self.size, self.crop, self.resize)
            except BadImage as e:
                return str(e)

        results = list(pool.map(one, positions))
        keep = [(p, r) for p, r in zip(positions, results) if not isinstance(r, str)]
        for p, r in zip(positions, results):
            if isinstance(r, str):
                self._fail(int(p), r)
        if not keep:
            return None
        images = np.stack([r for _, r in keep]).transpose(0, 3, 1, 2)  # NHWC -> NCHW
        if self.random_flip:
            flip = rng.random(len(keep)) < 0.5
            images[flip] = images[flip, :, :, ::-1]
        out = torch.from_numpy(np.ascontiguousarray(images))
        if self.device is not None and self.device.type == "cuda":
            out = out.pin_memory().to(self.device, non_blocking=True)  # a real asynchronous copy
        return np.array([p for p, _ in keep], dtype=np.int64), out

    def _todo(self) -> Iterator[int]:
        return iter(range(len(self.entries)) if self.positions is None else self.positions)

    def _iter_pil(self, pool) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        rng = np.random.default_rng(self.seed)
        todo = self._todo()
        while batch := list(islice(todo, self.batch_size)):
            got = self._decode_pil_batch(batch, pool, rng)
            if got is not None:
                yield got

    # -- the DALI path ----------------------------------------------------------------------------
    def _to_torch(self, images) -> torch.Tensor:
        if self.backend == "dali_cpu":
            return torch.from_numpy(images.as_array())
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = images.as_tensor()
        out = torch.empty(dense.shape(), dtype=torch.uint8, device=self.device)
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(self.device))
        return out

    def _iter_dali(self, pool) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        gpu = self.backend == "dali_gpu"
        if self.crop == "eval":
            box = functools.partial(eval_crop_box, resize=self.resize, size=self.size)
        else:
            box = functools.partial(crop_box, size=self.size)
        feeder = _Feeder(self.entries, box, self.batch_size, self._todo(), pool, self._fail)
        rng = np.random.default_rng(self.seed)
        builds = 0
        while True:
            device_id = self.device.index if gpu else None
            try:
                pipe = _build_pipeline(feeder, self.size, gpu, self.batch_size, self.threads, device_id, self.random_flip, self.seed + builds)
            except RuntimeError as e:
                first = " ".join(str(e).split())[:200]
                raise UserError(f"the DALI {self.backend} pipeline did not start ({first}); set {DECODER_ENV}=dali_cpu or pil") from None
            builds += 1
            while True:
                try:
                    images, pos = pipe.run()
                except StopIteration:
                    return
                except (RuntimeError, ValueError) as e:  # DALI's errors; the pipeline is unusable now
                    in_flight = list(feeder.fed)
                    feeder.fed.clear()
                    msg = " ".join(str(e).split())
                    log.warning("DALI failed on a batch (%s...); decoding its %d file(s) with PIL", msg[:160], sum(map(len, in_flight)))
                    del pipe
                    for positions in in_flight:
                        got = self._decode_pil_batch(positions, pool, rng)
                        if got is not None:
                            yield got
                    break  # rebuild and continue after the redone batches
                expected = feeder.fed.popleft()
                returned = np.asarray(pos.as_array()).reshape(-1)
                if not np.array_equal(returned, expected):  # a shifted label: never continue
                    raise AssertionError(f"DALI returned positions {returned[:4]}... for a batch fed as {expected[:4]}...")
                yield expected, self._to_torch(images)

    def __iter__(self) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        from tqdm import tqdm

        self.failed = []
        total = len(self.entries) if self.positions is None else None
        self._bar = tqdm(total=total, desc=self.desc, unit="img", disable=not self.progress, smoothing=0.05)
        with ThreadPoolExecutor(max_workers=self.threads) as pool:
            it = self._iter_pil(pool) if self.backend == "pil" else self._iter_dali(pool)
            try:
                for pos, images in it:
                    self._bar.update(len(pos))
                    yield pos, images
            finally:
                self._bar.close()
                self._bar = None
