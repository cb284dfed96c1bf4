"""The small CNN that judges generated digits: our stand-in for Inception on the embedded data sets.

It gives a `feature_dim`-d embedding (FID, precision/recall) and class logits (IS, CAS). The head has no
bias, so its logits are what torch-fidelity calls 'logits_unbiased' and at the same time the classifier's
real logits. Global average pooling makes one architecture serve 28x28 MNIST and 8x8 digits alike.

    net = FeatureNet(in_chans=1, widths=(16, 32, 64), feature_dim=128, num_classes=10, img_size=28)
    feats, logits = net(x)   # x: float [B, 1, 28, 28] in [-1, 1] -> [B, 128], [B, 10]
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class FeatureNet(nn.Module):
    """Stages of two 3x3 conv-BN-ReLU layers, 2x2 max-pooling between stages, global average pool,
    Linear -> ReLU (the features), Linear without bias (the logits).

    `img_size` is not used by the layers; it records the image size the network was trained on, so that
    evaluation can refuse images of another size.
    """

    def __init__(
        self,
        in_chans: int = 1,
        widths: tuple[int, ...] | list[int] = (16, 32, 64),
        feature_dim: int = 128,
        num_classes: int = 10,
        img_size: int = 28,
        dropout: float = 0.2,
    ):
        super().__init__()
        self.in_chans, self.img_size, self.num_classes, self.feature_dim = in_chans, img_size, num_classes, feature_dim
        stages, cin = [], in_chans
        for i, w in enumerate(widths):
            layers = [_conv_bn_relu(cin, w), _conv_bn_relu(w, w)]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            stages.append(nn.Sequential(*layers))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes, bias=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """float [B, C, H, W] in [-1, 1] -> non-negative features [B, feature_dim]."""
        h = self.stages(x)
        return F.relu(self.fc(h.mean(dim=(2, 3))))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float [B, C, H, W] in [-1, 1] -> (features [B, feature_dim], logits [B, num_classes])."""
        f = self.features(x)
        return f, self.head(self.dropout(f))
