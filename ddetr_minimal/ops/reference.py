"""The ``loop`` backend: Eq. (3) of the paper with bilinear interpolation spelled out.

Notation as in :mod:`ddetr_minimal.ops.msda`.
"""
from __future__ import annotations
import torch


# --------------------------------------------------------------------------------------
# Backend "loop": the reference, spelled out
# --------------------------------------------------------------------------------------
def bilinear_sample(value_l: torch.Tensor, H: int, W: int, loc: torch.Tensor) -> torch.Tensor:
    """Sample one level at one point per (batch, query, head), reading zeros outside the map.

    value_l: (N, H*W, M, D) one level of ``value``; loc: (N, Lq, M, 2) normalised (x, y).
    Returns (N, Lq, M, D).
    """
    N, _, M, D = value_l.shape
    Lq = loc.shape[1]
    # continuous pixel coordinates: pixel i has its centre at (i + 0.5) / size
    x = loc[..., 0] * W - 0.5  # (N, Lq, M)
    y = loc[..., 1] * H - 0.5  # (N, Lq, M)
    x0, y0 = torch.floor(x), torch.floor(y)  # top-left neighbour
    fx, fy = x - x0, y - y0  # fractional parts carry the gradient w.r.t. the location
    x0, y0 = x0.long(), y0.long()

    v = value_l.permute(0, 2, 1, 3)  # (N, M, H*W, D)
    out = value_l.new_zeros(N, Lq, M, D)
    # the four neighbours and their bilinear weights
    for dy, dx, w in (
        (0, 0, (1 - fy) * (1 - fx)),
        (0, 1, (1 - fy) * fx),
        (1, 0, fy * (1 - fx)),
        (1, 1, fy * fx),
    ):
        xi, yi = x0 + dx, y0 + dy  # (N, Lq, M)
        inside = (xi >= 0) & (xi < W) & (yi >= 0) & (yi < H)  # outside the map reads zero
        flat = (yi.clamp(0, H - 1) * W + xi.clamp(0, W - 1)).permute(0, 2, 1)  # (N, M, Lq)
        corner = torch.gather(v, 2, flat.unsqueeze(-1).expand(N, M, Lq, D))  # (N, M, Lq, D)
        corner = corner.permute(0, 2, 1, 3)  # (N, Lq, M, D)
        out = out + torch.where(inside, w, torch.zeros_like(w)).unsqueeze(-1) * corner
    # A NaN or infinite location has no defined sample: it reads NaN, as in grid_sample, so a
    # diverging run shows. fx * fy is NaN there and carries NaN into the location's gradient,
    # while value's gradient gets nothing from that point.
    undefined = (torch.isnan(fx) | torch.isnan(fy)).unsqueeze(-1)  # (N, Lq, M, 1)
    return torch.where(undefined, (fx * fy).unsqueeze(-1).expand_as(out), out)  # (N, Lq, M, D)


def ms_deform_attn_loop(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Reference implementation: Eq. (3) of the paper with one loop per level and point."""
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    out = value.new_zeros(N, Lq, M, D)
    for l, ((H, W), start) in enumerate(zip(spatial_shapes.tolist(), level_start_index.tolist())):
        value_l = value[:, start : start + H * W]  # (N, H*W, M, D)
        for p in range(P):
            sample = bilinear_sample(value_l, H, W, sampling_locations[:, :, :, l, p])  # (N, Lq, M, D)
            out = out + attention_weights[:, :, :, l, p].unsqueeze(-1) * sample
    return out.reshape(N, Lq, M * D)  # (N, Lq, M*D)
