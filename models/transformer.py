"""BERT-style encoder classifier with hand-written attention.

Attention is spelled out with MatMul/Softmax rather than
``nn.MultiheadAttention`` so that the ONNX export contains only standard ops
with gradient builders in onnxruntime-training. Reshapes use a ``-1`` batch
dimension and constant sequence/head sizes, which keeps the graph free of
Shape/Gather/Concat chains and works with a symbolic batch dimension.
There is no dropout and no attention mask (every position is a real token).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["Dense", "BertConfig", "BertClassifier", "bert_tiny", "bert_small"]


class BertConfig:
    """Hyper-parameters of :class:`BertClassifier`."""

    def __init__(self, vocab_size: int = 1000, seq_len: int = 128, hidden: int = 128,
                 layers: int = 2, heads: int = 2, ffn: int = 512, num_classes: int = 2,
                 layer_norm_eps: float = 1e-12):
        if hidden % heads:
            raise ValueError("hidden must be divisible by heads")
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.hidden = hidden
        self.layers = layers
        self.heads = heads
        self.ffn = ffn
        self.num_classes = num_classes
        self.layer_norm_eps = layer_norm_eps


class Dense(nn.Module):
    """Affine map with the weight stored as ``[in, out]``.

    ``nn.Linear`` on a 3-D input exports (with constant folding off, as
    training export needs) as ``Transpose(weight)`` + MatMul + Add; storing
    the weight pre-transposed gives a plain MatMul + Add on the parameter.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight) + self.bias


class SelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.seq_len, self.heads = cfg.seq_len, cfg.heads
        self.head_dim = cfg.hidden // cfg.heads
        self.hidden = cfg.hidden
        self.query = Dense(cfg.hidden, cfg.hidden)
        self.key = Dense(cfg.hidden, cfg.hidden)
        self.value = Dense(cfg.hidden, cfg.hidden)
        self.out = Dense(cfg.hidden, cfg.hidden)
        self.scale = 1.0 / math.sqrt(self.head_dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        # [B, T, H] -> [B, heads, T, head_dim]
        return x.reshape(-1, self.seq_len, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self._split(self.query(x))
        k = self._split(self.key(x))
        v = self._split(self.value(x))
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scale
        probs = torch.softmax(scores, dim=-1)
        ctx = torch.matmul(probs, v).transpose(1, 2).reshape(-1, self.seq_len, self.hidden)
        return self.out(ctx)


class EncoderLayer(nn.Module):
    """Post-LayerNorm transformer layer (as in BERT) with a GELU feed-forward."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = SelfAttention(cfg)
        self.norm1 = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.ffn_in = Dense(cfg.hidden, cfg.ffn)
        self.act = nn.GELU()
        self.ffn_out = Dense(cfg.ffn, cfg.hidden)
        self.norm2 = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attention(x))
        return self.norm2(x + self.ffn_out(self.act(self.ffn_in(x))))


class BertClassifier(nn.Module):
    """Token + learned position embeddings, encoder stack, pooler on token 0, classifier."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.position_embedding = nn.Parameter(torch.zeros(1, cfg.seq_len, cfg.hidden))
        self.embedding_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers))
        self.pooler = nn.Linear(cfg.hidden, cfg.hidden)
        self.pooler_act = nn.Tanh()
        self.classifier = nn.Linear(cfg.hidden, cfg.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, Dense)):
                nn.init.normal_(m.weight, 0.0, 0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.position_embedding, 0.0, 0.02)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(input_ids) + self.position_embedding
        x = self.embedding_norm(x)
        for layer in self.layers:
            x = layer(x)
        pooled = self.pooler_act(self.pooler(x[:, 0]))
        return self.classifier(pooled)


def bert_tiny(num_classes: int = 2) -> BertClassifier:
    """2 layers, hidden 128, 2 heads, FFN 512, seq 128, vocab 1000."""
    return BertClassifier(BertConfig(hidden=128, layers=2, heads=2, ffn=512,
                                     num_classes=num_classes))


def bert_small(num_classes: int = 2) -> BertClassifier:
    """4 layers, hidden 256, 4 heads, FFN 1024, seq 128, vocab 1000."""
    return BertClassifier(BertConfig(hidden=256, layers=4, heads=4, ffn=1024,
                                     num_classes=num_classes))
