"""Prepared data sets: an ImageFolder turned once into a few large, memory-mapped shards.

With a VAE (`python -m dpt_fast.data.prepare --root DIR --out OUT --vae PATH`), every image and its
horizontal mirror are encoded and their moments stored; stage 2 trains on them in latent space:

    from dpt_fast.data.latents import LatentDataset
    ds = LatentDataset("OUT")                      # memory-maps OUT/latents-*.npy
    len(ds), ds.num_classes, ds.latent_shape       # N, C, (4, 32, 32) at 256 px
    y = ds.labels                                  # int64 [N]; index i = line i of OUT/files.txt, and
                                                   # index i of stage-1 pseudo-labels computed on the same set
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(len(ds), (256,), generator=g).numpy()
    z = ds.sample(idx, generator=g, device="cuda") # float32 [256, 4, 32, 32], already times 0.18215,
                                                   # each image mirrored with probability 1/2
    # samples / FID: dpt_fast.data.vae.decode(load_vae(PATH, "cuda"), z) -> uint8 [256, 3, 256, 256]

Without a VAE the shards hold the decoded uint8 images (`ImageShards`).

Layout of OUT (`manifest.json` is written last, so its presence means complete):
    index.json                 the validated file list, labels, sizes, skipped files, and the settings
    files.txt, labels.npy      file i (relative to the root) and its class, aligned by index
    latents-00000.npy ...      float16/32 [n, 2, 2c, h, w]: (image, mirror) x (mean, logvar) moments
    images-00000.npy ...       (no VAE) uint8 [n, 3, S, S]
    manifest.json              num_images, num_classes, classes, skipped, backend, shards, ...
Shard s holds images [s * shard_size, (s + 1) * shard_size). Each shard is written atomically, so a killed
run keeps its finished shards and the next run does only the rest. Under torchrun, rank r does shards
r, r + world_size, ...; rank 0 writes the index first and the manifest after a barrier.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..distributed import barrier, rank_world
from ..utils import UserError, atomic_path, load_npy, log, read_json, read_text, write_json, write_text
from .imagefolder import ImageIndex, scan_imagefolder
from .vae import SCALE, sample_latents

_PREPARE_AGAIN = "re-run python -m dpt_fast.data.prepare with the same --out to rebuild it"

FORMAT = "dpt_fast.prepared/1"
DTYPES = ("float16", "float32")
VAE_DTYPES = ("float32", "bfloat16", "float16")


# ----------------------------------------------------------------------------------------------
# Shards
# ----------------------------------------------------------------------------------------------
def rank_shards(num_shards: int, rank: int, world_size: int) -> list[int]:
    """The shards rank `rank` of `world_size` prepares: rank, rank + world_size, ..."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    return list(range(rank, num_shards, world_size))


def shard_name(kind: str, s: int) -> str:
    return f"{kind}-{s:05d}.npy"


def _shard_len(s: int, n: int, shard_size: int) -> int:
    return min(shard_size, n - s * shard_size)


def _shard_ok(path: Path, shape: tuple[int, ...], dtype: str) -> bool:
    """A finished shard: present, with the expected shape and dtype (only the header is read)."""
    if not path.is_file():
        return False
    try:
        a = load_npy(path, mmap_mode="r")
    except UserError:
        return False
    return a.shape == shape and a.dtype == np.dtype(dtype)


