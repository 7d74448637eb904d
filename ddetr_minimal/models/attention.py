"""Vanilla multi-head attention written out (paper, Eq. 1): what DETR's encoder and decoder use.

Every query scores every key, so one layer costs O(Lq Lk C) for the scores; chapter 1 measures it.
"""
from __future__ import annotations
import math
from typing import Optional, Tuple
import torch
from torch import nn
from ..ops.checks import shape_str


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 key_padding_mask: Optional[torch.Tensor] = None
                                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / sqrt(d)) v for every head.

    q: (N, M, Lq, D), k and v: (N, M, Lk, D), key_padding_mask: (N, Lk) bool, True = ignore.
    Returns the output (N, M, Lq, D) and the attention matrix A (N, M, Lq, Lk).
    """
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (N, M, Lq, Lk): Lq*Lk numbers per head
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    attn = scores.softmax(dim=-1)  # (N, M, Lq, Lk)
    return attn @ v, attn  # (N, M, Lq, D), (N, M, Lq, Lk)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with separate projections ``U_m``, ``V_m``, ``W'_m`` and ``W_m``.

    Batch-first: ``query`` (N, Lq, C), ``key`` and ``value`` (N, Lk, C). Numerically the same
    as ``torch.nn.MultiheadAttention(batch_first=True)`` given the same weights.
    """

    def __init__(self, d_model: int = 256, n_heads: int = 8, dropout: float = 0.0):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(
                f"d_model must be divisible by n_heads, got d_model={d_model} and n_heads={n_heads}"
            )
        self.d_model, self.n_heads = d_model, n_heads
        self.q_proj = nn.Linear(d_model, d_model)  # U_m
        self.k_proj = nn.Linear(d_model, d_model)  # V_m
        self.v_proj = nn.Linear(d_model, d_model)  # W'_m
        self.out_proj = nn.Linear(d_model, d_model)  # W_m
        self.dropout = nn.Dropout(dropout)
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        N, length, C = x.shape
        return x.view(N, length, self.n_heads, C // self.n_heads).transpose(1, 2)  # (N, M, length, D)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns the output (N, Lq, C) and the attention weights (N, M, Lq, Lk)."""
        C = self.d_model
        if query.dim() != 3 or query.shape[-1] != C:
            raise ValueError(f"query must have shape (N, Lq, {C}), got {shape_str(query)}")
        if key.shape != value.shape or key.dim() != 3 or key.shape[0] != query.shape[0] or key.shape[-1] != C:
            raise ValueError(
                f"key and value must both have shape ({query.shape[0]}, Lk, {C}), "
                f"got {shape_str(key)} and {shape_str(value)}"
            )
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        out, attn = scaled_dot_product_attention(q, k, v, key_padding_mask)  # (N, M, Lq, D)
        out = self.dropout(out).transpose(1, 2).reshape(query.shape)  # (N, Lq, C)
        return self.out_proj(out), attn
