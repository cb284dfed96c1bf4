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


def classification_accuracy_score(
    train_images_uint8,
    train_labels,
    test_images_uint8,
    test_labels,
    num_classes: int,
    *,
    steps: int = 150,
    batch_size: int = 64,
    widths: tuple[int, ...] = (8, 16, 32),
    feature_dim: int = 64,
    seed: int = 0,
) -> float:
    """Classification Accuracy Score (Ravuri & Vinyals 2019): train a classifier ONLY on `train_images_uint8`
    (e.g. generated images, uint8 [N, C, H, W]) with `train_labels` [N] (their conditioning classes), test it on
    real images (`test_images_uint8`, `test_labels`); returns its top-1 there.

    The classifier is a small FeatureNet (the judge's architecture at a quarter of its width) trained from
    `seed` for a fixed `steps` x `batch_size` (AdamW, one-cycle LR, light shift/rotation augmentation), so the
    score depends on the images, not on how many there are; deterministic for a given thread count, a few
    CPU seconds at 28x28. The same call on an equal number of real training images gives the reference
    ("real-data CAS") the generated score is read against. The global torch RNG is left untouched.
    """
    from .feature_nets import predict, train_feature_net

    x = np.asarray(train_images_uint8.cpu() if torch.is_tensor(train_images_uint8) else train_images_uint8)
    y = _labels(train_labels).numpy()
    epochs = -(-steps * batch_size // max(1, len(x)))  # enough epochs to run `steps` steps
    with torch.random.fork_rng(devices=[]):
        net = train_feature_net(x, y, widths=tuple(widths), feature_dim=feature_dim, epochs=epochs, max_steps=steps,
                                batch_size=batch_size, seed=seed, progress=False, num_classes=num_classes)
    _, logits = predict(net, test_images_uint8)
    return top1(logits, test_labels)


def classification_accuracy_scores(gen_images_uint8, gen_labels, real_train_images_uint8, real_train_labels,
                                   real_test_images_uint8, real_test_labels, num_classes: int, *, steps: int = 150,
                                   seed: int = 0) -> dict:
    """The literature's CAS of generated images and its real-data reference, as stage 2 reports them.

    {'classification_accuracy_score': the classifier trained on the generated images (with their conditioning
    classes), 'classification_accuracy_score_real': the same classifier trained on as many real training images
    per class (true labels, a `seed`-ed choice), 'classification_accuracy_score_steps': steps}; both tested on
    the real test images. See `classification_accuracy_score`.
    """
    gen_y = _labels(gen_labels).numpy()
    real_y = _labels(real_train_labels).numpy()
    rng = np.random.default_rng(seed)
    pick = np.concatenate([rng.permutation(np.flatnonzero(real_y == c))[: int((gen_y == c).sum())]
                           for c in range(num_classes)])
    real_x = np.asarray(real_train_images_uint8)[np.sort(pick)]
    score = lambda x, y: classification_accuracy_score(x, y, real_test_images_uint8, real_test_labels,  # noqa: E731
                                                       num_classes, steps=steps, seed=seed)
    return {"classification_accuracy_score": score(gen_images_uint8, gen_y),
            "classification_accuracy_score_real": score(real_x, real_y[np.sort(pick)]),
            "classification_accuracy_score_steps": steps}
