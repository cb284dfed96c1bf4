"""Classifiers of the FreeMatch / FixMatch learner: TorchSSL's WideResNet (WRN-28-2 for CIFAR-10, as the paper)
and a small CNN for the embedded data sets.

    net = WideResNet(num_classes=10, depth=28, widen_factor=2)   # TorchSSL models/nets/wrn.py, layer for layer
    net = SmallCNN(in_chans=1, num_classes=10, width=16)         # MNIST-5k / digits
    logits = net(x)                                              # x: float [B, C, H, W], normalised per channel

WideResNet follows TorchSSL (DPT's `cifar10_experiment/TorchSSL/models/nets/wrn.py`) exactly: pre-activation
basic blocks, BatchNorm momentum 0.001 (TensorFlow's 0.999) and eps 0.001, LeakyReLU(0.1), convolutions with
biases, Kaiming-normal (fan_out, leaky_relu gain) convolutions, Xavier-normal linear layer, zero biases; the
first block activates before its residual. The only additions are `in_chans` (grey images) and `bn_momentum`
(TorchSSL hard-codes 0.001: the default here).

SmallCNN is the SimCLR encoder's backbone (`models.encoder.ConvEncoder`: widths w, 2w, 4w at three
resolutions, global average pool) with a linear head, so a SimCLR encoder's weights can start it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .encoder import ConvEncoder

ARCHS = ("wrn28_2", "cnn")


class BasicBlock(nn.Module):
    """Pre-activation residual block (BN -> LeakyReLU -> conv3x3 -> BN -> LeakyReLU -> conv3x3)."""

    def __init__(self, cin: int, cout: int, stride: int, activate_before_residual: bool, bn_momentum: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, momentum=bn_momentum, eps=0.001)
        self.relu1 = nn.LeakyReLU(0.1)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=True)
        self.bn2 = nn.BatchNorm2d(cout, momentum=bn_momentum, eps=0.001)
        self.relu2 = nn.LeakyReLU(0.1)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=True)
        self.equal_in_out = cin == cout
        self.shortcut = None if self.equal_in_out else nn.Conv2d(cin, cout, 1, stride, 0, bias=True)
        self.activate_before_residual = activate_before_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # TorchSSL: with a shortcut conv and activate_before_residual, the shortcut sees the activated input.
        # Otherwise a block that changes width feeds its conv the raw input (its bn1 is computed, unused).
        if not self.equal_in_out and self.activate_before_residual:
            x = out = self.relu1(self.bn1(x))
        else:
            out = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(out if self.equal_in_out else x)))
        out = self.conv2(out)
        return (x if self.equal_in_out else self.shortcut(x)) + out


class WideResNet(nn.Module):
    """WRN-depth-k (TorchSSL): 16 -> 16k -> 32k -> 64k channels, (depth - 4) / 6 blocks per group."""

    def __init__(self, num_classes: int, depth: int = 28, widen_factor: int = 2, in_chans: int = 3,
                 first_stride: int = 1, bn_momentum: float = 0.001):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_chans, ch[0], 3, 1, 1, bias=True)

        def group(cin: int, cout: int, stride: int, abr: bool) -> nn.Sequential:
            return nn.Sequential(*[BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, abr, bn_momentum)
                                   for i in range(n)])

        self.block1 = group(ch[0], ch[1], first_stride, True)
        self.block2 = group(ch[1], ch[2], 2, False)
        self.block3 = group(ch[2], ch[3], 2, False)
        self.bn1 = nn.BatchNorm2d(ch[3], momentum=bn_momentum, eps=0.001)
        self.relu = nn.LeakyReLU(0.1)
        self.fc = nn.Linear(ch[3], num_classes)
        self.dim = ch[3]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.adaptive_avg_pool2d(self.relu(self.bn1(out)), 1).flatten(1)
        return self.fc(out)


class SmallCNN(nn.Module):
    """The SimCLR encoder's conv backbone (`ConvEncoder`, width w) + a linear classifier on its 4w features."""

    def __init__(self, in_chans: int, num_classes: int, width: int = 16, bn_momentum: float = 0.01):
        super().__init__()
        self.backbone = ConvEncoder(in_chans, width, feature_dim=1).backbone
        for m in self.backbone.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = bn_momentum
        self.dim = 4 * width
        self.fc = nn.Linear(self.dim, num_classes)
        # NHWC lets oneDNN run the convolutions and pools faster on CPU (as ConvEncoder).
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x.contiguous(memory_format=torch.channels_last)))


def build_net(arch: str, in_chans: int, num_classes: int, width: int = 16, bn_momentum: float = 0.001) -> nn.Module:
    """`arch` in ARCHS: wrn28_2 (TorchSSL's WRN-28-2) or cnn (SmallCNN of `width`)."""
    if arch == "wrn28_2":
        return WideResNet(num_classes, 28, 2, in_chans=in_chans, bn_momentum=bn_momentum)
    if arch == "cnn":
        return SmallCNN(in_chans, num_classes, width, bn_momentum)
    raise ValueError(f"unknown learner net {arch!r}; use one of {ARCHS}")
