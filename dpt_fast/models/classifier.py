"""The feature-space classifier that stages 1 and 3 share: a frozen representation + a logistic-regression head.

    space = load_space(run_dir / "stage1")       # the frozen representation stage 1 learned
    X = space.embed(images_uint8)                # [N, D] classifier inputs for any (unseen) images
    head = fit_logreg(X_lab, y_lab, c=1.0, num_classes=10)       # or models.logreg.fit_paper_logreg
    prob = head.predict_proba(space.embed(x_test))

Representations (all saved as safetensors / npz / JSON, never pickled):
- `SimclrUmapSpace`: SimCLR CNN features (L2-normalised) -> UMAP coordinates. UMAP is fitted on the training
  images only (transductive); an unseen image is placed at the similarity-weighted mean of the UMAP coordinates
  of its k nearest training images in SimCLR feature space, so nothing of UMAP itself needs to be persisted.
- `PcaSpace`: PCA of the raw pixels (the simple baseline).
- `BackboneSpace`: frozen MSN (or timm) backbone features, centred and L2-normalised (the paper's recipe).

The head is a multinomial logistic regression with an L2 penalty: on backbone features the paper's (no
intercept, lambda = 0.0025 / N on (1/N) sum(loss) + lambda/2 ||w||^2, cyanure's solution: `models.logreg`),
on the other representations scikit-learn's with an intercept (`fit_logreg`). Both are written as strength
C = 1 / (N lambda): the paper's is C = 400.
"""
from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ..utils import (REBUILD, UserError, atomic_path, load_npz, load_safetensors, read_json, safetensors_metadata,
                     save_npz, write_json)
from .encoder import ConvEncoder, encode
from .weights import read_weights

PAPER_LOGREG_C = 400.0  # = 1 / (N * lambda) with the paper's lambda = 0.0025 / N


