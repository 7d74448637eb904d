"""``MSDeformAttn``: the multi-scale deformable attention module (paper, Sec. 4.1, Eq. 3).

For each query the module predicts, with two linear layers on the query feature alone,
``M*L*P`` sampling offsets (2 numbers each) and ``M*L*P`` attention weights (``3MLP``
output channels in all). The weights of a head are softmax-normalised over its ``L*P``
samples; the offsets are added to the query's reference point, which is shared by all
levels because it is normalised to ``[0, 1]``. The sampled values are mixed by the op
:func:`ddetr_minimal.ops.msda.ms_deform_attn` and projected back to ``d_model``.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from ..ops.checks import check_positive_ints, shape_str
from ..ops.msda import ms_deform_attn, sampling_dtype


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention.

    Args:
        d_model: channels C of queries and values.
        n_levels: feature levels L (``n_levels=1`` is single-scale deformable attention).
        n_heads: attention heads M; ``d_model`` must be divisible by it.
        n_points: sampling points P per head per level.
        backend: op backend, see :func:`ddetr_minimal.ops.msda.ms_deform_attn`.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4,
                 backend: str = "auto"):
        super().__init__()
        check_positive_ints(d_model=d_model, n_levels=n_levels, n_heads=n_heads, n_points=n_points)
        if d_model % n_heads != 0:
            raise ValueError(
                f"d_model must be divisible by n_heads, got d_model={d_model} and n_heads={n_heads} "
                f"(d_model % n_heads = {d_model % n_heads})"
            )
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.backend = backend
        # 2MLP offsets and MLP weights: 3MLP output channels predicted from the query
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)  # W'_m for all heads at once
        self.output_proj = nn.Linear(d_model, d_model)  # W_m for all heads at once
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The paper's initialisation.

        Offset and weight projections start at zero weight, so at initialisation every query
        samples the same pattern around its reference point: head m looks in direction
        ``2*pi*m/M``, and point p sits ``p+1`` pixels out along it (a ring of rays), while
        the attention weights are uniform over the ``L*P`` samples.
        """
        M, L, P = self.n_heads, self.n_levels, self.n_points
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(M, dtype=torch.float32) * (2.0 * math.pi / M)  # (M,)
        direction = torch.stack([theta.cos(), theta.sin()], -1)  # (M, 2)
        # scale each direction so its larger component is 1: the first ring touches the
        # 8-neighbourhood of the reference pixel
        direction = direction / direction.abs().max(-1, keepdim=True).values  # (M, 2)
        bias = direction.view(M, 1, 1, 2).repeat(1, L, P, 1)  # (M, L, P, 2)
        bias = bias * torch.arange(1, P + 1, dtype=torch.float32).view(1, 1, P, 1)  # (M, L, P, 2)
        self.sampling_offsets.bias.copy_(bias.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def sampling(self, query: torch.Tensor, reference_points: torch.Tensor,
                 spatial_shapes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Sampling locations and attention weights predicted from the queries.

        query: (N, Lq, C); reference_points: (N, Lq, L, 2) as normalised (x, y) or
        (N, Lq, L, 4) as normalised boxes (cx, cy, w, h); spatial_shapes: (L, 2) as (H, W).
        Returns locations (N, Lq, M, L, P, 2) and weights (N, Lq, M, L, P).
        """
        N, Lq, _ = query.shape
        M, L, P = self.n_heads, self.n_levels, self.n_points
        offsets = self.sampling_offsets(query)  # (N, Lq, M*L*P*2)
        weights = self.attention_weights(query).view(N, Lq, M, L * P)  # (N, Lq, M, L*P)
        weights = weights.softmax(-1).view(N, Lq, M, L, P)  # (N, Lq, M, L, P)
        ref = reference_points[:, :, None, :, None, :]  # (N, Lq, 1, L, 1, 2|4)
        # Each step below broadcasts along a long, contiguous last axis, or once over the short
        # ones: a tensor broadcast over (P, 2) is read two numbers at a time, many times slower.
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: divide by (W_l, H_l) to normalise
            normaliser = spatial_shapes.flip(-1).to(query.dtype)  # (L, 2) as (W, H)
            normaliser = normaliser[None, :, None, :].expand(M, L, P, 2).reshape(-1)  # (M*L*P*2,)
            locations = (offsets / normaliser).view(N, Lq, M, L, P, 2) + ref
        else:
            # box reference: offsets are relative to the box size, at most half of it per P
            offsets = (offsets / P).view(N, Lq, M, L, P, 2)
            locations = torch.addcmul(ref[..., :2], offsets, ref[..., 2:], value=0.5)
        return locations, weights

    def _check(self, query, reference_points, input_flatten, spatial_shapes, padding_mask):
        C, L = self.d_model, self.n_levels
        if query.dim() != 3 or query.shape[-1] != C:
            raise ValueError(f"query must have shape (N, Lq, {C}), got {shape_str(query)}")
        N, Lq, _ = query.shape
        if input_flatten.dim() != 3 or input_flatten.shape[0] != N or input_flatten.shape[-1] != C:
            raise ValueError(f"input_flatten must have shape ({N}, S, {C}), got {shape_str(input_flatten)}")
        if (reference_points.dim() != 4 or tuple(reference_points.shape[:3]) != (N, Lq, L)
                or reference_points.shape[-1] not in (2, 4)):
            raise ValueError(
                f"reference_points must have shape ({N}, {Lq}, {L}, 2) for points (x, y) or "
                f"({N}, {Lq}, {L}, 4) for boxes (cx, cy, w, h), got {shape_str(reference_points)}"
            )
        if spatial_shapes.dim() != 2 or spatial_shapes.shape[0] != L:
            raise ValueError(
                f"input_spatial_shapes must have shape ({L}, 2) for n_levels={L}, got {shape_str(spatial_shapes)}"
            )
        if padding_mask is not None:
            S = input_flatten.shape[1]
            if padding_mask.dtype != torch.bool or tuple(padding_mask.shape) != (N, S):
                raise ValueError(
                    f"input_padding_mask must be a bool tensor of shape ({N}, {S}) (True = padding), "
                    f"got dtype {padding_mask.dtype} and shape {shape_str(padding_mask)}"
                )

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, input_flatten: torch.Tensor,
                input_spatial_shapes: torch.Tensor, input_level_start_index: torch.Tensor,
                input_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """query (N, Lq, C), reference_points (N, Lq, L, 2|4), input_flatten (N, S, C),
        input_spatial_shapes (L, 2), input_level_start_index (L,), input_padding_mask (N, S)
        bool with True at padded positions. Returns (N, Lq, C)."""
        self._check(query, reference_points, input_flatten, input_spatial_shapes, input_padding_mask)
        N, Lq, C = query.shape
        S = input_flatten.shape[1]
        M = self.n_heads
        value = self.value_proj(input_flatten)  # (N, S, C)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)  # padded values read zero
        value = value.view(N, S, M, C // M)  # (N, S, M, D)
        locations, weights = self.sampling(query, reference_points, input_spatial_shapes)
        # Locations and weights stay float32 when value is 16-bit (autocast): a bfloat16 location
        # on a map 167 pixels wide would be off by up to a third of a pixel.
        dtype = sampling_dtype(value.dtype)
        out = ms_deform_attn(value, input_spatial_shapes, input_level_start_index,
                             locations.to(dtype), weights.to(dtype), backend=self.backend)  # (N, Lq, C)
        return self.output_proj(out)  # (N, Lq, C)
