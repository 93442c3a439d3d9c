"""Large training graphs for the solver-scaling benchmark (issue #18). :func:`register` adds them to
``MODELS`` (``poetc bench --scaling`` does, or a bench naming one of them); importing this module
alone changes nothing.

- ``resnet50_cifar``: bottleneck ResNet (3, 4, 6, 3) blocks, widths 16-128 (x4 expansion), CIFAR
  stem, 32x32: about 550 training ops.
- ``resnet101_cifar``: the same with (3, 4, 23, 3) blocks: about 1,000 training ops.
- ``resnet200_cifar``: the same with (3, 24, 36, 3) blocks: about 2,000 training ops.
- ``encoder24`` / ``encoder32``: BERT encoders of 24 / 32 layers, hidden 128, 2 heads, FFN 512,
  seq 128: about 2,300 / 3,000 training ops.

Widths are small so that exporting and lowering stay quick; the graphs' structure (and so the
MILP's size) is what the benchmark needs.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from . import transformer
from .cnn import _init_conv_net, conv_bn_act
from .zoo import MODELS, InputSpec, ModelSpec

__all__ = ["Bottleneck", "BottleneckResNet", "resnet50_cifar", "resnet101_cifar", "resnet200_cifar",
           "encoder24", "encoder32", "SPECS", "register"]


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4), projection shortcut when shapes change."""

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = 4 * width
        self.body = nn.Sequential(conv_bn_act(cin, width, kernel=1), conv_bn_act(width, width, stride=stride),
                                  conv_bn_act(width, cout, kernel=1, act=None))
        self.shortcut: nn.Module = (conv_bn_act(cin, cout, kernel=1, stride=stride, act=None)
                                    if stride != 1 or cin != cout else nn.Identity())
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class BottleneckResNet(nn.Module):
    def __init__(self, blocks: Sequence[int], widths: Sequence[int] = (16, 32, 64, 128), num_classes: int = 10):
        super().__init__()
        self.stem = conv_bn_act(3, widths[0])
        layers: list[nn.Module] = []
        cin = widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths)):
            for j in range(n):
                layers.append(Bottleneck(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = 4 * w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)
        _init_conv_net(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.layers(self.stem(x)))))


def resnet50_cifar(num_classes: int = 10) -> BottleneckResNet:
    return BottleneckResNet((3, 4, 6, 3), num_classes=num_classes)


def resnet101_cifar(num_classes: int = 10) -> BottleneckResNet:
    return BottleneckResNet((3, 4, 23, 3), num_classes=num_classes)


def resnet200_cifar(num_classes: int = 10) -> BottleneckResNet:
    return BottleneckResNet((3, 24, 36, 3), num_classes=num_classes)


def _encoder(layers: int, num_classes: int) -> transformer.BertClassifier:
    return transformer.BertClassifier(transformer.BertConfig(hidden=128, layers=layers, heads=2, ffn=512,
                                                             num_classes=num_classes))


def encoder24(num_classes: int = 2) -> transformer.BertClassifier:
    return _encoder(24, num_classes)


def encoder32(num_classes: int = 2) -> transformer.BertClassifier:
    return _encoder(32, num_classes)


_IMAGE = (InputSpec("input", (3, 32, 32)),)
_TOKENS = (InputSpec("input_ids", (128,), "int64", high=1000),)
SPECS: tuple[ModelSpec, ...] = (
    ModelSpec("resnet50_cifar", "bottleneck ResNet (3,4,6,3), widths 16-128 x4, CIFAR stem, 32x32, 10 classes",
              resnet50_cifar, 16, _IMAGE, 10),
    ModelSpec("resnet101_cifar", "bottleneck ResNet (3,4,23,3), widths 16-128 x4, CIFAR stem, 32x32, 10 classes",
              resnet101_cifar, 16, _IMAGE, 10),
    ModelSpec("resnet200_cifar", "bottleneck ResNet (3,24,36,3), widths 16-128 x4, CIFAR stem, 32x32, 10 classes",
              resnet200_cifar, 16, _IMAGE, 10),
    ModelSpec("encoder24", "BERT encoder 24 layers, hidden 128, 2 heads, FFN 512, seq 128, vocab 1000, 2 classes",
              encoder24, 8, _TOKENS, 2),
    ModelSpec("encoder32", "BERT encoder 32 layers, hidden 128, 2 heads, FFN 512, seq 128, vocab 1000, 2 classes",
              encoder32, 8, _TOKENS, 2),
)


def register() -> None:
    """Add the scaling models to ``MODELS`` (idempotent)."""
    for spec in SPECS:
        MODELS.setdefault(spec.name, spec)