def _save_shard(path: Path, array: np.ndarray) -> None:
    """Write a .npy atomically: a kill leaves the old file or none, never a torn one."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


# ----------------------------------------------------------------------------------------------
# Preparation
# ----------------------------------------------------------------------------------------------
def _load_or_scan(root: Path, out: Path, settings: dict, workers: int, progress: bool, rank: int) -> ImageIndex:
    """Rank 0 scans (or reuses OUT/index.json) and writes the index; the other ranks read it."""
    path = out / "index.json"
    if rank == 0:
        if path.is_file():
            saved = read_json(path)
            saved.setdefault("settings", {}).setdefault("crop", "center")  # prepared before crops had names
            if saved.get("settings") != settings:
                diff = sorted(k for k in settings if saved.get("settings", {}).get(k) != settings[k])
                raise UserError(
                    f"{out} was prepared with other settings ({', '.join(diff)}); use another --out or pass --fresh"
                )
            index = ImageIndex.from_dict(saved["index"])
            log.info("reusing %s (%d images)", path, len(index))
        else:
            index = scan_imagefolder(root, settings["on_bad_image"], workers=workers, progress=progress)
            write_json(path, {"format": FORMAT, "settings": settings, "index": index.to_dict()})
        if not (out / "files.txt").is_file() or not (out / "labels.npy").is_file():
            write_text(out / "files.txt", "".join(f + "\n" for f in index.files))
            _save_shard(out / "labels.npy", index.labels)
    barrier()
    if rank != 0:
        index = ImageIndex.from_dict(read_json(path)["index"])
    return index


def prepare_shards(
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    vae_path: str | None = None,
    resolution: int = 256,
    crop: str = "adm",
    on_bad_image: str = "skip",
    shard_size: int = 4096,
    batch_size: int = 64,
    dtype: str = "float16",
    vae_dtype: str = "float32",
    device: str | torch.device = "auto",
    workers: int = 0,
    fresh: bool = False,
    progress: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
) -> dict | None:
    """Validate `root`, then decode (and with `vae_path` encode) this rank's missing shards into `out`.

    crop: "adm" (default: ADM's / U-ViT's `center_crop_arr`, as the official latents and ADM's reference
    batches; decoded with PIL threads) or "center" (short-side resize + centre crop, DALI on the GPU when
    installed: faster, not the official pixels); see `dpt_fast.data.imagefolder`.
    Returns the manifest once every shard exists (on rank 0), else None. rank/world_size default to
    torch.distributed's (0/1 without it). dtype: storage dtype of the latent moments; vae_dtype: the dtype
    the encoder runs in (float32 as the official extraction; bfloat16 is several times faster on GPUs).
    """
    from ..utils import resolve_device
    from .dali import ImageDecoder, select_backend

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    if vae_dtype not in VAE_DTYPES:
        raise UserError(f"--vae-dtype {vae_dtype}: use one of {', '.join(VAE_DTYPES)}")
    if resolution < 8 or shard_size < 1 or batch_size < 1:
        raise UserError("--resolution must be >= 8, --shard-size and --batch-size >= 1")
    if crop not in ("adm", "center"):
        raise UserError(f"--crop {crop}: use adm (the official center_crop_arr) or center")
    d_rank, d_world = rank_world()
    rank = d_rank if rank is None else rank
    world_size = d_world if world_size is None else world_size
    root, out = Path(root).expanduser(), Path(out).expanduser()
    if not root.is_dir():
        raise UserError(f"--root {root}: no such directory; pass an ImageFolder root with one sub-folder per class")
    if fresh and rank == 0 and out.is_dir():
        for p in list(out.glob("*.npy")) + [out / "index.json", out / "manifest.json", out / "files.txt"]:
            p.unlink(missing_ok=True)
    barrier()
    out.mkdir(parents=True, exist_ok=True)
    kind = "latents" if vae_path else "images"
    settings = {
        "root": str(root.resolve()),
        "resolution": resolution,
        "crop": crop,
        "on_bad_image": on_bad_image,
        "kind": kind,
        "shard_size": shard_size,
        "dtype": dtype if kind == "latents" else "uint8",
        "vae": str(Path(vae_path).expanduser().resolve()) if vae_path else None,
        "vae_dtype": vae_dtype if vae_path else None,
    }
    dev = resolve_device(str(device))
    vae = None
    if kind == "latents":  # before the scan: a wrong --vae should not wait for a million images to be checked
        from .vae import load_vae

        vae = load_vae(vae_path, device=dev, dtype=getattr(torch, vae_dtype))
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        if resolution % f:
            raise UserError(f"--resolution {resolution} is not a multiple of the VAE's downsampling factor {f}")
        item_shape: tuple[int, ...] = (2, 2 * vae.config.latent_channels, resolution // f, resolution // f)
    else:
        item_shape = (3, resolution, resolution)
    store = settings["dtype"]
    index = _load_or_scan(root, out, settings, workers, progress, rank)
    n = len(index)
    num_shards = (n + shard_size - 1) // shard_size

    mine = rank_shards(num_shards, rank, world_size)
    todo = [s for s in mine if not _shard_ok(out / shard_name(kind, s), (_shard_len(s, n, shard_size), *item_shape), store)]
    log.info("rank %d/%d: %d of its %d shards to do (%d shards in all)", rank, world_size, len(todo), len(mine), num_shards)
    backend = "pil" if crop == "adm" else select_backend(dev)
    t0, done = time.time(), 0
    if todo:
        positions = np.concatenate([np.arange(s * shard_size, s * shard_size + _shard_len(s, n, shard_size)) for s in todo])
        dec = ImageDecoder(
            index.entries(positions), resolution, batch_size=batch_size, backend=backend, device=dev,
            on_bad_image="skip", progress=progress, desc=f"{kind} (rank {rank})", crop=crop,
        )
        buffers: dict[int, list] = {}  # shard -> [array, filled]
        for pos, images in dec:
            if dec.failed:
                p, reason = dec.failed[0]
                raise UserError(
                    f"{dec.entries[p][0]}: {reason} (it decoded when {out / 'index.json'} was made, so it changed since); "
                    "fix it, or re-index with --fresh"
                )
            g = positions[pos]
            if vae is not None:
                values = _encode(vae, images).astype(store, copy=False)
            else:
                values = images.cpu().numpy()
            for s in np.unique(g // shard_size):
                sel = g // shard_size == s
                if s not in buffers:
                    buffers[s] = [np.zeros((_shard_len(s, n, shard_size), *item_shape), dtype=store), 0]
                buf = buffers[s]
                buf[0][g[sel] - s * shard_size] = values[sel]
                buf[1] += int(sel.sum())
                if buf[1] == len(buf[0]):
                    _save_shard(out / shard_name(kind, int(s)), buf[0])
                    del buffers[s]
            done += len(pos)
        dt = time.time() - t0
        log.info("rank %d: %d images in %.1f s (%.1f images/s, %s)", rank, done, dt, done / max(dt, 1e-9), backend)
    barrier()
    if rank != 0:
        return None
    missing = [s for s in range(num_shards) if not (out / shard_name(kind, s)).is_file()]
    if missing:
        log.info("%d shards are not done yet (other ranks); run again to finish", len(missing))
        return None
    manifest = {
        "format": FORMAT,
        "kind": kind,
        "num_images": n,
        "num_classes": len(index.classes),
        "classes": index.classes,
        "skipped": [s["file"] for s in index.skipped],
        "skipped_reasons": index.skipped,
        "empty_classes": index.empty_classes,
        "backend": backend,
        "resolution": resolution,
        "crop": crop,
        "shard_size": shard_size,
        "shards": [shard_name(kind, s) for s in range(num_shards)],
        "item_shape": list(item_shape),
        "dtype": store,
        "files": "files.txt",
        "labels": "labels.npy",
        "root": settings["root"],
        "vae": settings["vae"],
        "scale_factor": SCALE if kind == "latents" else None,
        "latent_shape": [item_shape[1] // 2, item_shape[2], item_shape[3]] if kind == "latents" else None,
    }
    write_json(out / "manifest.json", manifest)
    log.info("wrote %s: %d images, %d classes, %d skipped", out / "manifest.json", n, len(index.classes), len(index.skipped))
    return manifest


def _encode(vae, images: torch.Tensor) -> np.ndarray:
    from .vae import encode_moments

    return encode_moments(vae, images, flip=True).cpu().numpy()


# ----------------------------------------------------------------------------------------------
# Reading prepared data
# ----------------------------------------------------------------------------------------------
def read_manifest(root: str | os.PathLike, kind: str) -> dict:
    root = Path(root).expanduser()
    path = root / "manifest.json"
    if not path.is_file():
        hint = " --vae PATH" if kind == "latents" else ""
        raise UserError(
            f"{path} is missing; prepare the data first: python -m dpt_fast.data.prepare --root IMAGES --out {root}{hint} (re-run it to finish an interrupted one)"
        )
    m = read_json(path)
    if m.get("format") != FORMAT or m.get("kind") != kind:
        raise UserError(f"{path}: holds {m.get('kind', 'unknown')!r} data, not {kind}; prepare it with{' --vae' if kind == 'latents' else 'out --vae'}")
    return m


class _Shards:
    def __init__(self, root: str | os.PathLike, kind: str):
        self.root = Path(root).expanduser()
        self.manifest = m = read_manifest(self.root, kind)
        self.shard_size = int(m["shard_size"])
        self.shards = []
        for name in m["shards"]:
            self.shards.append(load_npy(self.root / name, _PREPARE_AGAIN, mmap_mode="r"))
        self.labels = load_npy(self.root / m["labels"], _PREPARE_AGAIN).astype(np.int64)
        if len(self.labels) != m["num_images"] or sum(len(s) for s in self.shards) != m["num_images"]:
            raise UserError(f"{self.root}: shards/labels do not add up to {m['num_images']} images; re-run prepare with --fresh")
        self.classes: list[str] = list(m["classes"])

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def files(self) -> list[str]:
        """File i relative to the image root (for subset lists)."""
        return read_text(self.root / self.manifest["files"], _PREPARE_AGAIN).splitlines()

    def _gather(self, indices: np.ndarray, *extra: np.ndarray) -> np.ndarray:
        """rows[indices] (with extra index arrays on dim 1...), reading only those rows of each shard."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"indices out of range [0, {len(self)})")
        first = self.shards[0]
        tail = first.shape[1 + len(extra) :]
        out = np.empty((len(indices), *tail), dtype=first.dtype)
        shard = indices // self.shard_size
        for s in np.unique(shard):
            sel = np.flatnonzero(shard == s)
            off = indices[sel] - s * self.shard_size
            order = np.argsort(off, kind="stable")  # ascending offsets: sequential reads of the mmap
            out[sel[order]] = self.shards[s][(off[order], *(e[sel[order]] for e in extra))]
        return out


