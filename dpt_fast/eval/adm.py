"""Generation metrics as the paper reports them: ADM's evaluator (openai/guided-diffusion `evaluations/
evaluator.py`: FID, sFID, IS, precision/recall) computed through torch-fidelity, plus KID.

    m = evaluate("samples.npz", "VIRTUAL_imagenet256_labeled.npz", "weights-inception-2015-12-05-6726825d.pth")
    m["fid"], m["sfid"], m["is"], m["precision"], m["recall"]

The network is torch-fidelity's port of the TF Inception graph ADM uses (`classify_image_graph_def.pb`,
2015-12-05; torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`, read from a local file only), with
its TF-exact bilinear resize to 299 px. It is registered with torch-fidelity as 'inception-v3-adm' and adds
what torch-fidelity lacks:
- "spatial": ADM's sFID features, the graph's `mixed_6/conv` (the 1x1-conv branch of the 7th mixed block,
  torch-fidelity's `Mixed_6d.branch1x1`, after its ReLU) [17, 17, 192] -> first 7 channels, flattened in
  ADM's (TF's) height, width, channel order: 2,023 numbers per image.
- "2048" (pool_3: FID, precision/recall, KID) and "logits_unbiased" (pool_3 times the softmax weights, no
  bias, as ADM's softmax graph: IS) are torch-fidelity's own.
Statistics: mu = mean, sigma = np.cov(rowvar=False), float64. FID / sFID: torch-fidelity's Frechet distance
(eigenvalues of sigma1 sigma2; ADM's scipy sqrtm gives the same value to numerical precision, tests compare).
IS: torch-fidelity's, over consecutive splits of 5,000 images unshuffled -- ADM's splits exactly when N is a
multiple of 5,000 (FID-50K: 10 splits). Precision / recall: torch-fidelity's prc (Kynkaenniemi et al.,
k = 3 neighbours, float32 distances), the definition ADM's ManifoldEstimator implements (ADM measures the
distances in float16, so a sample exactly on a ball's edge can fall either way). KID: torch-fidelity's
(100 subsets of min(1000, N) images, cubic polynomial kernel).

Inputs (`open_images`): an .npz with ADM's `arr_0` (uint8 [N, H, W, 3], read batch by batch from the zip) or
our `images` (uint8 [N, C, H, W]); an .npz of statistics only (`mu`, `sigma`, optionally `mu_s`, `sigma_s`:
ADM's / U-ViT's reference statistics); a folder of PNG/JPEG images (any depth, one size); a stage-2
`generated/` folder (shards + manifest.json) or a run directory holding one. An ADM reference batch carries
both its images and precomputed statistics: FID / sFID use the statistics (as ADM does), precision / recall
and KID the images. Reference features and statistics are cached (`cache_dir`, written atomically, keyed by
the reference's files -- path, size, mtime -- and the Inception file).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch_fidelity
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from ..utils import UserError, load_npz, log, read_json, save_npz

EXTRACTOR = "inception-v3-adm"
POOL, SPATIAL, LOGITS = "2048", "spatial", "logits_unbiased"
METRICS = ("fid", "sfid", "is", "kid", "prc")
IS_SPLIT = 5000  # ADM's compute_inception_score(split_size=5000)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
WEIGHTS_HINT = ("pass --inception-weights FILE: torch-fidelity's weights-inception-2015-12-05-6726825d.pth "
                "(the TF Inception ADM uses, converted), from a local path; nothing is downloaded")


# ----------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------
def check_inception_weights(path: str | os.PathLike | None) -> Path:
    """The Inception weights file, checked to hold plain tensors of torch-fidelity's InceptionV3."""
    from ..models.weights import read_weights

    if not path:
        raise UserError(f"no Inception weights: {WEIGHTS_HINT}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"--inception-weights {path}: no such file; {WEIGHTS_HINT}")
    state = read_weights(path, hint=WEIGHTS_HINT)  # weights_only: refuses files that would run code
    if "Mixed_6d.branch1x1.conv.weight" not in state or "fc.weight" not in state:
        raise UserError(f"--inception-weights {path}: not torch-fidelity's InceptionV3 state dict "
                        f"(no Mixed_6d / fc weights); {WEIGHTS_HINT}")
    return path


class ADMInceptionV3(FeatureExtractorInceptionV3):
    """torch-fidelity's TF-exact InceptionV3 plus ADM's sFID features ("spatial"); uint8 [B, 3, H, W] in."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        # torch-fidelity would download when no path is given, and unpickles it freely: check it first
        path = check_inception_weights(feature_extractor_weights_path)
        super().__init__(name, features_list, feature_extractor_weights_path=str(path), **kwargs)
        self._spatial: Optional[torch.Tensor] = None
        self.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output):
        self._spatial = output

    @staticmethod
    def get_provided_features_list():
        return (*FeatureExtractorInceptionV3.get_provided_features_list(), SPATIAL)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return FeatureExtractorInceptionV3.get_default_feature_layer_for_metric(metric)

    @staticmethod
    def can_be_compiled():
        return False  # the forward hook and the swapped feature list are not for torch.compile

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        wanted = list(self.features_list)
        self.features_list = [f for f in wanted if f != SPATIAL] or ["768"]  # "768" runs through Mixed_6d
        try:
            out = dict(zip(self.features_list, super().forward(x)))
        finally:
            self.features_list = wanted
        if SPATIAL in wanted:  # [B, 192, 17, 17] -> first 7 channels, (h, w, c) order as TF's NHWC reshape
            out[SPATIAL] = self._spatial[:, :7].permute(0, 2, 3, 1).reshape(len(x), -1).float()
        return tuple(out[f] for f in wanted)


if EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor(EXTRACTOR, ADMInceptionV3)


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------
@dataclass
class Images:
    """An evaluation input: `count` uint8 images of `shape` (C, H, W) streamed by `batches`, and/or `stats`."""

    path: Path
    kind: str  # npz | folder | generated | stats
    count: int
    shape: tuple[int, int, int]
    batches: Optional[Callable[[int], Iterator[np.ndarray]]]  # batch size -> uint8 [n, C, H, W] arrays
    files: list[Path] = field(default_factory=list)  # what the input is made of (its cache identity)
    stats: dict = field(default_factory=dict)  # precomputed mu, sigma (mu_s, sigma_s)

    def identity(self) -> str:
        h = hashlib.sha256(self.kind.encode())
        for f in sorted(self.files):
            st = f.stat()
            h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        return h.hexdigest()[:24]


def _header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) of the .npy stream `f`, leaving it at the first byte of the data."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(f)


def _npz_member(path: Path, name: str) -> tuple[tuple[int, ...], np.dtype, bool]:
    """(shape, dtype, fortran order) of array `name` in an .npz, from its header only."""
    with zipfile.ZipFile(path) as z, z.open(f"{name}.npy") as f:
        shape, fortran, dtype = _header(f)
    return shape, dtype, fortran


def _npz_batches(path: Path, name: str, nhwc: bool) -> Callable[[int], Iterator[np.ndarray]]:
    """Batches of array `name` read from the zip one at a time (a 50,000-image batch needs no 10 GB of RAM)."""

    def batches(batch_size: int) -> Iterator[np.ndarray]:
        with zipfile.ZipFile(path) as z, z.open(f"{name}.npy") as f:
            shape, _, dtype = _header(f)
            per = int(np.prod(shape[1:])) * dtype.itemsize
            for i in range(0, shape[0], batch_size):
                n = min(batch_size, shape[0] - i)
                data = f.read(n * per)
                if len(data) != n * per:
                    raise UserError(f"{path}: '{name}' ends early (truncated file?); write it again")
                a = np.frombuffer(bytearray(data), dtype).reshape(n, *shape[1:])  # writable
                yield np.ascontiguousarray(a.transpose(0, 3, 1, 2) if nhwc else a)

    return batches


def _open_npz(path: Path) -> Images:
    try:
        with zipfile.ZipFile(path) as z:
            names = [n[:-4] for n in z.namelist() if n.endswith(".npy")]
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"{path}: not a readable .npz ({e}); pass an ADM sample/reference batch, our images npz or "
                        "statistics (mu, sigma)") from None
    stats = {}
    if "mu" in names and "sigma" in names:
        stats = load_npz_keys(path, [k for k in ("mu", "sigma", "mu_s", "sigma_s") if k in names])
    for name in ("arr_0", "images"):
        if name in names:
            shape, dtype, fortran = _npz_member(path, name)
            if len(shape) != 4 or dtype != np.uint8 or fortran:
                raise UserError(f"{path}: '{name}' is {dtype} {shape}; expected uint8 images [N, H, W, 3] (ADM's "
                                "arr_0) or [N, C, H, W] (images)")
            nhwc = shape[-1] in (1, 3, 4) and shape[1] not in (1, 3, 4)
            chw = (shape[3], shape[1], shape[2]) if nhwc else tuple(shape[1:])
            if shape[0] == 0:
                raise UserError(f"{path}: '{name}' holds no images")
            return Images(path, "npz", int(shape[0]), chw, _npz_batches(path, name, nhwc), [path], stats)
    if stats:
        return Images(path, "stats", 0, (0, 0, 0), None, [path], stats)
    raise UserError(f"{path}: no 'arr_0' or 'images' array and no statistics (mu, sigma) among {names[:6]}; pass an "
                    "ADM batch, our images npz or a statistics npz")


def load_npz_keys(path: Path, keys: list[str]) -> dict[str, np.ndarray]:
    """Only `keys` of an .npz (no unpickling), as float64."""
    with np.load(path, allow_pickle=False) as z:
        return {k: np.asarray(z[k], np.float64) for k in keys}


def _open_folder(path: Path) -> Images:
    from PIL import Image

    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise UserError(f"{path}: no PNG or JPEG images in this folder (or below it); pass a folder of samples, an "
                        ".npz, a stage-2 generated/ folder or a run directory")
    sizes = {}
    for f in files:
        try:
            with Image.open(f) as im:
                sizes.setdefault(im.size, f)
        except OSError as e:
            raise UserError(f"{f}: not a readable image ({e}); remove it or replace it") from None
        if len(sizes) > 1:
            (a, fa), (b, fb) = list(sizes.items())[:2]
            raise UserError(f"{path}: images of different sizes ({fa.name} is {a[0]}x{a[1]}, {fb.name} is "
                            f"{b[0]}x{b[1]}); evaluate images of one size")
    (w, h), = sizes

    def batches(batch_size: int) -> Iterator[np.ndarray]:
        for i in range(0, len(files), batch_size):
            out = []
            for f in files[i:i + batch_size]:
                with Image.open(f) as im:
                    out.append(np.asarray(im.convert("RGB")).transpose(2, 0, 1))
            yield np.stack(out)

    return Images(path, "folder", len(files), (3, h, w), batches, files)


def _open_generated(path: Path) -> Images:
    man = read_json(path / "manifest.json")
    if not man.get("complete"):
        raise UserError(f"{path}: the generation is incomplete; finish it (re-run the command that wrote it)")
    shards = sorted(path.glob("shard-*.npz"))
    if len(shards) != int(man.get("num_shards", -1)):
        raise UserError(f"{path}: {len(shards)} shards but manifest.json lists {man.get('num_shards')}; re-run the "
                        "generation")
    first = _npz_member(shards[0], "images")[0]
    count = sum(_npz_member(s, "images")[0][0] for s in shards)

    def batches(batch_size: int) -> Iterator[np.ndarray]:
        for s in shards:
            x = load_npz(s, ("images",))["images"]
            for i in range(0, len(x), batch_size):
                yield x[i:i + batch_size]

    return Images(path, "generated", int(count), tuple(first[1:]), batches, [path / "manifest.json", *shards])


def open_images(spec: str | os.PathLike, option: str) -> Images:
    """An evaluation input named on the command line (see the module docstring); UserErrors name `option`."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"{option} {path}: no such file or folder")
    if path.is_file():
        if path.suffix != ".npz":
            raise UserError(f"{option} {path}: expected an .npz file or a folder")
        return _open_npz(path)
    if (path / "manifest.json").is_file() and any(path.glob("shard-*.npz")):
        return _open_generated(path)
    if (path / "stage2" / "generated" / "manifest.json").is_file():
        return _open_generated(path / "stage2" / "generated")
    return _open_folder(path)


# ----------------------------------------------------------------------------------------------
# Features, statistics, metrics
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def inception_features(images: Images, net: ADMInceptionV3, device: torch.device, batch_size: int = 100,
                       progress: bool = False, desc: str = "inception") -> dict[str, np.ndarray]:
    """{feature name: float32 [N, dim]} of every image of `images` (1-channel images are repeated to RGB)."""
    from tqdm.auto import tqdm

    out: dict[str, list] = {f: [] for f in net.features_list}
    bar = tqdm(total=images.count, desc=desc, unit="img", disable=not progress)
    for x in images.batches(batch_size):
        t = torch.from_numpy(np.ascontiguousarray(x[:, :3]))
        if t.shape[1] == 1:
            t = t.expand(-1, 3, -1, -1)
        if device.type == "cuda":
            t = t.pin_memory()
        for name, f in zip(net.features_list, net(t.to(device, non_blocking=True))):
            out[name].append(f.float().cpu().numpy())
        bar.update(len(x))
    bar.close()
    return {k: np.concatenate(v) for k, v in out.items()}


def statistics(features: np.ndarray) -> dict[str, np.ndarray]:
    """mu [D] and sigma [D, D] (float64) of features [N, D], as ADM's compute_statistics."""
    f = np.asarray(features, np.float64)
    return {"mu": f.mean(0), "sigma": np.cov(f, rowvar=False)}


def frechet_distance(a: dict, b: dict) -> float:
    """FID between statistics {mu, sigma} (torch-fidelity's formula, float64)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    a = {k: np.asarray(a[k], np.float64) for k in ("mu", "sigma")}
    b = {k: np.asarray(b[k], np.float64) for k in ("mu", "sigma")}
    if a["mu"].shape != b["mu"].shape or a["sigma"].shape != b["sigma"].shape:
        raise UserError(f"statistics of different sizes ({a['mu'].shape[0]} vs {b['mu'].shape[0]} features): the "
                        "reference statistics were made with another network or layer")
    return float(fid_statistics_to_metric(a, b, verbose=False)[KEY_METRIC_FID])


def inception_score(logits: np.ndarray) -> tuple[float, float]:
    """(mean, std) IS over consecutive, unshuffled splits of 5,000 (ADM's splits when N % 5000 == 0)."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    m = isc_features_to_metric(torch.from_numpy(logits), splits=max(1, math.ceil(len(logits) / IS_SPLIT)),
                               shuffle=False)
    return float(m[KEY_METRIC_ISC_MEAN]), float(m[KEY_METRIC_ISC_STD])


def precision_recall(samples: np.ndarray, reference: np.ndarray, device: torch.device | str = "cpu"
                     ) -> tuple[float, float]:
    """torch-fidelity's improved precision / recall (k = 3) of sample pool features against the reference's;
    the pairwise distances (50,000 x 50,000 for FID-50K) are computed on `device`, 10,000 rows at a time."""
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    m = prc_features_to_metric(torch.from_numpy(samples).to(device), torch.from_numpy(reference).to(device),
                               prc_neighborhood=3, prc_batch_size=10000, save_cpu_ram=True, verbose=False)
    return float(m[KEY_METRIC_PRECISION]), float(m[KEY_METRIC_RECALL])


def kernel_inception_distance(samples: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    size = min(1000, len(samples), len(reference))
    m = kid_features_to_metric(torch.from_numpy(samples), torch.from_numpy(reference), kid_subsets=100,
                               kid_subset_size=size, verbose=False)
    return float(m[KEY_METRIC_KID_MEAN]), float(m[KEY_METRIC_KID_STD])


# ----------------------------------------------------------------------------------------------
# Reference statistics, cached
# ----------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dpt_fast" / "eval"


def reference_features(ref: Images, net_factory: Callable[[list[str]], ADMInceptionV3], weights: Path,
                       need: set[str], device: torch.device, batch_size: int, cache_dir: Optional[Path],
                       progress: bool) -> tuple[dict, str]:
    """({mu, sigma, mu_s, sigma_s, pool}, how) of the reference: its own statistics where it has them, else
    computed (or read from the cache). `need` names what the metrics use: fid, sfid (statistics), pool."""
    have = dict(ref.stats)
    if "sfid" in need and "mu_s" not in have and ref.kind == "stats":
        raise UserError(f"--reference {ref.path}: holds FID statistics only (no mu_s / sigma_s); sFID needs a reference "
                        "with them or with its images (e.g. ADM's VIRTUAL_imagenet256_labeled.npz)")
    missing = [k for k in ("fid", "sfid") if k in need and ("mu" if k == "fid" else "mu_s") not in have]
    if "pool" in need or missing:
        if ref.kind == "stats":
            raise UserError(f"--reference {ref.path}: holds statistics only; precision/recall and KID need the "
                            "reference images (e.g. ADM's VIRTUAL_imagenet256_labeled.npz); drop prc,kid from --metrics")
        st = weights.stat()
        key = json.dumps({"reference": ref.identity(), "weights": [str(weights.resolve()), st.st_size, st.st_mtime_ns],
                          "format": 1}, sort_keys=True)
        path = cache_dir / f"ref-{hashlib.sha256(key.encode()).hexdigest()[:24]}.npz" if cache_dir else None
        if path is not None and path.is_file():
            cached = load_npz(path)
            if str(cached.get("key", "")) == key:
                log.info("eval: reference features from the cache %s", path)
                return {**{k: v for k, v in cached.items() if k != "key"}, **have}, "cached"
        feats = inception_features(ref, net_factory([POOL, SPATIAL]), device, batch_size, progress, "reference")
        pool = statistics(feats[POOL])
        spatial = statistics(feats[SPATIAL])
        computed = {"mu": pool["mu"], "sigma": pool["sigma"], "mu_s": spatial["mu"], "sigma_s": spatial["sigma"],
                    "pool": feats[POOL]}
        if path is not None:
            save_npz(path, key=np.array(key), **computed)
        return {**computed, **have}, "computed" if not have else "precomputed statistics + computed features"
    return have, "precomputed"


# ----------------------------------------------------------------------------------------------
# Everything
# ----------------------------------------------------------------------------------------------
def evaluate(samples: str | os.PathLike, reference: str | os.PathLike, inception_weights: str | os.PathLike | None,
             metrics: tuple[str, ...] = ("fid", "sfid", "is", "prc"), device: str = "auto", batch_size: int = 100,
             cache_dir: Optional[str | os.PathLike] = "", progress: bool = False) -> dict:
    """The paper's generation metrics of `samples` against `reference` (see the module docstring).

    cache_dir: where reference features are cached ("" = ~/.cache/dpt_fast/eval, None = no cache).
    Returns {fid, sfid, is, is_std, precision, recall, kid, kid_std (those asked for), num_samples,
    num_reference, reference_statistics, samples, reference, inception_weights, seconds}.
    """
    from ..utils import resolve_device

    t0 = time.time()
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise UserError(f"--metrics {','.join(metrics)}: use a comma-separated subset of {','.join(METRICS)}")
    weights = check_inception_weights(inception_weights)
    dev = resolve_device(device)
    smp = open_images(samples, "--samples")
    if smp.kind == "stats":
        raise UserError(f"--samples {smp.path}: holds statistics, not images; pass the generated images")
    ref = open_images(reference, "--reference")
    if ref.kind != "stats" and ref.shape != smp.shape:
        raise UserError(f"--samples are {'x'.join(map(str, smp.shape))} images but --reference "
                        f"{'x'.join(map(str, ref.shape))}: generate at the reference's resolution")
    if smp.shape[0] not in (1, 3, 4):
        raise UserError(f"--samples {smp.path}: {smp.shape[0]}-channel images; Inception takes RGB (or grey)")
    cache = None if cache_dir is None else (Path(cache_dir).expanduser() if cache_dir else default_cache_dir())

    def net(features: list[str]) -> ADMInceptionV3:
        return ADMInceptionV3(EXTRACTOR, features, feature_extractor_weights_path=str(weights)).to(dev)

    need = {m for m in metrics if m in ("fid", "sfid")} | ({"pool"} if {"prc", "kid"} & set(metrics) else set())
    ref_stats, how = reference_features(ref, net, weights, need, dev, batch_size, cache, progress)
    wanted = [POOL] + ([SPATIAL] if "sfid" in metrics else []) + ([LOGITS] if "is" in metrics else [])
    feats = inception_features(smp, net(wanted), dev, batch_size, progress, "samples")
    out: dict = {}
    if "fid" in metrics:
        out["fid"] = frechet_distance(statistics(feats[POOL]), ref_stats)
    if "sfid" in metrics:
        ref_spatial = {"mu": ref_stats["mu_s"], "sigma": ref_stats["sigma_s"]}
        out["sfid"] = frechet_distance(statistics(feats[SPATIAL]), ref_spatial)
    if "is" in metrics:
        out["is"], out["is_std"] = inception_score(feats[LOGITS])
    if "prc" in metrics:
        out["precision"], out["recall"] = precision_recall(feats[POOL], np.asarray(ref_stats["pool"], np.float32), dev)
    if "kid" in metrics:
        out["kid"], out["kid_std"] = kernel_inception_distance(feats[POOL], ref_stats["pool"])
    return {**out, "num_samples": smp.count, "num_reference": ref.count, "reference_statistics": how,
            "samples": str(smp.path), "reference": str(ref.path), "inception_weights": str(weights),
            "seconds": time.time() - t0}
