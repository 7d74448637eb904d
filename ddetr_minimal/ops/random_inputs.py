"""Random inputs for the op in the layout of its contract: one builder for tests, chapters and
benchmarks, so that they all exercise the same kind of data."""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

from .checks import level_start_index_from_shapes


def random_op_inputs(shapes: Sequence[Sequence[int]], N: int = 2, Lq: int = 5, M: int = 2, D: int = 3,
                     P: int = 2, dtype: torch.dtype = torch.float64, device="cpu",
                     loc_range: Tuple[float, float] = (0.0, 1.0), seed: int = 0,
                     requires_grad: bool = False):
    """``(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)``.

    shapes: the levels' (H_l, W_l). value (N, S, M, D) is standard normal; locations
    (N, Lq, M, L, P, 2) are uniform in ``loc_range`` (a range wider than [0, 1] puts some samples
    off the map); weights (N, Lq, M, L, P) are a softmax over each head's L*P samples. Everything
    is drawn in float64 on the CPU from ``seed`` and then cast, so the same seed gives the same
    numbers in every dtype and on every device.
    """
    lo, hi = loc_range
    if not lo <= hi:
        raise ValueError(f"loc_range must be (low, high) with low <= high, got {loc_range!r}")
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.as_tensor(shapes, dtype=torch.int64)  # (L, 2)
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(f"shapes must be a list of (H_l, W_l) pairs, got {shapes!r}")
    L, S = spatial_shapes.shape[0], int(spatial_shapes.prod(1).sum())
    value = torch.randn(N, S, M, D, generator=g, dtype=torch.float64)  # (N, S, M, D)
    loc = lo + (hi - lo) * torch.rand(N, Lq, M, L, P, 2, generator=g, dtype=torch.float64)  # (N, Lq, M, L, P, 2)
    logits = torch.randn(N, Lq, M, L * P, generator=g, dtype=torch.float64)  # (N, Lq, M, L*P)
    weights = logits.softmax(-1).view(N, Lq, M, L, P)  # (N, Lq, M, L, P)
    floats = [t.to(device=device, dtype=dtype) for t in (value, loc, weights)]
    if requires_grad:
        for t in floats:
            t.requires_grad_(True)
    value, loc, weights = floats
    spatial_shapes = spatial_shapes.to(device)
    return value, spatial_shapes, level_start_index_from_shapes(spatial_shapes), loc, weights
