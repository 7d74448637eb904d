"""Multi-scale deformable attention: the op, its input checks and its backends.  (split from msda.py; docstring to be written)"""
from __future__ import annotations
import torch
import torch.nn.functional as F


# --------------------------------------------------------------------------------------
# Backend "torch": grid_sample, one call per level
# --------------------------------------------------------------------------------------
def ms_deform_attn_torch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Vectorised implementation: every point of a level is sampled by one ``grid_sample``."""
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]; (N, Lq, M, L, P, 2)
    samples = []
    for l, ((H, W), start) in enumerate(zip(spatial_shapes.tolist(), level_start_index.tolist())):
        value_l = value[:, start : start + H * W]  # (N, H*W, M, D)
        value_l = value_l.permute(0, 2, 3, 1).reshape(N * M, D, H, W)  # (N*M, D, H, W)
        grid_l = grids[:, :, :, l].transpose(1, 2).reshape(N * M, Lq, P, 2)  # (N*M, Lq, P, 2)
        samples.append(
            F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # (N*M, D, Lq, P)
    sampled = torch.stack(samples, dim=-2)  # (N*M, D, Lq, L, P)
    weights = attention_weights.transpose(1, 2).reshape(N * M, 1, Lq, L, P)  # (N*M, 1, Lq, L, P)
    out = (sampled * weights).sum(dim=(-1, -2))  # (N*M, D, Lq)
    return out.reshape(N, M * D, Lq).transpose(1, 2).contiguous()  # (N, Lq, M*D)
