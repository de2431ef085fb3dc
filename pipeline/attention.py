"""`torch.nn.MultiheadAttention` in a form that can lose whole heads.

MultiheadAttention packs q/k/v into one `in_proj_weight` whose rows must equal `embed_dim`, so it can only shrink its
embedding (every head narrower), never drop heads. `SplitHeadAttention` computes the same function with separate
`query/key/value/out` projections — the layout channel pruning removes heads from — and is what a pruned model
keeps; `arch.json` names the modules replaced, so the artifact reloads without pickle.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgesmith.errors import ModelError

SPLIT = "split_head_attention"   # the replacement's name in arch.json


class SplitHeadAttention(nn.Module):
    """MultiheadAttention's call signature and result (self- or cross-attention, key padding and attention masks,
    batch-first or not); attention weights are not returned (None), as with need_weights=False."""

    def __init__(self, embed_dim: int, num_heads: int, bias: bool, batch_first: bool, dropout: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.batch_first, self.dropout = batch_first, dropout
        self.query, self.key, self.value = (nn.Linear(embed_dim, embed_dim, bias=bias) for _ in range(3))
        self.out = nn.Linear(embed_dim, embed_dim, bias=bias)
        # nn.TransformerEncoderLayer's fused fast path reads these; None keeps it off (it needs packed weights)
        self.in_proj_bias = None
        self._qkv_same_embed_dim = False

    @classmethod
    def from_module(cls, mha: nn.MultiheadAttention) -> SplitHeadAttention:
        split = cls(mha.embed_dim, mha.num_heads, mha.in_proj_bias is not None, mha.batch_first, mha.dropout)
        with torch.no_grad():
            for index, projection in enumerate((split.query, split.key, split.value)):
                rows = slice(index * mha.embed_dim, (index + 1) * mha.embed_dim)
                projection.weight.copy_(mha.in_proj_weight[rows])
                if mha.in_proj_bias is not None:
                    projection.bias.copy_(mha.in_proj_bias[rows])
            split.out.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                split.out.bias.copy_(mha.out_proj.bias)
        return split

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, length, source = query.shape[0], query.shape[1], key.shape[1]

        def heads(t: torch.Tensor, n: int) -> torch.Tensor:   # -1: the head count after pruning
            return t.reshape(batch, n, -1, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.query(query), length), heads(self.key(key), source), heads(self.value(value), source)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        scores = scores + _additive(attn_mask, scores, is_causal, length, source)
        if key_padding_mask is not None:   # (batch, source): True (or -inf) where a key is padding
            scores = scores + _additive(key_padding_mask, scores, False, length, source)[:, None, None, :]
        weights = F.dropout(torch.softmax(scores, dim=-1), self.dropout, self.training)
        out = self.out((weights @ v).transpose(1, 2).reshape(batch, length, -1))
        return (out if self.batch_first else out.transpose(0, 1)), None


def _additive(mask, scores: torch.Tensor, is_causal: bool, length: int, source: int) -> torch.Tensor | float:
    """A boolean mask (True: masked) or a float one as an addition to the scores."""
    if mask is None:
        if not is_causal:
            return 0.0
        mask = torch.ones(length, source, dtype=torch.bool, device=scores.device).triu(1)
    if mask.dim() == 3:
        raise ModelError("prune: a per-head 3-D attn_mask cannot follow a change of head count; pass a 2-D mask, or "
                         "name the attention in prune.ignored_layers")
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device).masked_fill(mask, float("-inf"))
    return mask.to(scores.dtype)


def split_multihead_attention(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Replaces each nn.MultiheadAttention (or the ones `names` lists) by a SplitHeadAttention with the same
    weights; returns the replaced modules' names. Ones with separate key/value sizes (kdim/vdim) stay."""
    replaced = []
    for name, module in list(model.named_modules()):
        wanted = names is None or name in names
        if wanted and isinstance(module, nn.MultiheadAttention) and module._qkv_same_embed_dim:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, SplitHeadAttention.from_module(module))
            replaced.append(name)
    return replaced


def split_modules(model: nn.Module) -> list[str]:
    """The names of the SplitHeadAttention modules a model holds (what arch.json records)."""
    return [name for name, module in model.named_modules() if isinstance(module, SplitHeadAttention)]
