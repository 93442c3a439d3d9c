"""A corpus of architectures poetc was not designed for, exported the way their authors' tools did.

Each entry is a small (CPU-friendly), seeded torch version of a well-known architecture family,
exported with the exporter settings and op choices that make such models hard to import: heads
without Flatten (``[N, C, 1, 1]`` logits), residual joins written as ``Sum``, ``LRN``, grouped
convolutions with channel shuffles, inception-style ``Concat``, dense blocks, torch's own
``nn.TransformerEncoder`` (one-output ``LayerNormalization``, ``Dropout`` in training mode),
embeddings with attention, ``HardSwish``/``HardSigmoid``, ``Resize``, ``PRelu``/``Elu`` and an old
opset (9). Nothing here is adjusted for poetc: ``poetc.importer`` must handle what the export holds
(``tests/test_corpus.py``; table in docs/corpus.md).

``export_corpus(name, path, batch)`` writes the forward model; ``CORPUS`` lists the entries.
"""

from __future__ import annotations

import dataclasses
import io
import pathlib
import warnings
from typing import Callable

import onnx
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CorpusEntry", "CORPUS", "corpus_model", "export_corpus"]


# -------------------------------------------------------------------------------------------------
# ops written the way older exporters wrote them


class _LRN(torch.autograd.Function):
    """torch's local_response_norm, exported as the ONNX LRN op (as Caffe2/old exporters did)."""

    @staticmethod
    def forward(ctx, x, size: int, alpha: float, beta: float, k: float):  # noqa: D102
        return F.local_response_norm(x, size, alpha, beta, k)

    @staticmethod
    def symbolic(g, x, size, alpha, beta, k):  # noqa: D102
        return g.op("LRN", x, size_i=size, alpha_f=alpha, beta_f=beta, bias_f=k)


class LRN(nn.Module):
    def __init__(self, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0):
        super().__init__()
        self.args = (size, alpha, beta, k)

    def forward(self, x):
        return _LRN.apply(x, *self.args)


class _Sum(torch.autograd.Function):
    """a + b exported as the variadic ONNX Sum (as Caffe2-era zoo models have it)."""

    @staticmethod
    def forward(ctx, a, b):  # noqa: D102
        return a + b

    @staticmethod
    def symbolic(g, a, b):  # noqa: D102
        return g.op("Sum", a, b)


def _init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            m.weight.data.mul_(0.5)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: nn.Module | None = None):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), act if act is not None else nn.ReLU())


# -------------------------------------------------------------------------------------------------
# architectures


