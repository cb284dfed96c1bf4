"""Images streamed in batches, never a whole data set in memory, and a resumable on-disk cache of their features.

    real = open_real_data(cfg.data, device)        # the training and test images of any data.name
    real.train, real.test                          # image sources (below)
    real.y_train, real.y_test, real.classes        # int64 labels, aligned with the sources' positions
    for pos, images in real.test.batches(range(len(real.test)), 128):
        ...                                        # pos int64 [n]; images uint8 tensor [n, C, H, W]
    feats = cached_features(embed, real.train, out / "train_features.npy", key={...}, dim=768, batch_size=128)
                                                   # float32 [N, 768], memory-mapped, resumable by chunks

Sources: `ArraySource` (uint8 arrays already in memory: the embedded sets, CIFAR-10, small ImageFolders),
`FolderSource` (the files of an `ImageIndex`, decoded by `dpt_fast.data.dali.ImageDecoder`, on the GPU with
DALI), `ShardSource` (.npz shards holding `images` and `labels`, e.g. stage 2's generated images, read one
shard at a time). Each has `len()`, `identity` (a hash of what its images are, to key caches) and
`batches(positions, batch_size)`, which yields the images at `positions` in that order.

`TrainingStream` feeds stage 2's training loop from an ImageFolder too large for memory (data.stream), in the
loop's own order, decoding the coming steps' images while a step runs.

data.name=latents (a folder made by `python -m dpt_fast.data.prepare --vae`): position i of `real.train` is
line i of its files.txt -- latent i, pseudo-label i. The images are decoded again from the ImageFolder the
latents were made from (the manifest's `root`, or `data.image_root` when they have moved), with prepare's
crop (the manifest's `resolution`): the features of image i describe exactly the image latent i encodes.
The held-out images for top-1 come from `data.test_root`, or from `val/` (else `test/`) beside a prepared
`train/` folder (ImageNet layout), checked against the training class list; a test image's label is the
position of its folder in that list.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Protocol, Sequence

import numpy as np
import torch

from ..distributed import barrier, rank_world
from ..utils import UserError, atomic_path, load_npy, load_npz, log, read_json, write_json, write_text

PREPARE_AGAIN = "re-run python -m dpt_fast.data.prepare with the same --out to rebuild it"
from .embedded import ArrayDataset

Batches = Iterator[tuple[np.ndarray, torch.Tensor]]
CHUNK_ROWS = 8192  # rows of a feature cache computed and committed together (one resume unit)


class ImageSource(Protocol):
    identity: str  # a hash of the images (their content or their files and crop), keys feature caches

    def __len__(self) -> int: ...

    def batches(self, positions: Sequence[int] | np.ndarray, batch_size: int) -> Batches:
        """(positions int64 [n], uint8 images [n, C, H, W]) for `positions`, in order, `batch_size` at a time."""


def _sha(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:16]


class ArraySource:
    """Images already in memory: uint8 [N, C, H, W]."""

    def __init__(self, images: np.ndarray):
        self.images = images
        self._identity: Optional[str] = None

    def __len__(self) -> int:
        return len(self.images)

    @property
    def identity(self) -> str:
        if self._identity is None:  # CIFAR-10's 150 MB hash in ~0.3 s, once
            self._identity = _sha("array", str(self.images.shape), np.ascontiguousarray(self.images).data)
        return self._identity

    def batches(self, positions, batch_size: int) -> Batches:
        positions = np.asarray(positions, dtype=np.int64)
        for i in range(0, len(positions), batch_size):
            pos = positions[i:i + batch_size]
            yield pos, torch.from_numpy(np.ascontiguousarray(self.images[pos]))


class FolderSource:
    """The files of an `ImageIndex`, decoded at `size` with `crop` (see `imagefolder.CROPS`; "eval" is
    torchvision's Resize(`resize`) + CenterCrop(`size`)).

    The index must come from `scan_imagefolder` (every file validated). A file that fails to decode now has
    changed since: that is a UserError, never a skipped row, because rows are aligned with other arrays.
    """

    def __init__(self, index, size: int, device: torch.device | str | None = None, crop: str = "center",
                 resize: int = 0):
        self.index, self.size, self.crop, self.resize = index, size, crop, resize
        self.device = torch.device(device) if device is not None else None
        self.backend: Optional[str] = None  # chosen (and logged) on first use
        # (the "center" crop's identity is as before crops had names, so existing feature caches stay valid)
        geometry = str(size) if crop == "center" else f"{size}:{crop}:{resize}"
        self.identity = _sha("folder", geometry, "\n".join(index.files), index.labels.tobytes(),
                             np.ascontiguousarray(index.sizes, np.int32).tobytes())

    def with_crop(self, size: int, crop: str, resize: int = 0) -> "FolderSource":
        """The same files decoded another way (e.g. a backbone's own transform)."""
        return FolderSource(self.index, size, self.device, crop, resize)

    def __len__(self) -> int:
        return len(self.index)

    def batches(self, positions, batch_size: int) -> Batches:
        from .dali import ImageDecoder, select_backend

        if not Path(self.index.root).is_dir():
            raise UserError(f"{self.index.root}: the image folder is not there; point data.image_root (training "
                            "images of data.name=latents) or data.test_root at where it is now")
        if self.backend is None:
            self.backend = select_backend(self.device)
        positions = np.asarray(positions, dtype=np.int64)
        dec = ImageDecoder(self.index.entries(positions), self.size, batch_size=batch_size, backend=self.backend,
                           device=self.device, on_bad_image="skip", crop=self.crop, resize=self.resize)
        for pos, images in dec:
            if dec.failed:
                p, reason = dec.failed[0]
                raise UserError(f"{dec.entries[p][0]}: {reason}; it decoded when the folder was indexed, so it "
                                "changed since: restore it (rows are aligned by index, a file cannot be dropped now)")
            yield positions[pos], images


class TrainingStream:
    """Stage 2's training images decoded while it trains, never all in memory: a `BatchSource` (see
    `dpt_fast.diffusion.train`) over the files of an `ImageIndex` (data.stream=true, or an ImageFolder larger than
    `imagefolder.MAX_IN_MEMORY_BYTES`).

    One long-lived `ImageDecoder` (DALI: decode, resize and crop on the GPU with CUDA, its CPU pipeline without;
    PIL without DALI) is fed the trainer's order of files (`plan`), so it reads and decodes the coming steps'
    files while a step runs. Its pixels are those `load_imagefolder` puts in memory (same decoder), and the order is
    the trainer's, so a streamed run trains exactly like an in-memory one, and resumes exactly: the order of a
    resumed run starts at its first step.
    """

    def __init__(self, index, size: int, device: torch.device | str | None = None):
        self.index, self.size = index, size
        self.device = torch.device(device) if device is not None else None
        self.sample_shape = (3, size, size)
        self._decoder = None
        self._batches: Optional[Batches] = None

    def __len__(self) -> int:
        return len(self.index)

    def plan(self, rows_of_steps: Iterator[torch.Tensor], batch_size: int) -> None:
        """The order to decode: this process's data indices (int64 [batch_size]) of each coming step, in order."""
        from itertools import chain

        from .dali import ImageDecoder

        positions = chain.from_iterable(rows.tolist() for rows in rows_of_steps)
        self._decoder = ImageDecoder(self.index.entries(), self.size, batch_size=batch_size, device=self.device,
                                     on_bad_image="skip", positions=positions)
        self._batches = iter(self._decoder)

    def read(self, index: torch.Tensor, rows: slice, seed: int) -> tuple[torch.Tensor, ...]:
        """uint8 [len(rows), 3, S, S] images of `index[rows]` (on the GPU with DALI's GPU decoder)."""
        if self._batches is None:
            raise RuntimeError("TrainingStream.read before plan()")
        pos, images = next(self._batches)
        if self._decoder.failed:
            p, reason = self._decoder.failed[0]
            raise UserError(f"{self._decoder.entries[p][0]}: {reason}; it decoded when the folder was indexed, so it "
                            "changed since: restore it (training reads every file again each epoch)")
        if not np.array_equal(pos, index[rows].numpy()):  # a shifted batch would train on the wrong labels
            raise AssertionError(f"streamed batch holds images {pos[:4]}..., the step wants {index[rows][:4].tolist()}...")
        return (images,)

    def finish(self, raw: tuple[torch.Tensor, ...], batch_size: int, rows: slice, seed: int) -> torch.Tensor:
        """float [len(rows), 3, S, S] in [-1, 1], as `dpt_fast.data.to_float` makes the in-memory images."""
        from . import to_float

        return to_float(raw[0])

    def close(self) -> None:
        if self._batches is not None:
            self._batches.close()
            self._batches = None


class ShardSource:
    """Images in .npz shards (arrays `images` uint8 [n, C, H, W] and `labels` int64 [n]), read a shard at a time.

    Position i is row i of the shards concatenated in the given order. `identity` is the caller's (e.g. the
    generation's settings), since hashing every image would cost as much as reading them.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], identity: str):
        self.paths = [Path(p) for p in paths]
        labels = []
        for p in self.paths:
            labels.append(load_npz(p, ("labels",), spec={"labels": ("iu", 1)}, only=True)["labels"].astype(np.int64))
        self.labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        self.offsets = np.cumsum([0] + [len(y) for y in labels])
        self.identity = identity

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def batches(self, positions, batch_size: int) -> Batches:
        positions = np.asarray(positions, dtype=np.int64)
        shard = np.searchsorted(self.offsets, positions, side="right") - 1
        i = 0
        while i < len(positions):  # runs of positions in the same shard: each shard is loaded once per run
            j = i
            while j < len(positions) and shard[j] == shard[i]:
                j += 1
            images = load_npz(self.paths[shard[i]], ("images",), spec={"images": ("u", 4)}, only=True)["images"]
            local = positions[i:j] - self.offsets[shard[i]]
            for k in range(0, len(local), batch_size):
                yield positions[i + k:i + k + batch_size], torch.from_numpy(np.ascontiguousarray(images[local[k:k + batch_size]]))
            i = j


# ----------------------------------------------------------------------------------------------
# A data set's training and test images, as sources
# ----------------------------------------------------------------------------------------------
@dataclass
class RealData:
    """Training and test images of a data set with their labels; `arrays` is the in-memory set when there is one."""

    name: str
    classes: list[str]
    train: ImageSource
    y_train: np.ndarray
    test: ImageSource
    y_test: np.ndarray
    files: Optional[list[str]] = None  # training file names (subset lists), when the data has them
    skipped: tuple[str, ...] = ()  # training files left out as bad images
    arrays: Optional[ArrayDataset] = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def find_test_root(data_cfg, train_root: Path) -> Optional[Path]:
    """`data.test_root`, else `val/` or `test/` beside a `train/` folder, else None."""
    if data_cfg.test_root:
        p = Path(data_cfg.test_root).expanduser()
        if not p.is_dir():
            raise UserError(f"data.test_root={data_cfg.test_root}: no such directory; give an ImageFolder with the "
                            "training class folders")
        return p
    if train_root.name == "train":
        for name in ("val", "test"):
            if (train_root.parent / name).is_dir():
                return train_root.parent / name
    return None


def open_real_data(data_cfg, device: torch.device | str | None = None, progress: bool = True) -> RealData:
    """The training and test images of `data.name` (see the module docstring for data.name=latents)."""
    if data_cfg.name == "latents":
        return _open_prepared(data_cfg, device, progress)
    from . import load_dataset

    ds = load_dataset(data_cfg, progress=progress)
    return RealData(ds.name, list(ds.classes), ArraySource(ds.x_train), ds.y_train, ArraySource(ds.x_test), ds.y_test,
                    files=getattr(ds, "train_files", None) or None,
                    skipped=tuple(s["file"] for s in getattr(ds, "skipped", [])), arrays=ds)


def _open_prepared(data_cfg, device, progress: bool) -> RealData:
    from .imagefolder import ImageIndex, scan_imagefolder
    from .latents import read_manifest

    if not data_cfg.root:
        raise UserError("data.name=latents needs data.root=DIR (a folder made by python -m dpt_fast.data.prepare --vae)")
    root = Path(data_cfg.root).expanduser()
    m = read_manifest(root, "latents")
    path = root / "index.json"
    if not path.is_file():
        raise UserError(f"{path} is missing (it lists the source images of the latents); re-run python -m "
                        f"dpt_fast.data.prepare --out {root} with the same --root to rewrite it")
    index = ImageIndex.from_dict(read_json(path)["index"])
    labels = load_npy(root / m["labels"], PREPARE_AGAIN).astype(np.int64)
    if len(index) != m["num_images"] or not np.array_equal(index.labels, labels):
        raise UserError(f"{root}: index.json, labels.npy and manifest.json disagree; re-run prepare with --fresh")
    if data_cfg.image_root:
        index.root = str(Path(data_cfg.image_root).expanduser().resolve())
    train_root = Path(index.root)
    test_root = find_test_root(data_cfg, train_root)
    if test_root is None:
        raise UserError(f"data.name=latents needs held-out images for top-1: set data.test_root=DIR (an ImageFolder "
                        f"with the {len(index.classes)} training class folders, e.g. imagenet/val); no val/ or test/ "
                        f"beside {train_root}")
    test = scan_imagefolder(test_root, data_cfg.on_bad_image, classes=index.classes, progress=progress)
    size = int(m["resolution"])
    log.info("data: %d training images (latents %s, images %s), %d test images (%s), %d px", len(index), root,
             index.root, len(test), test_root, size)
    crop = m.get("crop", "center")  # prepared before crops had names: the "center" crop
    return RealData("latents", list(index.classes), FolderSource(index, size, device, crop), labels,
                    FolderSource(test, size, device, crop), test.labels, files=list(index.files),
                    skipped=tuple(m.get("skipped", [])))


# ----------------------------------------------------------------------------------------------
# Feature cache: float32 [N, D] in one .npy, filled chunk by chunk, resumable
# ----------------------------------------------------------------------------------------------
def _state_path(path: Path) -> Path:
    return path.with_suffix(".json")


def _done_dir(path: Path) -> Path:
    return path.with_suffix(".done")


def open_features(path: str | os.PathLike, stage: int = 1) -> np.ndarray:
    """A finished feature cache, memory-mapped read-only: float32 [N, D]; UserError naming the stage otherwise."""
    path = Path(path)
    state = read_json(_state_path(path)) if _state_path(path).is_file() else {}
    if not state.get("complete") or not path.is_file():
        raise UserError(f"{path} is missing or unfinished: run `python -m dpt_fast.stage --stage {stage}` first")
    return load_npy(path, f"re-run `python -m dpt_fast.stage --stage {stage}` (it rebuilds it)", mmap_mode="r")


def cached_features(
    embed: Callable[[torch.Tensor], torch.Tensor],
    source: ImageSource,
    path: str | os.PathLike,
    *,
    key: dict,
    dim: int,
    batch_size: int,
    chunk_rows: int = 0,
    progress: bool = True,
    desc: str = "features",
) -> np.ndarray:
    """float32 [len(source), dim] = embed(images) of every image of `source`, memory-mapped from `path` (.npy).

    embed: uint8 [n, C, H, W] tensor -> float [n, dim] tensor. Rows are computed in chunks of `chunk_rows`
    (default CHUNK_ROWS); a finished chunk is flushed to disk, then marked by an empty file in `<path>.done/`
    (written atomically), so a killed run recomputes only the chunks it had not finished. `<path>.json` holds
    `key` (what the features depend on, e.g. `BackboneSpace.identity()` + the source's identity): another key
    starts afresh, the same key returns the finished file at once. Under torch.distributed, rank r computes
    chunks r, r + W, ... into the shared file; every rank returns the whole array after a barrier.
    """
    from tqdm.auto import tqdm

    path = Path(path)
    n, chunk = len(source), chunk_rows or CHUNK_ROWS
    want = {"key": json.loads(json.dumps({**key, "images": source.identity})), "rows": n, "dim": dim, "chunk_rows": chunk}
    state_path, done_dir = _state_path(path), _done_dir(path)
    rank, world = rank_world()
    state = read_json(state_path) if state_path.is_file() else {}
    same = {k: state.get(k) for k in want} == want and path.is_file()
    if same and state.get("complete"):
        log.info("features: reusing %s (%d x %d)", path, n, dim)
        return load_npy(path, mmap_mode="r")
    if rank == 0 and not same:
        if state:
            log.info("features: %s was made for other images or another model; recomputing", path)
        state_path.unlink(missing_ok=True)  # first: a kill below leaves no state, so the next run starts over too
        shutil.rmtree(done_dir, ignore_errors=True)
        if n:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim)).flush()  # sparse until written
        else:  # mmap refuses empty files
            with atomic_path(path) as tmp:
                np.save(tmp, np.zeros((0, dim), np.float32))
        write_json(state_path, {**want, "complete": False})
    barrier()
    done_dir.mkdir(exist_ok=True)

    num_chunks = -(-n // chunk)
    done = {int(p.name) for p in done_dir.iterdir() if p.name.isdigit()}
    todo = [c for c in range(rank, num_chunks, world) if c not in done]
    if done and todo:
        log.info("features: resuming %s, %d of %d chunks done", path, len(done), num_chunks)
    if todo:
        out = np.lib.format.open_memmap(path, mode="r+")
        positions = np.concatenate([np.arange(c * chunk, min(n, (c + 1) * chunk)) for c in todo])
        filled = dict.fromkeys(todo, 0)
        bar = tqdm(total=len(positions), desc=desc, unit="img", disable=not progress or rank != 0, smoothing=0.05)
        for pos, images in source.batches(positions, batch_size):
            out[pos] = embed(images).float().cpu().numpy()
            bar.update(len(pos))
            for c, k in zip(*np.unique(pos // chunk, return_counts=True)):
                filled[int(c)] += int(k)
                if filled[int(c)] == min(n, (int(c) + 1) * chunk) - int(c) * chunk:
                    out.flush()  # the rows reach the file before the chunk is marked done
                    write_text(done_dir / f"{int(c):06d}", "")
        bar.close()
        del out
    barrier()
    if rank == 0:
        missing = [c for c in range(num_chunks) if not (done_dir / f"{c:06d}").is_file()]
        if missing:
            raise UserError(f"{path}: chunks {missing[:5]} were not computed; re-run to finish them")
        write_json(state_path, {**want, "complete": True})
        shutil.rmtree(done_dir, ignore_errors=True)
    barrier()
    return load_npy(path, mmap_mode="r")
