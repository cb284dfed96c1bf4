"""Accuracy helpers: top-1, per-class accuracy, and the feature network as a classifier (CAS)."""
from __future__ import annotations

import numpy as np
import torch


def _labels(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).long().reshape(-1)


def predictions(pred_or_logits) -> torch.Tensor:
    """int64 [N] class predictions from predictions [N] or logits/probabilities [N, K]."""
    t = torch.as_tensor(np.asarray(pred_or_logits) if not torch.is_tensor(pred_or_logits) else pred_or_logits)
    return t.argmax(1) if t.ndim == 2 else t.long()


def top1(pred_or_logits, labels) -> float:
    """Share of correct predictions, in [0, 1]; `pred_or_logits` is [N] or [N, K]."""
    pred, y = predictions(pred_or_logits), _labels(labels)
    if len(y) == 0:
        return float("nan")
    return float((pred == y).float().mean())


def per_class_accuracy(pred_or_logits, labels, num_classes: int) -> list[float | None]:
    """Accuracy over the images of each true class (None for a class without images)."""
    pred, y = predictions(pred_or_logits), _labels(labels)
    out: list[float | None] = []
    for c in range(num_classes):
        m = y == c
        out.append(float((pred[m] == c).float().mean()) if bool(m.any()) else None)
    return out


def classifier_accuracy(images_uint8, labels, data_name: str, feature_net: str = "", device: str = "cpu") -> float:
    """Top-1 of the evaluation feature network (the shipped one for `data_name`, or `feature_net`) on uint8
    images [N, C, H, W]. For real images with their true labels this is the judge's own accuracy; for generated
    images with their conditioning classes it is the CAS."""
    from .feature_nets import load_feature_net, predict, shipped_feature_net

    net = load_feature_net(feature_net or shipped_feature_net(data_name), device)
    _, logits = predict(net, images_uint8)
    return top1(logits, labels)
