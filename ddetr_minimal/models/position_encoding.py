"""Sine position embeddings for 2-D feature maps, and the learned level embedding.

A transformer sees a set, not a grid: every token needs to be told where it is. DETR
generalises the sine/cosine encoding of "Attention is all you need" to images. The ``x``
and ``y`` coordinates of every pixel are encoded separately with ``C/2`` channels each::

    PE(pos, 2i)   = sin(pos / T^(2i / (C/2)))
    PE(pos, 2i+1) = cos(pos / T^(2i / (C/2)))

where ``pos`` is the coordinate counted over *valid* (unpadded) pixels only and, with
``normalize=True``, rescaled so that the image spans ``[0, 2*pi]`` whatever its size.

Deformable DETR flattens several feature levels into one sequence, so a pixel's position
alone is ambiguous (the centre of level 0 and of level 3 get the same code). Each level
therefore adds a learned vector ``e_l`` (the *level embedding*, paper Sec. 4.1) to the sine
embedding of its pixels; it lives in :class:`ddetr_minimal.models.transformer.DeformableTransformer`
as ``level_embed``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..ops.checks import shape_str


class PositionEmbeddingSine(nn.Module):
    """Sine embedding of the (row, column) of every valid pixel.

    Args:
        num_pos_feats: channels per axis; the output has ``2 * num_pos_feats`` channels
            (``d_model / 2`` each for ``y`` and ``x``).
        temperature: ``T`` in the formula above.
        normalize: rescale coordinates so that the valid part of the image spans ``[0, scale]``.
        scale: the span of normalised coordinates (``2*pi`` by default).
        offset: added to the 1-based pixel index before normalising. Deformable DETR uses
            ``-0.5`` (pixel centres), DETR uses ``0.0``.
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, normalize: bool = True,
                 scale: float = 2 * math.pi, offset: float = -0.5):
        super().__init__()
        if not isinstance(num_pos_feats, int) or num_pos_feats <= 0 or num_pos_feats % 2:
            raise ValueError(f"num_pos_feats must be a positive even integer, got {num_pos_feats!r}")
        self.num_pos_feats, self.temperature = num_pos_feats, temperature
        self.normalize, self.scale, self.offset = normalize, scale, offset

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """mask: (N, H, W) bool, True at padded pixels. Returns (N, 2*num_pos_feats, H, W)."""
        if not isinstance(mask, torch.Tensor) or mask.dim() != 3 or mask.dtype != torch.bool:
            got = f"dtype {mask.dtype} and shape {shape_str(mask)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask must be a bool tensor of shape (N, H, W), got {got}")
        not_mask = ~mask
        y = not_mask.cumsum(1, dtype=torch.float32)  # (N, H, W): 1-based row among valid pixels
        x = not_mask.cumsum(2, dtype=torch.float32)  # (N, H, W): 1-based column
        if self.normalize:
            eps = 1e-6
            y = (y + self.offset) / (y[:, -1:, :] + eps) * self.scale  # (N, H, W) in [0, scale]
            x = (x + self.offset) / (x[:, :, -1:] + eps) * self.scale  # (N, H, W)
        i = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)  # (F,)
        dim_t = self.temperature ** (2 * (i // 2) / self.num_pos_feats)  # (F,) pairs share a frequency
        pos_x = x[..., None] / dim_t  # (N, H, W, F)
        pos_y = y[..., None] / dim_t  # (N, H, W, F)
        # interleave: even channels sin, odd channels cos
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)  # (N, H, W, F)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)  # (N, H, W, F)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)  # (N, 2F, H, W)


def sine_embed_boxes(boxes_unact: torch.Tensor, d_model: int, temperature: float = 10000.0) -> torch.Tensor:
    """Sine embedding of box coordinates, used by two-stage Deformable DETR for its queries.

    boxes_unact: (N, Lq, 4) boxes before the sigmoid (inverse-sigmoid space). Each of the four
    sigmoid-ed coordinates, scaled to ``[0, 2*pi]``, gets ``d_model / 2`` sine/cosine channels.
    Returns (N, Lq, 2 * d_model).
    """
    F = d_model // 2
    i = torch.arange(F, dtype=torch.float32, device=boxes_unact.device)  # (F,)
    dim_t = temperature ** (2 * (i // 2) / F)  # (F,)
    pos = boxes_unact.sigmoid() * (2 * math.pi)  # (N, Lq, 4)
    pos = pos[..., None] / dim_t  # (N, Lq, 4, F)
    pos = torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=4).flatten(2)  # (N, Lq, 4F)
    return pos
