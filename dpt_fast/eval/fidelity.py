"""Generation metrics through torch-fidelity: FID, IS, precision/recall, plus CAS.

The judge is our small feature network (shipped for MNIST-5k and digits), registered as the torch-fidelity
feature extractor 'dpt-feature-net'; images go in through torch-fidelity's Dataset interface as uint8
tensors. For user data sets `eval.feature_net` may instead name a local torch-fidelity Inception weights file
(.pth, the 'inception-v3-compat' extractor). Nothing is ever downloaded: the extractor and its weights path
are always given explicitly, and torch-fidelity's on-disk cache is off.

    m = generation_metrics(gen_u8, gen_labels, real_u8, "mnist5k")
    m["fid"], m["is"], m["precision"], m["recall"], m["cas"], m["cas_per_class"]
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from ..utils import UserError, file_sha256, log, resolve_device
from .accuracy import per_class_accuracy, top1
from .feature_nets import SHIPPED, load_feature_net, predict, shipped_feature_net, uint8_to_input

EXTRACTOR = "dpt-feature-net"
FEATURES = "features"  # the penultimate embedding (feature_dim wide): FID, precision/recall
LOGITS = "logits_unbiased"  # the head has no bias, so these are the classifier's logits: IS


class FeatureNetExtractor(FeatureExtractorBase):
    """torch-fidelity adapter of our FeatureNet: uint8 [B, C, H, W] -> (features, logits) as requested.

    torch-fidelity builds it as cls(name, features_list, **all_metric_kwargs); the safetensors file comes in
    as `feature_extractor_weights_path`, as it does for torch-fidelity's own extractors.
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise UserError(f"torch-fidelity extractor '{EXTRACTOR}' needs feature_extractor_weights_path (a .safetensors file)")
        self.net = load_feature_net(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list():
        return FEATURES, LOGITS

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": LOGITS, "fid": FEATURES, "kid": FEATURES, "prc": FEATURES}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise ValueError(f"expected uint8 images [B, C, H, W], got {x.dtype} {tuple(x.shape)}")
        feats, logits = self.net(uint8_to_input(x))
        out = {FEATURES: feats, LOGITS: logits}
        return tuple(out[k] for k in self.features_list)


if EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:  # the registry refuses a second registration (module reloads)
    torch_fidelity.register_feature_extractor(EXTRACTOR, FeatureNetExtractor)


class ImagesUint8(Dataset):
    """torch-fidelity input: uint8 [N, C, H, W] served one image at a time; `rgb` repeats 1 channel to 3."""

    def __init__(self, images: torch.Tensor, rgb: bool = False):
        self.images, self.rgb = images, rgb

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self.images[i]
        return x.expand(3, -1, -1) if self.rgb and x.shape[0] == 1 else x


def _as_uint8_images(x, what: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x)
    if t.dtype != torch.uint8 or t.ndim != 4 or len(t) == 0:
        raise UserError(f"{what}: expected a non-empty uint8 array [N, C, H, W], got {t.dtype} {tuple(t.shape)}")
    return t.cpu().contiguous()


def _inception_weights(path: Path) -> None:
    """Check that a local torch-fidelity Inception .pth exists and holds plain tensors only.

    torch-fidelity itself loads it with weights_only=False; loading it here first with weights_only=True
    refuses a file that would need arbitrary unpickling before torch-fidelity ever touches it.
    """
    if not path.is_file():
        raise UserError(f"eval.feature_net={path}: file not found; give a local torch-fidelity Inception weights file (weights-inception-2015-12-05-6726825d.pth), nothing is downloaded")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means the same thing to the user
        raise UserError(f"eval.feature_net={path}: not a plain-tensor Inception state dict ({type(e).__name__}); use torch-fidelity's weights-inception-2015-12-05-6726825d.pth") from None
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise UserError(f"eval.feature_net={path}: not a torch-fidelity Inception state dict (no fc.weight)")


def generation_metrics(
    gen_images_uint8,
    gen_labels,
    real_images_uint8,
    data_name: str,
    feature_net: str = "",
    device: str = "cpu",
    batch_size: int = 500,
    progress: bool = False,
) -> dict:
    """FID, IS, precision/recall (torch-fidelity) and CAS of generated images against real ones.

    gen_images_uint8: uint8 [N, C, H, W] generated images; gen_labels: int [N] their conditioning classes;
    real_images_uint8: uint8 [M, C, H, W] real reference images (e.g. the test split). `feature_net`: '' = the
    network shipped for `data_name`, a .safetensors from scripts/train_feature_net.py, or a local
    torch-fidelity Inception .pth (then CAS is None: Inception's classes are not ours). With '' for a data set
    that ships no network (cifar10, imagefolder, ...) every metric is None and `metrics_skipped` says why (a
    warning is logged): a finished run is not failed for want of a judge. `progress` turns on
    torch-fidelity's own progress output (worth it for Inception on large sets).

    Returns {fid, is, is_std, precision, recall, f_score, cas, cas_per_class, num_generated, num_real,
    feature_net, feature_net_sha256, eval_seconds} -- no "seconds" key, so merging it into a stage's metrics
    keeps the stage's own time. Precision: share of generated images inside the real manifold; recall: share
    of real images inside the generated manifold (k = 3 neighbours). FID/IS use the judge's features/logits,
    so they compare only with numbers from the same judge (feature_net_sha256).
    """
    t0 = time.time()
    gen = _as_uint8_images(gen_images_uint8, "generated images")
    real = _as_uint8_images(real_images_uint8, "real images")
    labels = torch.as_tensor(np.asarray(gen_labels) if not torch.is_tensor(gen_labels) else gen_labels).long().cpu()
    if labels.shape != (len(gen),):
        raise UserError(f"generated labels: expected shape ({len(gen)},), got {tuple(labels.shape)}")
    if gen.shape[1:] != real.shape[1:]:
        raise UserError(f"generated images {tuple(gen.shape[1:])} and real images {tuple(real.shape[1:])} differ in shape; generate at the data set's size")
    if len(gen) < 4 or len(real) < 4:
        raise UserError(f"generation metrics need at least 4 generated and 4 real images (precision/recall use 3 neighbours), got {len(gen)} and {len(real)}")
    dev = resolve_device(device)
    if _no_judge(data_name, feature_net, "FID/IS/precision/recall/CAS"):
        return {**{k: None for k in ("fid", "is", "is_std", "precision", "recall", "f_score", "cas", "cas_per_class",
                                     "feature_net", "feature_net_sha256")},
                "num_generated": len(gen), "num_real": len(real), "eval_seconds": time.time() - t0,
                "metrics_skipped": f"no feature network for data.name={data_name}; set eval.feature_net"}
    path = Path(feature_net) if feature_net else shipped_feature_net(data_name)
    inception = path.suffix == ".pth"

    net = None
    if inception:
        _inception_weights(path)
        extractor, layers = "inception-v3-compat", {"feature_layer_fid": "2048", "feature_layer_prc": "2048", "feature_layer_isc": "logits_unbiased"}
        if gen.shape[1] not in (1, 3):
            raise UserError(f"eval.feature_net={path}: Inception takes 1- or 3-channel images, got {gen.shape[1]} channels")
    else:
        net = load_feature_net(path, dev)
        extractor, layers = EXTRACTOR, {}
        if gen.shape[1] != net.in_chans or gen.shape[-1] != net.img_size or gen.shape[-2] != net.img_size:
            raise UserError(
                f"{path} judges {net.in_chans}x{net.img_size}x{net.img_size} images, got {tuple(gen.shape[1:])}; "
                f"set eval.feature_net to a network trained at this size (scripts/train_feature_net.py)"
            )
    log.info("eval: torch-fidelity with extractor %s (%s) on %s, %d generated vs %d real", extractor, path.name, dev, len(gen), len(real))

    n = len(gen)
    kwargs = dict(
        input1=ImagesUint8(gen, rgb=inception),
        input2=ImagesUint8(real, rgb=inception),
        cuda=dev.type == "cuda",
        batch_size=batch_size,
        isc=True,
        fid=True,
        prc=True,
        feature_extractor=extractor,
        feature_extractor_weights_path=str(path),
        # IS is biased low on small splits; 10 splits of >= 100 images each where possible
        isc_splits=max(1, min(10, n // 100)),
        cache=False,  # no files under TORCH_HOME, and no unpickling of cached features
        save_cpu_ram=True,  # no DataLoader worker processes: the data is already in memory
        verbose=progress,
        **layers,
    )
    if dev.type == "cuda":
        with torch.cuda.device(dev):
            m = torch_fidelity.calculate_metrics(**kwargs)
    else:
        m = torch_fidelity.calculate_metrics(**kwargs)

    cas = _cas(net, gen, labels) if net is not None else {"cas": None, "cas_per_class": None}
    return {
        "fid": float(m[torch_fidelity.KEY_METRIC_FID]),
        "is": float(m[torch_fidelity.KEY_METRIC_ISC_MEAN]),
        "is_std": float(m[torch_fidelity.KEY_METRIC_ISC_STD]),
        "precision": float(m[torch_fidelity.KEY_METRIC_PRECISION]),
        "recall": float(m[torch_fidelity.KEY_METRIC_RECALL]),
        "f_score": float(m[torch_fidelity.KEY_METRIC_F_SCORE]),
        **cas,
        "num_generated": n,
        "num_real": len(real),
        "feature_net": f"shipped:{data_name}" if not feature_net else str(path),
        "feature_net_sha256": file_sha256(path),
        "eval_seconds": time.time() - t0,
    }


def _no_judge(data_name: str, feature_net: str, what: str) -> bool:
    """True (with a warning) when no feature network judges this data: none named and none ships for it.
    A user's data set has no judge unless one is named: report that, do not fail the run."""
    if feature_net or data_name in SHIPPED:
        return False
    log.warning("eval: no feature network ships for data.name=%s; %s skipped (set eval.feature_net to a local "
                "torch-fidelity Inception .pth or a scripts/train_feature_net.py .safetensors to get them)",
                data_name, what)
    return True


def _cas(net, gen: torch.Tensor, labels: torch.Tensor) -> dict:
    """CAS and per-class CAS: the share of generated images `net` puts in their conditioning class."""
    _, logits = predict(net, gen)
    return {"cas": top1(logits, labels), "cas_per_class": per_class_accuracy(logits, labels, net.num_classes)}


def class_agreement(gen_images_uint8, gen_labels, data_name: str, feature_net: str = "", device: str = "cpu") -> dict:
    """CAS alone (no FID): the share of generated images the feature network puts in their conditioning class.

    Same judge as `generation_metrics` (eval.feature_net, or the network shipped for `data_name`); with none
    for the data, or an Inception .pth (its classes are not ours), CAS is None with a note, not an error.
    """
    t0 = time.time()
    gen = _as_uint8_images(gen_images_uint8, "generated images")
    labels = torch.as_tensor(np.asarray(gen_labels)).long().cpu()
    out = {"fid": None, "is": None, "precision": None, "recall": None, "cas": None, "cas_per_class": None,
           "num_generated": len(gen)}
    if _no_judge(data_name, feature_net, "CAS"):
        return {**out, "metrics_skipped": f"no feature network for data.name={data_name}; set eval.feature_net",
                "eval_seconds": time.time() - t0}
    path = Path(feature_net) if feature_net else shipped_feature_net(data_name)
    if path.suffix == ".pth":
        return {**out, "metrics_skipped": "CAS needs a feature network trained on this data's classes, not Inception",
                "eval_seconds": time.time() - t0}
    return {**out, **_cas(load_feature_net(path, resolve_device(device)), gen, labels),
            "feature_net": f"shipped:{data_name}" if not feature_net else str(path),
            "feature_net_sha256": file_sha256(path), "eval_seconds": time.time() - t0}
