"""A BERT-style encoder for sequence classification or embeddings, with explicit per-head attention projections."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from edgesmith.models.registry import register
from edgesmith.models.spec import InputSpec


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out projections (the layout head pruning works on)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape

        def heads(t):  # (b, n, h*d) -> (b, h, n, d); -1 lets a pruned projection keep working
            return t.reshape(b, n, self.num_heads, -1).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        return self.out((attn @ v).transpose(1, 2).reshape(b, n, -1))


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.attention = SelfAttention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.intermediate = nn.Linear(dim, dim * mlp_ratio)
        self.act = nn.GELU()
        self.output = nn.Linear(dim * mlp_ratio, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):  # post-norm, as in BERT
        x = self.norm1(x + self.dropout(self.attention(x)))
        return self.norm2(x + self.dropout(self.output(self.act(self.intermediate(x)))))


class TinyTransformer(nn.Module):
    """`output: classes` returns class scores; `output: embedding` the embedding (mean-pooled tokens through a
    projection), the classifier kept but unused, so weights trained with `classes` load into both."""

    def __init__(self, vocab_size: int, seq_len: int, dim: int, depth: int, num_heads: int, mlp_ratio: int,
                 num_classes: int, dropout: float, pooling: str = "first", output: str = "classes"):
        super().__init__()
        if pooling not in ("first", "mean") or output not in ("classes", "embedding"):
            raise ValueError(f"pooling must be first or mean (got {pooling!r}); output classes or embedding "
                             f"(got {output!r})")
        self.pooling, self.output = pooling, output
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.position_embedding = nn.Parameter(torch.zeros(1, seq_len, dim))
        self.embedding_norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(EncoderLayer(dim, num_heads, mlp_ratio, dropout) for _ in range(depth))
        # the embedding head: what a sentence encoder returns; the first-token classifier has none (BERT's layout)
        self.embedding_head = nn.Linear(dim, dim) if pooling == "mean" else None
        self.classifier = nn.Linear(dim, num_classes)
        nn.init.normal_(self.position_embedding, std=0.02)
        self.input_spec = (InputSpec("input_ids", (1, seq_len), dtype="int64", dynamic_axes={0: "batch", 1: "seq"},
                                     value_range=(0, vocab_size)),)

    def forward(self, input_ids):
        x = self.token_embedding(input_ids) + self.position_embedding[:, : input_ids.shape[1]]
        x = self.embedding_norm(x)
        for layer in self.layers:
            x = layer(x)
        if self.embedding_head is None:
            return self.classifier(x[:, 0])  # first token pools the sequence, as BERT's [CLS]
        embedding = self.embedding_head(x.mean(1))
        return embedding if self.output == "embedding" else self.classifier(torch.tanh(embedding))


@register()
def tiny_transformer(vocab_size: int = 1000, seq_len: int = 64, dim: int = 64, depth: int = 2, num_heads: int = 4,
                     mlp_ratio: int = 4, num_classes: int = 2, dropout: float = 0.1, pooling: str = "first",
                     output: str = "classes") -> nn.Module:
    """BERT-style encoder: token embedding, multi-head self-attention, LayerNorm, GELU feed-forward; an embedding
    model with pooling: mean, output: embedding."""
    return TinyTransformer(vocab_size, seq_len, dim, depth, num_heads, mlp_ratio, num_classes, dropout, pooling,
                           output)