class SqueezeNet(nn.Module):
    """SqueezeNet 1.1-style: Fire modules (1x1 squeeze, 1x1 and 3x3 expand, Concat), a 1x1 conv
    classifier and global average pooling without Flatten, so the logits are [N, classes, 1, 1]."""

    class Fire(nn.Module):
        def __init__(self, cin, squeeze, expand):
            super().__init__()
            self.squeeze = nn.Sequential(nn.Conv2d(cin, squeeze, 1), nn.ReLU())
            self.e1 = nn.Sequential(nn.Conv2d(squeeze, expand, 1), nn.ReLU())
            self.e3 = nn.Sequential(nn.Conv2d(squeeze, expand, 3, padding=1), nn.ReLU())

        def forward(self, x):
            s = self.squeeze(x)
            return torch.cat([self.e1(s), self.e3(s)], 1)

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU(), nn.MaxPool2d(2),
            self.Fire(32, 8, 32), self.Fire(64, 8, 32), nn.MaxPool2d(2), self.Fire(64, 16, 48))
        self.head = nn.Sequential(nn.Conv2d(96, classes, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        return self.head(self.features(x))


class AlexNetLRN(nn.Module):
    """AlexNet-era: Conv + ReLU + LRN + MaxPool twice, then three convs and a Linear classifier."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 24, 5, 1, 2), nn.ReLU(), LRN(), nn.MaxPool2d(2),
            nn.Conv2d(24, 48, 3, 1, 1), nn.ReLU(), LRN(), nn.MaxPool2d(2),
            nn.Conv2d(48, 64, 3, 1, 1), nn.ReLU(), nn.Conv2d(64, 48, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(48 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class GoogLeNet(nn.Module):
    """Inception v1-style: a stem with LRN, inception modules (1x1, 1x1-3x3, 1x1-5x5, pool-1x1
    branches joined by Concat), global average pooling, Flatten, Linear."""

    class Inception(nn.Module):
        def __init__(self, cin, c1, c3r, c3, c5r, c5, cp):
            super().__init__()
            self.b1 = _cbr(cin, c1, 1)
            self.b3 = nn.Sequential(_cbr(cin, c3r, 1), _cbr(c3r, c3, 3))
            self.b5 = nn.Sequential(_cbr(cin, c5r, 1), _cbr(c5r, c5, 5))
            self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1), _cbr(cin, cp, 1))

        def forward(self, x):
            return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], 1)

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1), nn.ReLU(), LRN(), nn.MaxPool2d(2))
        self.blocks = nn.Sequential(self.Inception(32, 16, 16, 24, 4, 8, 8), self.Inception(56, 24, 24, 32, 8, 16, 16),
                                    nn.MaxPool2d(2), self.Inception(88, 32, 24, 48, 8, 16, 16))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(112, classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleNetV1(nn.Module):
    """ShuffleNet v1-style units: grouped 1x1 conv, channel shuffle (Reshape/Transpose/Reshape),
    depthwise 3x3, grouped 1x1; residual Add at stride 1, AvgPool shortcut Concat at stride 2."""

    class Unit(nn.Module):
        def __init__(self, cin, cout, stride, groups):
            super().__init__()
            self.stride, self.groups = stride, groups
            mid = cout // 4
            out = cout - cin if stride == 2 else cout
            self.g1 = _cbr(cin, mid, 1, groups=groups)
            self.dw = nn.Sequential(nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid))
            self.g2 = nn.Sequential(nn.Conv2d(mid, out, 1, groups=groups, bias=False), nn.BatchNorm2d(out))

        def forward(self, x):
            y = self.g2(self.dw(channel_shuffle(self.g1(x), self.groups)))
            if self.stride == 2:
                return F.relu(torch.cat([F.avg_pool2d(x, 3, 2, 1), y], 1))
            return F.relu(x + y)

    def __init__(self, classes: int = 10, groups: int = 4):
        super().__init__()
        self.stem = _cbr(3, 24, 3)
        self.stages = nn.Sequential(self.Unit(24, 64, 2, groups), self.Unit(64, 64, 1, groups),
                                    self.Unit(64, 128, 2, groups), self.Unit(128, 128, 1, groups))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, classes))

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


class ShuffleNetV2(nn.Module):
    """ShuffleNet v2-style units: channel split (Split), a 1x1-dw3x3-1x1 branch, Concat, shuffle."""

    class Unit(nn.Module):
        def __init__(self, c, stride):
            super().__init__()
            self.stride = stride
            half = c // 2
            cin = c if stride == 2 else half
            self.branch = nn.Sequential(_cbr(cin, half, 1), nn.Conv2d(half, half, 3, stride, 1, groups=half, bias=False),
                                        nn.BatchNorm2d(half), _cbr(half, half, 1))
            self.short = nn.Sequential(nn.Conv2d(c, c, 3, 2, 1, groups=c, bias=False), nn.BatchNorm2d(c),
                                       _cbr(c, half, 1)) if stride == 2 else None

        def forward(self, x):
            if self.stride == 2:
                out = torch.cat([self.short(x), self.branch(x)], 1)
            else:
                a, b = x.chunk(2, dim=1)
                out = torch.cat([a, self.branch(b)], 1)
            return channel_shuffle(out, 2)

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = _cbr(3, 48, 3)
        self.stages = nn.Sequential(self.Unit(48, 2), self.Unit(48, 1), self.Unit(48, 2), self.Unit(48, 1))
        self.head = nn.Sequential(_cbr(48, 96, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(96, classes))

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


class DenseNet(nn.Module):
    """DenseNet-BC-style: dense blocks (BN-ReLU-1x1, BN-ReLU-3x3, Concat with all earlier maps) and
    transitions (BN-ReLU-1x1, AvgPool)."""

    class Layer(nn.Module):
        def __init__(self, cin, growth):
            super().__init__()
            self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, 4 * growth, 1, bias=False),
                                      nn.BatchNorm2d(4 * growth), nn.ReLU(),
                                      nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False))

        def forward(self, x):
            return torch.cat([x, self.body(x)], 1)

    def __init__(self, classes: int = 10, growth: int = 12):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, 24, 3, padding=1, bias=False)]
        c = 24
        for block in range(2):
            for _ in range(4):
                layers.append(self.Layer(c, growth))
                c += growth
            if block == 0:
                layers += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2)]
                c //= 2
        self.features = nn.Sequential(*layers, nn.BatchNorm2d(c), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))

    def forward(self, x):
        return self.head(self.features(x))


class ResNetSum(nn.Module):
    """A ResNet whose residual joins are ONNX Sum nodes (Caffe2-era zoo exports), with PRelu
    activations in the blocks."""

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.c1 = _cbr(cin, cout, 3, stride, act=nn.PReLU(cout))
            self.c2 = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) \
                if stride != 1 or cin != cout else nn.Identity()

        def forward(self, x):
            return F.relu(_Sum.apply(self.c2(self.c1(x)), self.short(x)))

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = _cbr(3, 16, 3)
        self.blocks = nn.Sequential(self.Block(16, 16, 1), self.Block(16, 32, 2), self.Block(32, 32, 1),
                                    self.Block(32, 64, 2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


class MobileNetV3(nn.Module):
    """MobileNetV3-Small-style: HardSwish, squeeze-excite with HardSigmoid gates, depthwise convs."""

    class Block(nn.Module):
        def __init__(self, cin, exp, cout, k, stride, se, act):
            super().__init__()
            self.res = stride == 1 and cin == cout
            self.expand = _cbr(cin, exp, 1, act=act())
            self.dw = _cbr(exp, exp, k, stride, groups=exp, act=act())
            self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(exp, exp // 4, 1), nn.ReLU(),
                                    nn.Conv2d(exp // 4, exp, 1), nn.Hardsigmoid()) if se else None
            self.project = nn.Sequential(nn.Conv2d(exp, cout, 1, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = self.dw(self.expand(x))
            if self.se is not None:
                y = y * self.se(y)
            y = self.project(y)
            return x + y if self.res else y

    def __init__(self, classes: int = 10):
        super().__init__()
        hs, re = nn.Hardswish, nn.ReLU
        self.stem = _cbr(3, 16, 3, 2, act=hs())
        self.blocks = nn.Sequential(self.Block(16, 32, 16, 3, 1, True, re), self.Block(16, 48, 24, 3, 2, False, re),
                                    self.Block(24, 64, 24, 3, 1, False, re), self.Block(24, 96, 40, 5, 2, True, hs),
                                    self.Block(40, 120, 40, 5, 1, True, hs))
        self.head = nn.Sequential(_cbr(40, 96, 1, act=hs()), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(96, 64), nn.Hardswish(), nn.Linear(64, classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


class UNet(nn.Module):
    """U-Net-style encoder/decoder: MaxPool down, nearest Resize up, skip Concats, ELU
    activations; a per-pixel regression output (trained with --loss mse)."""

    def __init__(self):
        super().__init__()
        elu = nn.ELU
        self.d1 = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), elu(), nn.Conv2d(16, 16, 3, padding=1), elu())
        self.d2 = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), elu(), nn.Conv2d(32, 32, 3, padding=1), elu())
        self.mid = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), elu())
        self.u2 = nn.Sequential(nn.Conv2d(96, 32, 3, padding=1), elu())
        self.u1 = nn.Sequential(nn.Conv2d(48, 16, 3, padding=1), elu())
        self.out = nn.Conv2d(16, 1, 1)

    def forward(self, x):
        a = self.d1(x)
        b = self.d2(F.max_pool2d(a, 2))
        m = self.mid(F.max_pool2d(b, 2))
        u = self.u2(torch.cat([F.interpolate(m, scale_factor=2.0, mode="nearest"), b], 1))
        u = self.u1(torch.cat([F.interpolate(u, scale_factor=2.0, mode="nearest"), a], 1))
        return self.out(u)


class TorchEncoder(nn.Module):
    """torch's own nn.TransformerEncoder (post-norm, ReLU, dropout 0.1 in training mode) over
    float features, mean-pooled, Linear classifier."""

    def __init__(self, classes: int = 4, d: int = 64, seq: int = 32):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, 4, dim_feedforward=128, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.encoder(x).mean(1))


class EmbedAttention(nn.Module):
    """Token embedding (Gather) + learned positions + nn.MultiheadAttention + LayerNorm + GELU MLP,
    mean-pooled, Linear classifier."""

    def __init__(self, vocab: int = 500, d: int = 64, seq: int = 32, classes: int = 4):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(1, seq, d) * 0.02)
        self.attn = nn.MultiheadAttention(d, 4, dropout=0.0, batch_first=True)
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 128), nn.GELU(), nn.Linear(128, d))
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        x = self.tok(ids) + self.pos
        h = self.n1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.mlp(self.n2(x))
        return self.head(x.mean(1))


class ViT(nn.Module):
    """Vision-transformer-style: patch embedding conv, class token (Concat), positions, pre-norm
    nn.TransformerEncoderLayer with GELU, the class token's output (Gather) to a Linear head."""

    def __init__(self, classes: int = 10, d: int = 64, patch: int = 4, image: int = 32):
        super().__init__()
        self.embed = nn.Conv2d(3, d, patch, patch)
        n = (image // patch) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, n + 1, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, 4, 128, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        p = self.embed(x).flatten(2).transpose(1, 2)
        p = torch.cat([self.cls.expand(p.shape[0], -1, -1), p], 1) + self.pos
        return self.head(self.norm(self.encoder(p))[:, 0])


class TextCNN(nn.Module):
    """Kim-style text CNN: embedding, Conv1d with kernels 3/4/5, ReLU, max over time (global max
    pooling), Concat, Linear."""

    def __init__(self, vocab: int = 500, d: int = 48, classes: int = 4):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.convs = nn.ModuleList(nn.Conv1d(d, 32, k) for k in (3, 4, 5))
        self.head = nn.Linear(96, classes)

    def forward(self, ids):
        x = self.tok(ids).transpose(1, 2)
        pooled = [F.adaptive_max_pool1d(F.relu(c(x)), 1).squeeze(2) for c in self.convs]
        return self.head(torch.cat(pooled, 1))


class LeNetOld(nn.Module):
    """LeNet-5 with Tanh and average pooling, exported at opset 9 as model-zoo files of that era."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.Tanh(), nn.AvgPool2d(2),
                                  nn.Conv2d(6, 16, 5), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(),
                                  nn.Linear(16 * 5 * 5, 120), nn.Tanh(), nn.Linear(120, 84), nn.Tanh(),
                                  nn.Linear(84, classes))

    def forward(self, x):
        return self.body(x)


# -------------------------------------------------------------------------------------------------
# registry and export


@dataclasses.dataclass(frozen=True)
class CorpusEntry:
    name: str
    family: str
    builder: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # without the batch axis
    input_dtype: str = "float32"
    vocab: int | None = None
    loss: str = "cross_entropy"
    opset: int = 17
    exercises: str = ""


_IMG = (3, 32, 32)
CORPUS: dict[str, CorpusEntry] = {e.name: e for e in (
    CorpusEntry("squeezenet", "SqueezeNet 1.1", SqueezeNet, _IMG, exercises="global-pool head without Flatten "
                "([N,C,1,1] logits), Fire Concats"),
    CorpusEntry("alexnet_lrn", "AlexNet", AlexNetLRN, _IMG, exercises="LRN"),
    CorpusEntry("googlenet", "GoogLeNet / Inception v1", GoogLeNet, _IMG, exercises="inception Concats, LRN, 5x5"),
    CorpusEntry("shufflenet_v1", "ShuffleNet v1", ShuffleNetV1, _IMG, exercises="grouped 1x1 conv, channel "
                "shuffle (Reshape/Transpose), depthwise, Concat shortcut"),
    CorpusEntry("shufflenet_v2", "ShuffleNet v2", ShuffleNetV2, _IMG, exercises="channel Split, Concat, shuffle"),
    CorpusEntry("densenet", "DenseNet-BC", DenseNet, _IMG, exercises="dense-block Concats"),
    CorpusEntry("resnet_sum", "ResNet (Caffe2-era export)", ResNetSum, _IMG, exercises="residual Sum joins, PRelu"),
    CorpusEntry("mobilenet_v3", "MobileNetV3-Small", MobileNetV3, _IMG, exercises="HardSwish, HardSigmoid SE gates"),
    CorpusEntry("unet", "U-Net", UNet, (3, 32, 32), loss="mse", exercises="nearest Resize, skip Concats, Elu"),
    CorpusEntry("torch_encoder", "nn.TransformerEncoder", TorchEncoder, (32, 64), exercises="torch's stock "
                "encoder: one-output LayerNormalization, Dropout in training mode, attention reshapes"),
    CorpusEntry("embed_attention", "Embedding + nn.MultiheadAttention", EmbedAttention, (32,), "int64", vocab=500,
                exercises="Gather embedding, MultiheadAttention, GELU"),
    CorpusEntry("vit", "Vision Transformer", ViT, _IMG, exercises="patch conv, class-token Concat, pre-norm "
                "encoder, Gather of token 0"),
    CorpusEntry("textcnn", "Kim text CNN", TextCNN, (40,), "int64", vocab=500,
                exercises="Embedding, Conv1d, global max pooling over time"),
    CorpusEntry("lenet_opset9", "LeNet-5 (opset 9)", LeNetOld, (1, 28, 28), opset=9,
                exercises="old opset converted, Tanh, AvgPool"),
)}


def corpus_model(name: str, seed: int = 0) -> nn.Module:
    """The seeded torch module (train mode); the caller's torch RNG state is left untouched."""
    entry = CORPUS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = entry.builder()
        _init(model)
    return model.train()


def example_input(name: str, batch: int, seed: int = 0) -> torch.Tensor:
    entry = CORPUS[name]
    g = torch.Generator().manual_seed(seed)
    if entry.input_dtype == "int64":
        return torch.randint(0, entry.vocab, (batch, *entry.input_shape), generator=g)
    return torch.randn((batch, *entry.input_shape), generator=g)


def export_proto(name: str, batch: int, seed: int = 0, dynamic_batch: bool = False) -> onnx.ModelProto:
    """Export as a user would: torch.onnx.export in training mode, no constant folding, the entry's
    opset, nothing fixed up afterwards (no extra LayerNorm outputs, no IR lowering)."""
    entry = CORPUS[name]
    model = corpus_model(name, seed)
    buf = io.BytesIO()
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)  # dropout masks while tracing
        torch.onnx.export(model, (example_input(name, batch, seed),), buf, dynamo=False, opset_version=entry.opset,
                          input_names=["input"], output_names=["logits"], dynamic_axes=axes,
                          training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False)
    proto = onnx.load_from_string(buf.getvalue())
    proto.graph.name = name
    return proto


def export_corpus(name: str, path: str | pathlib.Path, batch: int, seed: int = 0,
                  dynamic_batch: bool = False) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(export_proto(name, batch, seed, dynamic_batch).SerializeToString())
    return path
