"""dpt_fast.models.wrn.WideResNet against a faithful copy of TorchSSL's models/nets/wrn.py (DPT's
cifar10_experiment/TorchSSL): same modules in the same order, so the same seed gives the same weights and outputs."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from dpt_fast.models.wrn import SmallCNN, WideResNet, build_net


# ---- TorchSSL's WideResNet (official code, copied; unused options removed) ----
class _BasicBlock(nn.Module):
    def __init__(self, in_planes, out_planes, stride, drop_rate=0.0, activate_before_residual=False):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes, momentum=0.001, eps=0.001)
        self.relu1 = nn.LeakyReLU(negative_slope=0.1, inplace=False)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(out_planes, momentum=0.001, eps=0.001)
        self.relu2 = nn.LeakyReLU(negative_slope=0.1, inplace=False)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=True)
        self.drop_rate = drop_rate
        self.equalInOut = in_planes == out_planes
        self.convShortcut = (not self.equalInOut) and nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride,
                                                                padding=0, bias=True) or None
        self.activate_before_residual = activate_before_residual

    def forward(self, x):
        if not self.equalInOut and self.activate_before_residual:
            x = self.relu1(self.bn1(x))
        else:
            out = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(out if self.equalInOut else x)))
        out = self.conv2(out)
        return torch.add(x if self.equalInOut else self.convShortcut(x), out)


class _NetworkBlock(nn.Module):
    def __init__(self, nb_layers, in_planes, out_planes, block, stride, drop_rate=0.0, activate_before_residual=False):
        super().__init__()
        self.layer = nn.Sequential(*[block(i == 0 and in_planes or out_planes, out_planes, i == 0 and stride or 1,
                                           drop_rate, activate_before_residual) for i in range(int(nb_layers))])

    def forward(self, x):
        return self.layer(x)


class _WideResNet(nn.Module):
    def __init__(self, first_stride, num_classes, depth=28, widen_factor=2, drop_rate=0.0):
        super().__init__()
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        n = (depth - 4) / 6
        self.conv1 = nn.Conv2d(3, channels[0], kernel_size=3, stride=1, padding=1, bias=True)
        self.block1 = _NetworkBlock(n, channels[0], channels[1], _BasicBlock, first_stride, drop_rate, True)
        self.block2 = _NetworkBlock(n, channels[1], channels[2], _BasicBlock, 2, drop_rate)
        self.block3 = _NetworkBlock(n, channels[2], channels[3], _BasicBlock, 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(channels[3], momentum=0.001, eps=0.001)
        self.relu = nn.LeakyReLU(negative_slope=0.1, inplace=False)
        self.fc = nn.Linear(channels[3], num_classes)
        self.channels = channels[3]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight.data)
                m.bias.data.zero_()

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        out = F.adaptive_avg_pool2d(out, 1).view(-1, self.channels)
        return self.fc(out)


def test_wrn28_2_equals_torchssl_wideresnet_weights_and_outputs():
    torch.manual_seed(0)
    ref = _WideResNet(first_stride=1, num_classes=10)
    torch.manual_seed(0)
    ours = build_net("wrn28_2", 3, 10)
    assert isinstance(ours, WideResNet)
    ref_p, our_p = list(ref.state_dict().values()), list(ours.state_dict().values())
    assert len(ref_p) == len(our_p)
    for a, b in zip(ref_p, our_p):
        assert torch.equal(a, b)
    assert [n for n, _ in ours.named_parameters()] != [] and \
        sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    x = torch.randn(4, 3, 32, 32)
    for mode in ("train", "eval"):
        getattr(ref, mode)(), getattr(ours, mode)()
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)
    # the training-mode passes updated the running statistics alike (momentum 0.001)
    for a, b in zip(ref.state_dict().values(), ours.state_dict().values()):
        assert torch.equal(a, b)
    bns = [m for m in ours.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.momentum == 0.001 and m.eps == 0.001 for m in bns)
    assert all(m.negative_slope == 0.1 for m in ours.modules() if isinstance(m, nn.LeakyReLU))


def test_small_cnn_classifies_grey_images_of_any_embedded_size():
    for side in (8, 28):
        net = SmallCNN(1, 10, width=8, bn_momentum=0.01)
        assert net(torch.randn(3, 1, side, side)).shape == (3, 10)
    assert all(m.momentum == 0.01 for m in net.modules() if isinstance(m, nn.BatchNorm2d))
