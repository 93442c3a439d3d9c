"""Convolutional and fully-connected architectures in plain ``torch.nn``.

Every builder returns a freshly initialised module; seeding is the caller's
job (see :func:`models.zoo.instantiate`). Convolutions feeding a BatchNorm
have no bias, as in the reference architectures. Dropout is omitted on
purpose: training must be deterministic so that losses can be compared
bit for bit.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["MLP", "SmallCNN", "ResNet", "BasicBlock", "MobileNetV2", "VGG",
           "mlp", "small_cnn", "resnet18_cifar", "resnet18", "mobilenetv2", "vgg11"]


def _init_conv_net(module: nn.Module) -> None:
    """He-normal convolutions, unit/zero BatchNorm, small-normal classifier."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def conv_bn_act(cin: int, cout: int, kernel: int = 3, stride: int = 1,
                groups: int = 1, act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    """Conv (no bias, 'same' padding for odd kernels) + BatchNorm + activation."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2,
                  groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class MLP(nn.Module):
    """Multi-layer perceptron with ReLU between the hidden layers."""

    def __init__(self, in_features: int = 784, hidden: Sequence[int] = (512, 512, 512),
                 num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Stages of Conv3x3+BN+ReLU+MaxPool2, then Flatten + Linear."""

    def __init__(self, channels: Sequence[int] = (32, 64, 128), image_size: int = 32,
                 in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        stages: list[nn.Module] = []
        cin, size = in_channels, image_size
        for c in channels:
            stages += [conv_bn_act(cin, c), nn.MaxPool2d(2)]
            cin, size = c, size // 2
        self.features = nn.Sequential(*stages)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(cin * size * size, num_classes)
        _init_conv_net(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs, projection shortcut when shapes change."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet with basic blocks.

    ``stem="cifar"``: 3x3 stride-1 convolution, no max-pool (32x32 inputs).
    ``stem="imagenet"``: 7x7 stride-2 convolution followed by 3x3 stride-2 max-pool.
    """

    def __init__(self, blocks: Sequence[int] = (2, 2, 2, 2),
                 widths: Sequence[int] = (64, 128, 256, 512),
                 stem: str = "cifar", num_classes: int = 10):
        super().__init__()
        if stem == "cifar":
            self.stem = conv_bn_act(3, widths[0], kernel=3, stride=1)
        elif stem == "imagenet":
            self.stem = nn.Sequential(conv_bn_act(3, widths[0], kernel=7, stride=2),
                                      nn.MaxPool2d(3, stride=2, padding=1))
        else:
            raise ValueError(f"unknown stem {stem!r}")
        stages: list[nn.Module] = []
        cin = widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths)):
            stride = 1 if i == 0 else 2
            layer = [BasicBlock(cin, w, stride)] + [BasicBlock(w, w) for _ in range(n - 1)]
            stages.append(nn.Sequential(*layer))
            cin = w
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)
        _init_conv_net(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(self.flatten(self.pool(x)))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, linear 1x1 projection."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn_act(cin, hidden, kernel=1, act=nn.ReLU6))
        layers.append(conv_bn_act(hidden, hidden, kernel=3, stride=stride, groups=hidden,
                                  act=nn.ReLU6))
        layers.append(conv_bn_act(hidden, cout, kernel=1, act=None))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


# (expansion t, output channels c, repeats n, first stride s) from the MobileNetV2 paper.
_MOBILENETV2_CFG = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _make_divisible(v: float, divisor: int = 8) -> int:
    out = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * v else out


class MobileNetV2(nn.Module):
    """MobileNetV2 with ReLU6.

    For small inputs (``image_size <= 64``, i.e. CIFAR) the stem and the
    second stage use stride 1 instead of 2, so a 32x32 image reaches the
    head at 4x4 instead of 1x1 (the usual CIFAR adaptation). For 224x224
    the strides are those of the paper.
    """

    def __init__(self, image_size: int = 32, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        cifar = image_size <= 64
        cin = _make_divisible(32 * width)
        last = _make_divisible(1280 * max(1.0, width))
        self.stem = conv_bn_act(3, cin, kernel=3, stride=1 if cifar else 2, act=nn.ReLU6)
        blocks: list[nn.Module] = []
        for i, (t, c, n, s) in enumerate(_MOBILENETV2_CFG):
            if cifar and i == 1:
                s = 1
            cout = _make_divisible(c * width)
            for j in range(n):
                blocks.append(InvertedResidual(cin, cout, s if j == 0 else 1, t))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = conv_bn_act(cin, last, kernel=1, act=nn.ReLU6)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(last, num_classes)
        _init_conv_net(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(self.flatten(self.pool(x)))


_VGG_CFG = {"vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")}


class VGG(nn.Module):
    """VGG with BatchNorm; a single Linear classifier on the 1x1 feature map (CIFAR)."""

    def __init__(self, cfg: Sequence[int | str] = _VGG_CFG["vgg11"], image_size: int = 32,
                 num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        cin, size = 3, image_size
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                size //= 2
            else:
                layers.append(conv_bn_act(cin, int(v)))
                cin = int(v)
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(cin * size * size, num_classes)
        _init_conv_net(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))


def mlp(num_classes: int = 10) -> MLP:
    """784 -> 512 -> 512 -> 512 -> classes, ReLU."""
    return MLP(784, (512, 512, 512), num_classes)


def small_cnn(num_classes: int = 10) -> SmallCNN:
    """3x(Conv3x3+BN+ReLU+MaxPool2) with 32/64/128 channels for 3x32x32 inputs."""
    return SmallCNN((32, 64, 128), image_size=32, num_classes=num_classes)


def resnet18_cifar(num_classes: int = 10) -> ResNet:
    """ResNet-18 with the CIFAR stem (3x32x32 inputs)."""
    return ResNet((2, 2, 2, 2), stem="cifar", num_classes=num_classes)


def resnet18(num_classes: int = 1000) -> ResNet:
    """ResNet-18 with the ImageNet stem (3x224x224 inputs)."""
    return ResNet((2, 2, 2, 2), stem="imagenet", num_classes=num_classes)


def mobilenetv2(num_classes: int = 10, image_size: int = 32) -> MobileNetV2:
    """MobileNetV2 (width 1.0); CIFAR strides for ``image_size <= 64``."""
    return MobileNetV2(image_size=image_size, num_classes=num_classes)


def vgg11(num_classes: int = 10, image_size: int = 32) -> VGG:
    """VGG-11 with BatchNorm for CIFAR."""
    return VGG(_VGG_CFG["vgg11"], image_size=image_size, num_classes=num_classes)
