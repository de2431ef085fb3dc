"""A Hugging Face BERT-family sentence encoder built from a config with random weights (nothing is downloaded),
and tokenised-looking data for it: what the transformer tests compress."""
import numpy as np
import torch.nn as nn


class SentenceEncoder(nn.Module):
    """A BERT-family encoder with a mean-pooled sentence embedding (as sentence-transformers models are)."""

    def __init__(self, vocab_size=1000, hidden=64, layers=2, heads=4, intermediate=128, seq_len=32):
        super().__init__()
        from transformers import BertConfig, BertModel
        self.bert = BertModel(BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                                         num_attention_heads=heads, intermediate_size=intermediate,
                                         max_position_embeddings=seq_len, attn_implementation="eager"))

    def forward(self, input_ids, attention_mask):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)[0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def build(**kwargs):
    return SentenceEncoder(**kwargs)


def sentences(samples=512, vocab_size=1000, seq_len=32, seed=0):
    """Token ids with a Zipf-like distribution and padded lengths: what a tokenizer gives for short texts."""
    rng = np.random.default_rng(seed)
    ids = np.minimum(rng.zipf(1.3, size=(samples, seq_len)), vocab_size - 1).astype(np.int64)
    lengths = rng.integers(8, seq_len + 1, size=samples)
    mask = (np.arange(seq_len)[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": ids * mask, "attention_mask": mask}
