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
- `BackboneSpace`: frozen timm backbone features, centred and L2-normalised (the paper's MSN recipe).

The head is a multinomial logistic regression with an L2 penalty: on backbone features the paper's (no
intercept, lambda = 0.0025 / N on (1/N) sum(loss) + lambda/2 ||w||^2, cyanure's solution: `models.logreg`),
on the other representations scikit-learn's with an intercept (`fit_logreg`). Both are written as strength
C = 1 / (N lambda): the paper's is C = 400.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..utils import UserError, atomic_path, load_npz, read_json, save_npz, write_json
from .encoder import ConvEncoder, encode

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
    def load(cls, path: str | Path) -> "LinearHead":
        t = load_file(str(path))
        return cls(t["coef"].numpy(), t["intercept"].numpy())


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


def load_encoder(path: Path) -> tuple[ConvEncoder, dict]:
    from safetensors import safe_open

    if not path.is_file():
        raise UserError(f"{path} is missing: run `python -m dpt_fast.stage --stage 1` first")
    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("meta", "{}"))
    model = ConvEncoder(meta["in_chans"], meta["width"], meta["feature_dim"])
    model.load_state_dict(load_file(str(path)))
    return model.eval(), meta




class BackboneSpace:
    """Frozen timm backbone features, each row centred (minus its own mean) and L2-normalised.

    This is the paper's recipe for MSN features (cyanure `preprocess(centering=True, normalize=True,
    columns=False)` works on rows). Weights come from a local file (safetensors, or a .pth/.pt/.bin loaded
    with weights_only=True); nothing is downloaded. Each image's central `crop` fraction is resized to the
    model's input size and normalised with its mean/std; grey images are repeated to 3 channels.
    """

    kind = "backbone"

    def __init__(self, name: str, weights: str, device: torch.device | str = "cpu", image_size: int = 0,
                 batch_size: int = 128, crop: float = 1.0):
        import timm

        path = Path(weights).expanduser()
        if not weights or not path.is_file():
            raise UserError(f"stage1.backbone_weights={weights!r}: no such file; point it at local weights for "
                            f"stage1.backbone={name} (nothing is downloaded)")
        kwargs = {"img_size": image_size} if image_size else {}
        try:
            model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        except RuntimeError as e:  # timm: "Unknown model (...)"
            raise UserError(f"stage1.backbone={name}: {e}; use a timm model name") from None
        except TypeError:
            raise UserError(f"stage1.backbone={name} takes no image size; set stage1.backbone_image_size=0") from None
        state = _read_weights(path)
        missing, _ = model.load_state_dict(state, strict=False)
        if missing:
            raise UserError(f"{path}: {len(missing)} weights of {name} are missing (e.g. {missing[0]}); "
                            "is it a checkpoint of this architecture?")
        cfg = timm.data.resolve_model_data_config(model)
        self.name, self.weights, self.device, self.batch_size = name, str(path.resolve()), torch.device(device), batch_size
        self.image_size, self.crop = image_size, crop
        self.input_size = (image_size, image_size) if image_size else tuple(cfg["input_size"][1:])
        self.mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1).to(self.device)
        self.std = torch.tensor(cfg["std"]).view(1, 3, 1, 1).to(self.device)
        self.model = model.eval().to(self.device)
        self.dim = int(model.num_features)

    def identity(self) -> dict:
        """What the features of an image depend on (keys the on-disk feature caches): model, weights, input."""
        st = Path(self.weights).stat()
        return {"backbone": self.name, "weights": self.weights, "weights_bytes": st.st_size,
                "weights_mtime_ns": st.st_mtime_ns, "input_size": list(self.input_size), "crop": self.crop}

    @torch.no_grad()
    def embed_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [n, C, H, W] (C = 1 or 3, on any device) -> float32 [n, dim] on the CPU."""
        x = images.to(self.device, non_blocking=True).float().div_(255.0)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.crop < 1.0:  # the central crop, at integer offsets (as torchvision's CenterCrop)
            h, w = x.shape[2:]
            ch, cw = max(1, round(h * self.crop)), max(1, round(w * self.crop))
            top, left = (h - ch) // 2, (w - cw) // 2
            x = x[:, :, top:top + ch, left:left + cw]
        if tuple(x.shape[2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bicubic", antialias=True, align_corners=False)
        f = self.model((x - self.mean) / self.std).float()
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
                                              "batch_size": self.batch_size, "dim": self.dim})

    @classmethod
    def load(cls, directory: Path, meta: dict, device: torch.device | str = "cpu") -> "BackboneSpace":
        return cls(meta["backbone"], meta["weights"], device, int(meta.get("image_size", 0)),
                   int(meta.get("batch_size", 128)), float(meta.get("crop", 1.0)))


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a weights-only torch file; common wrappers and prefixes removed."""
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
            raise UserError(f"{path}: cannot read weights ({type(e).__name__}); use safetensors or a plain state dict") from None
    for key in ("state_dict", "model", "target_encoder", "encoder"):  # training checkpoints (MSN: target_encoder)
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise UserError(f"{path}: expected a state dict of tensors")
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


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