# ----------------------------------------------------------------------------------------------
# Logistic-regression head
# ----------------------------------------------------------------------------------------------
@dataclass
class LinearHead:
    """Multinomial logistic regression: logits = X @ coef.T + intercept. coef [K, D], intercept [K]."""

    coef: np.ndarray
    intercept: np.ndarray

    def logits(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, np.float64) @ self.coef.T.astype(np.float64) + self.intercept

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """[N, D] -> float32 [N, K] class probabilities."""
        z = self.logits(x)
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.logits(x).argmax(axis=1).astype(np.int64)

    def label_prob(self, x: np.ndarray, labels: np.ndarray | None = None, rows: int = 16384,
                   device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
        """(arg-max class int64 [N], probability float32 [N] of `labels`, or of the arg-max when None), computed
        `rows` at a time in float64 on `device` (pinned, non-blocking copies to a GPU), so that x may be a
        memory-mapped [N, D] array (1.28M ImageNet rows) and [N, K] never exists at once."""
        dev = torch.device(device)
        coef = torch.from_numpy(np.asarray(self.coef, np.float64)).to(dev)
        intercept = torch.from_numpy(np.asarray(self.intercept, np.float64)).to(dev)
        pred, prob = np.zeros(len(x), np.int64), np.zeros(len(x), np.float32)
        for i in range(0, len(x), rows):
            xc = torch.from_numpy(np.ascontiguousarray(x[i:i + rows], np.float64))
            if dev.type == "cuda":
                xc = xc.pin_memory()
            p = torch.softmax(xc.to(dev, non_blocking=True) @ coef.T + intercept, dim=1)
            top = p.argmax(1)
            pick = top if labels is None else torch.from_numpy(np.asarray(labels[i:i + len(p)], np.int64)).to(dev)
            pred[i:i + len(p)] = top.cpu().numpy()
            prob[i:i + len(p)] = p.gather(1, pick[:, None])[:, 0].float().cpu().numpy()
        return pred, prob

    def save(self, path: str | Path) -> None:
        with atomic_path(path) as tmp:
            save_file({"coef": torch.from_numpy(np.ascontiguousarray(self.coef, np.float32)),
                       "intercept": torch.from_numpy(np.ascontiguousarray(self.intercept, np.float32))}, str(tmp))

    @classmethod
    def load(cls, path: str | Path, fix: str = REBUILD) -> "LinearHead":
        t = load_safetensors(path, fix, finite=True)
        coef, intercept = t.get("coef"), t.get("intercept")
        if coef is None or intercept is None or coef.ndim != 2 or intercept.shape != (coef.shape[0],):
            raise UserError(f"{path}: not a logistic-regression head (coef [K, D], intercept [K]); {fix}")
        return cls(coef.numpy(), intercept.numpy())


def fit_logreg(x: np.ndarray, y: np.ndarray, c: float, num_classes: int,
               sample_weight: np.ndarray | None = None, max_iter: int = 1000) -> LinearHead:
    """Multinomial L2-penalised logistic regression (lbfgs): min C * sum_i w_i loss_i + 1/2 ||coef||^2.

    x: [N, D] float, y: int64 [N] in [0, num_classes). A class absent from y gets a zero row and a very
    negative intercept (never predicted), so the head always has num_classes outputs.
    """
    from sklearn.linear_model import LogisticRegression

    present = np.unique(y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lbfgs convergence notes on tiny labelled sets
        clf = LogisticRegression(C=c, max_iter=max_iter)
        clf.fit(np.asarray(x, np.float64), y, sample_weight=sample_weight)
    d = x.shape[1]
    coef = np.zeros((num_classes, d), np.float64)
    intercept = np.full(num_classes, -1e4, np.float64)
    if len(present) == 1:  # sklearn refuses one class; a constant head is the honest answer
        intercept[present[0]] = 0.0
        return LinearHead(coef, intercept)
    if len(present) == 2:  # sklearn's binary parametrisation: one row for the positive class
        coef[present[1]], intercept[present[1]] = clf.coef_[0], clf.intercept_[0]
        intercept[present[0]] = 0.0
        return LinearHead(coef, intercept)
    coef[clf.classes_] = clf.coef_
    intercept[clf.classes_] = clf.intercept_
    return LinearHead(coef, intercept)


# ----------------------------------------------------------------------------------------------
# Frozen representations
# ----------------------------------------------------------------------------------------------
class Space(Protocol):
    """A frozen, label-free map from images to classifier inputs, saved in (and loaded from) a directory."""

    kind: str

    def embed(self, images: np.ndarray, progress: bool = False) -> np.ndarray:
        """uint8 images [N, C, H, W] -> float32 [N, D]."""

    def embed_train(self, train_images: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """The inputs stage 1's classifier saw for these training images, float32 [len(indices), D]."""

    def save(self, directory: Path) -> None: ...


def knn_embed(feats: np.ndarray, ref_feats: np.ndarray, ref_coords: np.ndarray, k: int,
              temperature: float = 0.05, batch_size: int = 1024) -> np.ndarray:
    """Place new points among reference points: the softmax(cos / temperature)-weighted mean of the
    coordinates of their k most cosine-similar reference points.

    feats [M, D] and ref_feats [N, D] are L2-normalised; ref_coords [N, d]; returns float32 [M, d].
    This is how unseen images enter the UMAP space that was fitted on the training images.
    """
    k = min(k, len(ref_feats))
    ref = torch.from_numpy(np.ascontiguousarray(ref_feats, np.float32))
    coords = torch.from_numpy(np.ascontiguousarray(ref_coords, np.float32))
    out = []
    for i in range(0, len(feats), batch_size):
        sim = torch.from_numpy(np.ascontiguousarray(feats[i:i + batch_size], np.float32)) @ ref.T
        top, idx = sim.topk(k, dim=1)
        w = torch.softmax(top / temperature, dim=1)
        out.append((w.unsqueeze(-1) * coords[idx]).sum(1))
    return torch.cat(out).numpy() if out else np.zeros((0, ref_coords.shape[1]), np.float32)


class SimclrUmapSpace:
    """SimCLR encoder features -> UMAP coordinates (fitted on the training images; unseen images by kNN)."""

    kind = "simclr_umap"

    def __init__(self, encoder: ConvEncoder, encoder_meta: dict, train_feats: np.ndarray,
                 train_coords: np.ndarray, knn: int, device: torch.device | str = "cpu", fingerprint: str = ""):
        self.encoder, self.encoder_meta = encoder.eval(), encoder_meta
        self.train_feats, self.train_coords = train_feats, train_coords
        self.knn, self.device = knn, device
        self.fingerprint = fingerprint  # of the config that made the encoder + UMAP (lets stage 1 reuse them)

    def features(self, images: np.ndarray) -> np.ndarray:
        """L2-normalised SimCLR backbone features, float32 [N, encoder.dim]."""
        return encode(self.encoder.to(self.device), images, device=self.device)

    def embed(self, images: np.ndarray, progress: bool = False) -> np.ndarray:
        return knn_embed(self.features(images), self.train_feats, self.train_coords, self.knn)

    def embed_train(self, train_images: np.ndarray, indices: np.ndarray) -> np.ndarray:
        return self.train_coords[indices]  # UMAP placed the training images themselves

    def save(self, directory: Path) -> None:
        save_encoder(self.encoder, self.encoder_meta, directory / "encoder.safetensors")
        save_npz(directory / "space.npz", train_features=self.train_feats, train_coords=self.train_coords)
        write_json(directory / "space.json", {"kind": self.kind, "knn": self.knn, "fingerprint": self.fingerprint})

    @classmethod
    def load(cls, directory: Path, meta: dict, device: torch.device | str = "cpu") -> "SimclrUmapSpace":
        encoder, enc_meta = load_encoder(directory / "encoder.safetensors")
        arrays = load_npz(directory / "space.npz", ("train_features", "train_coords"))
        return cls(encoder, enc_meta, arrays["train_features"], arrays["train_coords"], int(meta["knn"]), device,
                   meta.get("fingerprint", ""))


class PcaSpace:
    """PCA of the pixels in [0, 1]: X = (x - mean) @ components.T (the simple baseline)."""

    kind = "pca"

    def __init__(self, mean: np.ndarray, components: np.ndarray):
        self.mean, self.components = mean.astype(np.float32), components.astype(np.float32)

    @classmethod
    def fit(cls, images: np.ndarray, dim: int, seed: int = 0) -> "PcaSpace":
        from sklearn.decomposition import PCA

        x = images.reshape(len(images), -1).astype(np.float32) / 255.0
        pca = PCA(n_components=min(dim, *x.shape), random_state=seed).fit(x)
        return cls(pca.mean_, pca.components_)

    def embed(self, images: np.ndarray, progress: bool = False) -> np.ndarray:
        x = images.reshape(len(images), -1).astype(np.float32) / 255.0
        return (x - self.mean) @ self.components.T

    def embed_train(self, train_images: np.ndarray, indices: np.ndarray) -> np.ndarray:
        return self.embed(train_images[indices])

    def save(self, directory: Path) -> None:
        save_npz(directory / "space.npz", mean=self.mean, components=self.components)
        write_json(directory / "space.json", {"kind": self.kind})

    @classmethod
    def load(cls, directory: Path, meta: dict, device: torch.device | str = "cpu") -> "PcaSpace":
        a = load_npz(directory / "space.npz", ("mean", "components"))
        return cls(a["mean"], a["components"])


def save_encoder(model: ConvEncoder, meta: dict, path: Path) -> None:
    """Encoder weights + its constructor arguments (safetensors metadata holds the JSON)."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp),
                  metadata={"meta": json.dumps(meta, sort_keys=True)})


def load_encoder(path: Path, fix: str = REBUILD) -> tuple[ConvEncoder, dict]:
    if not path.is_file():
        raise UserError(f"{path} is missing: run `python -m dpt_fast.stage --stage 1` first")
    try:
        meta = json.loads(safetensors_metadata(path, fix).get("meta", "{}"))
        model = ConvEncoder(meta["in_chans"], meta["width"], meta["feature_dim"])
        model.load_state_dict(load_safetensors(path, fix, finite=True))
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"{path}: not an encoder written by stage 1 ({type(e).__name__}); {fix}") from None
    return model.eval(), meta




IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PRECISIONS = ("auto", "fp32", "tf32", "bf16", "fp16")


class BackboneSpace:
    """Frozen backbone features, each row centred (minus its own mean) and L2-normalised.

    `name="msn"`: an official MSN checkpoint through `models.msn.load_msn` (DPT's stage-1 feature: the CLS
    token after the last block, before the final norm); any other name: a timm model (`num_classes=0`). Rows
    are preprocessed as the paper's classifier wants them (cyanure `preprocess(centering=True, normalize=True,
    columns=False)` works on rows). Weights come from a local file through `models.weights.read_weights`
    (safetensors, or torch files with weights_only=True); nothing is downloaded.

    Input transform, for every backbone: the MSN / DPT evaluation transform -- torchvision `Resize(R)`
    (bilinear, antialiased) + `CenterCrop(S)`, then ToTensor and the model's mean/std (ImageNet's for MSN) --
    with S the input side (`image_size`, else the model's: 224 for MSN) and R = round(S / crop) (`crop`
    0 = the backbone's: 0.875 for MSN, i.e. Resize 256 + CenterCrop 224, as DPT; 1.0 for timm models). Files
    streamed from an ImageFolder are decoded with exactly that transform (`source_for`: PIL as torchvision
    does it, or DALI within a grey level); in-memory arrays and generated images get it on uint8 tensors
    (a 256 px generated image is not resized, only cropped: exact). Grey images are repeated to 3 channels.

    Speed (`precision`): "auto" = bf16 autocast with TF32 on CUDA, fp32 on CPU; "fp16" = the official
    accelerate `--mixed_precision fp16`; "tf32" / "fp32" = fp32 weights with / without TF32. On CUDA the
    images travel from pinned memory without blocking and the network runs channels_last.
    """

    kind = "backbone"

    def __init__(self, name: str, weights: str, device: torch.device | str = "cpu", image_size: int = 0,
                 batch_size: int = 128, crop: float = 0.0, precision: str = "auto"):
        path = Path(weights).expanduser()
        if not weights or not path.is_file():
            raise UserError(f"stage1.backbone_weights={weights!r}: no such file; point it at local weights for "
                            f"stage1.backbone={name or '<msn or a timm name>'} (nothing is downloaded)")
        if precision not in PRECISIONS:
            raise UserError(f"stage1.backbone_precision={precision!r} is not one of {', '.join(PRECISIONS)}")
        self.device = torch.device(device)
        if name == "msn":
            from .msn import load_msn

            model = load_msn(path)
            side, mean, std, default_crop = image_size or 224, IMAGENET_MEAN, IMAGENET_STD, 0.875
        else:
            model, side, mean, std = _timm_backbone(name, path, image_size)
            default_crop = 1.0
        self.name, self.weights, self.batch_size = name, str(path.resolve()), batch_size
        self.image_size, self.crop = image_size, crop or default_crop
        self.input_size = (side, side)
        self.resize = int(round(side / self.crop))
        self.precision = precision if precision != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        self.mean = torch.tensor(mean).view(1, 3, 1, 1).to(self.device)
        self.std = torch.tensor(std).view(1, 3, 1, 1).to(self.device)
        self.model = model.eval().requires_grad_(False).to(self.device)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.dim = int(model.num_features)

    def identity(self) -> dict:
        """What the features of an image depend on (keys the on-disk feature caches): model, weights, input."""
        st = Path(self.weights).stat()
        return {"backbone": self.name, "weights": self.weights, "weights_bytes": st.st_size,
                "weights_mtime_ns": st.st_mtime_ns, "input_size": list(self.input_size), "crop": self.crop,
                "resize": self.resize, "precision": self.precision}

    def source_for(self, source):
        """(source, transformed): an ImageFolder source re-decoded with this backbone's transform (then
        `embed_tensor(..., transformed=True)`), any other source as it is."""
        from ..data.stream import FolderSource

        if isinstance(source, FolderSource):
            return source.with_crop(self.input_size[0], "eval", self.resize), True
        return source, False

    def transform(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [n, C, H, W] -> uint8 [n, C, S, S]: Resize(R) + CenterCrop(S), as torchvision on tensors."""
        import torchvision.transforms.functional as TF

        x = TF.resize(images, [self.resize], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        return TF.center_crop(x, list(self.input_size))

    def _forward_context(self):
        if self.device.type != "cuda":
            return torch.autocast("cpu", torch.bfloat16) if self.precision == "bf16" else contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(_tf32(self.precision != "fp32"))
        if self.precision in ("bf16", "fp16"):
            stack.enter_context(torch.autocast("cuda", torch.bfloat16 if self.precision == "bf16" else torch.float16))
        return stack

    @torch.no_grad()
    def embed_tensor(self, images: torch.Tensor, transformed: bool = False) -> torch.Tensor:
        """uint8 [n, C, H, W] (C = 1 or 3, on any device) -> float32 [n, dim] on the CPU.

        transformed: the images already went through this backbone's Resize + CenterCrop (`source_for`)."""
        if images.device.type == "cpu" and self.device.type == "cuda":
            images = images.pin_memory()
        x = images.to(self.device, non_blocking=True)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if not transformed:
            x = self.transform(x)
        x = (x.float().div_(255.0) - self.mean) / self.std
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with self._forward_context():
            f = self.model(x).float()
        return F.normalize(f - f.mean(dim=1, keepdim=True), dim=1).cpu()

    def embed(self, images: np.ndarray, progress: bool = False) -> np.ndarray:
        from tqdm.auto import tqdm

        out = [self.embed_tensor(torch.as_tensor(images[i:i + self.batch_size]))
               for i in tqdm(range(0, len(images), self.batch_size), desc="backbone features", disable=not progress)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.dim), np.float32)

    def embed_train(self, train_images: np.ndarray, indices: np.ndarray) -> np.ndarray:
        return self.embed(train_images[indices])

    def save(self, directory: Path) -> None:
        write_json(directory / "space.json", {"kind": self.kind, "backbone": self.name, "weights": self.weights,
                                              "image_size": self.image_size, "crop": self.crop,
                                              "batch_size": self.batch_size, "dim": self.dim,
                                              "precision": self.precision})

    @classmethod
    def load(cls, directory: Path, meta: dict, device: torch.device | str = "cpu") -> "BackboneSpace":
        return cls(meta["backbone"], meta["weights"], device, int(meta.get("image_size", 0)),
                   int(meta.get("batch_size", 128)), float(meta.get("crop", 1.0)), meta.get("precision", "auto"))


@contextlib.contextmanager
def _tf32(on: bool):
    """TF32 matmuls and convolutions on CUDA while inside (fp32 weights at tensor-core speed)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _timm_backbone(name: str, path: Path, image_size: int):
    """(model, input side, mean, std) of a timm backbone with local weights."""
    import timm

    kwargs = {"img_size": image_size} if image_size else {}
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    except RuntimeError as e:  # timm: "Unknown model (...)"
        raise UserError(f"stage1.backbone={name}: {e}; use msn or a timm model name") from None
    except TypeError:
        raise UserError(f"stage1.backbone={name} takes no image size; set stage1.backbone_image_size=0") from None
    missing, _ = model.load_state_dict(read_weights(path, hint=f"pass weights of the timm model {name}"), strict=False)
    if missing:
        raise UserError(f"{path}: {len(missing)} weights of {name} are missing (e.g. {missing[0]}); "
                        "is it a checkpoint of this architecture?")
    cfg = timm.data.resolve_model_data_config(model)
    return model, image_size or int(cfg["input_size"][-1]), tuple(cfg["mean"]), tuple(cfg["std"])


_SPACES = {"simclr_umap": SimclrUmapSpace, "pca": PcaSpace, "backbone": BackboneSpace}


def load_space(directory: str | Path, device: torch.device | str = "cpu") -> Space:
    """The representation stage 1 saved in `directory` (its space.json names the kind)."""
    directory = Path(directory)
    path = directory / "space.json"
    if not path.is_file():
        raise UserError(f"{path} is missing: run `python -m dpt_fast.stage --stage 1` first")
    meta = read_json(path)
    kind = meta.get("kind")
    if kind not in _SPACES:
        raise UserError(f"{path}: unknown representation kind {kind!r}; re-run --stage 1 with this version")
    return _SPACES[kind].load(directory, meta, device)