class LatentDataset(_Shards):
    """VAE latents prepared by `python -m dpt_fast.data.prepare --vae` (see the module docstring).

    labels: int64 [N]; latent_shape: (c, h, w); scale: 0.18215.
    """

    def __init__(self, root: str | os.PathLike):
        super().__init__(root, "latents")
        self.latent_shape: tuple[int, int, int] = tuple(self.manifest["latent_shape"])  # type: ignore[assignment]
        self.scale = float(self.manifest["scale_factor"])

    def moments(self, indices: Sequence[int] | np.ndarray, flipped: Sequence[int] | np.ndarray | None = None) -> torch.Tensor:
        """float32 [n, 2c, h, w] (mean, logvar) of images `indices`, mirrored where `flipped` is 1."""
        indices = np.asarray(indices, dtype=np.int64)
        flipped = np.zeros(len(indices), np.int64) if flipped is None else np.asarray(flipped, dtype=np.int64)
        return torch.from_numpy(self._gather(indices, flipped).astype(np.float32, copy=False))

    def sample(
        self,
        indices: Sequence[int] | np.ndarray,
        generator: torch.Generator | None = None,
        flip: bool = True,
        device: str | torch.device | None = None,
    ) -> torch.Tensor:
        """z = (mean + exp(logvar / 2) * eps) * 0.18215, float32 [n, c, h, w], on `device`.

        flip: use the mirrored image's moments with probability 1/2 (the paper's random flip). All draws
        come from `generator` (mirror bits, then eps; eps from a generator seeded by it when `device` is not
        the generator's device), so the same generator state gives the same z.
        """
        n = len(indices)
        gdev = generator.device if generator is not None else torch.device("cpu")
        flips = torch.randint(0, 2, (n,), generator=generator, device=gdev).cpu().numpy() if flip else np.zeros(n, np.int64)
        m = self.moments(indices, flips)
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type == "cuda":
            m = m.pin_memory().to(device, non_blocking=True)
        gen = generator
        if generator is not None and generator.device != device:
            # eps is drawn where z lives: derive a generator there from this one, reproducibly
            seed = int(torch.randint(2**62, (1,), generator=generator, device=gdev))
            gen = torch.Generator(device).manual_seed(seed)
        return sample_latents(m, gen, self.scale)


class ImageShards(_Shards):
    """Decoded images prepared by `python -m dpt_fast.data.prepare` without --vae: uint8 [N, 3, S, S]."""

    def __init__(self, root: str | os.PathLike):
        super().__init__(root, "images")

    def images(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        return self._gather(np.asarray(indices, dtype=np.int64))
