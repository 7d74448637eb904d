"""Vanilla multi-head attention written out, and the cost of it against deformable attention.

Notation of the paper (Sec. 3): a query feature ``z_q`` attends over ``N_k`` keys ``x_k``
with ``M`` heads of ``C_v = C / M`` channels each::

    MultiHeadAttn(z_q, x) = sum_m W_m [ sum_k A_mqk * W'_m x_k ],
    A_mqk = softmax_k( (U_m z_q)^T (V_m x_k) / sqrt(C_v) ).

The cost counters below follow the paper's Appendix A (complexities), spelled out as
multiply-adds counted as 2 FLOPs each.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from .msda import _shape


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
        N, L, C = x.shape
        return x.view(N, L, self.n_heads, C // self.n_heads).transpose(1, 2)  # (N, M, L, D)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns the output (N, Lq, C) and the attention weights (N, M, Lq, Lk)."""
        C = self.d_model
        if query.dim() != 3 or query.shape[-1] != C:
            raise ValueError(f"query must have shape (N, Lq, {C}), got {_shape(query)}")
        if key.shape != value.shape or key.dim() != 3 or key.shape[0] != query.shape[0] or key.shape[-1] != C:
            raise ValueError(
                f"key and value must both have shape ({query.shape[0]}, Lk, {C}), "
                f"got {_shape(key)} and {_shape(value)}"
            )
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        out, attn = scaled_dot_product_attention(q, k, v, key_padding_mask)  # (N, M, Lq, D)
        out = self.dropout(out).transpose(1, 2).reshape(query.shape)  # (N, Lq, C)
        return self.out_proj(out), attn


# --------------------------------------------------------------------------------------
# Cost counters (FLOPs = 2 x multiply-adds; memory in bytes)
# --------------------------------------------------------------------------------------
def attention_flops(n_q: int, n_k: int, d_model: int) -> int:
    """FLOPs of one multi-head attention layer: O(N_q C^2 + N_k C^2 + N_q N_k C).

    Projections of queries (U), keys (V), values (W') and the output (W), then the
    ``N_q x N_k`` score matrix and the weighted sum of values (both ``N_q N_k C`` multiply-adds
    summed over heads). Encoder self-attention has N_q = N_k = HW: O(H^2 W^2 C). Decoder
    cross-attention has N_q = N objects, N_k = HW: O(HW C^2 + N HW C).
    """
    C = d_model
    projections = 2 * (2 * n_q * C * C) + 2 * (2 * n_k * C * C)
    scores_and_mix = 2 * (2 * n_q * n_k * C)
    return projections + scores_and_mix


def attention_memory(n_q: int, n_k: int, n_heads: int, bytes_per_element: int = 4) -> int:
    """Bytes of the attention matrices A (M x N_q x N_k), the quadratic part of the memory."""
    return n_heads * n_q * n_k * bytes_per_element


def deformable_attention_flops(n_q: int, n_v: int, d_model: int, n_heads: int = 8,
                               n_levels: int = 1, n_points: int = 4) -> int:
    """FLOPs of one (multi-scale) deformable attention layer.

    The paper's count is O(2 N_q C^2 + min(HW C^2, N_q K C^2)) (+5 N_q K C for sampling):
    the value projection over the N_v positions, the offset/weight predictions (3MLK channels)
    and output projection per query, and for each of the M*L*K samples a bilinear read
    (4 neighbours) and a weighted accumulate of D = C / M channels.
    """
    C, M, L, K = d_model, n_heads, n_levels, n_points
    value_proj = 2 * n_v * C * C
    predict = 2 * n_q * C * (3 * M * L * K)
    output_proj = 2 * n_q * C * C
    sampling = n_q * L * K * C * (2 * 4 + 2)  # 4 bilinear multiply-adds + 1 weighted add, per channel
    return value_proj + predict + output_proj + sampling


def deformable_attention_memory(n_q: int, n_heads: int = 8, n_levels: int = 1, n_points: int = 4,
                                bytes_per_element: int = 4) -> int:
    """Bytes of the sampling locations (2 numbers) and weights (1) per query: linear in N_q."""
    return 3 * n_q * n_heads * n_levels * n_points * bytes_per_element
