"""Multi-scale deformable attention: the op, its input checks and its backends.

The op computes, for every query q, head m and channel d (paper, Eq. 3)::

    out[n, q, m, :] = sum_l sum_k  A[n, q, m, l, k] * bilinear(value_l[n, :, m, :], p[n, q, m, l, k])

where ``value_l`` is level ``l`` of ``value`` seen as an ``H_l x W_l`` map, ``p`` are
normalised sampling locations in ``[0, 1]`` ordered ``(x, y)`` and ``A`` are attention
weights that were already softmax-normalised over the ``L*K`` samples of a head.

Pixel centres sit at ``(i + 0.5) / size`` (``align_corners=False``) and samples that fall
outside a map read zeros, so a location ``p`` maps to the continuous pixel coordinate
``p * size - 0.5``.

Backends (all give the same numbers and gradients):

* ``"loop"``  -- a readable reference: a Python loop over levels and points that spells
  out the bilinear interpolation of the four neighbours.
* ``"torch"`` -- vectorised with :func:`torch.nn.functional.grid_sample`, one call per level.
* ``"cupy"``  -- the CUDA kernel in ``kernels/`` compiled at run time by CuPy (GPU only).
* ``"auto"``  -- ``"cupy"`` for CUDA tensors when CuPy works, else ``"torch"``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "loop", "torch", "cupy")


# --------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------
def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _check_rank(name: str, t, rank: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(
            f"{name} must have {rank} dimensions {layout}, got {t.dim()} with shape {_shape(t)}"
        )


def _check_dim(name: str, t: torch.Tensor, dim: int, expected: int, what: str, layout: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(
            f"{name} has shape {_shape(t)} {layout}, but its dimension {dim} ({what}) is "
            f"{t.shape[dim]}; expected {expected}"
        )


def check_inputs(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> None:
    """Validate the op's five tensors against each other; raise ``ValueError``/``TypeError``.

    Every message names the argument, the shape or value it got and what was expected.
    Nothing is broadcast silently.
    """
    V, SS, LSI = "(N, S, M, D)", "(L, 2)", "(L,)"
    LOC, AW = "(N, Lq, M, L, P, 2)", "(N, Lq, M, L, P)"
    _check_rank("value", value, 4, V)
    _check_rank("spatial_shapes", spatial_shapes, 2, SS)
    _check_rank("level_start_index", level_start_index, 1, LSI)
    _check_rank("sampling_locations", sampling_locations, 6, LOC)
    _check_rank("attention_weights", attention_weights, 5, AW)

    # dtypes: float data, integer shapes, one float dtype for all three float tensors
    for name, t in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if t.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must be an integer tensor (torch.int64), got dtype {t.dtype}")
    if not value.is_floating_point():
        raise TypeError(f"value must be a floating-point tensor, got dtype {value.dtype}")
    for name, t in (("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        if t.dtype != value.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but value has dtype {value.dtype}; "
                "all floating-point inputs must share one dtype"
            )
    for name, t in (
        ("spatial_shapes", spatial_shapes),
        ("level_start_index", level_start_index),
        ("sampling_locations", sampling_locations),
        ("attention_weights", attention_weights),
    ):
        if t.device != value.device:
            raise ValueError(
                f"{name} is on device {t.device} but value is on device {value.device}; "
                "all inputs must be on one device"
            )

    N, S, M, D = value.shape
    L = spatial_shapes.shape[0]
    if spatial_shapes.shape[1] != 2:
        raise ValueError(
            f"spatial_shapes must have shape (L, 2) holding (H_l, W_l), got {_shape(spatial_shapes)}"
        )
    if L == 0:
        raise ValueError("spatial_shapes must describe at least one level, got shape (0, 2)")
    _check_dim("level_start_index", level_start_index, 0, L, "levels L", LSI)

    Nq = sampling_locations.shape[1]
    _check_dim("sampling_locations", sampling_locations, 0, N, "batch N, from value", LOC)
    _check_dim("sampling_locations", sampling_locations, 2, M, "heads M, from value", LOC)
    _check_dim("sampling_locations", sampling_locations, 3, L, "levels L, from spatial_shapes", LOC)
    _check_dim("sampling_locations", sampling_locations, 5, 2, "(x, y)", LOC)
    P = sampling_locations.shape[4]
    expected_aw = (N, Nq, M, L, P)
    if tuple(attention_weights.shape) != expected_aw:
        raise ValueError(
            f"attention_weights has shape {_shape(attention_weights)} {AW}, expected "
            f"{expected_aw} to match value {_shape(value)} and sampling_locations "
            f"{_shape(sampling_locations)}"
        )

    shapes = spatial_shapes.tolist()
    if any(h <= 0 or w <= 0 for h, w in shapes):
        raise ValueError(f"spatial_shapes must hold positive (H_l, W_l), got {shapes}")
    sizes = [h * w for h, w in shapes]
    if sum(sizes) != S:
        raise ValueError(
            f"value has S={S} positions (shape {_shape(value)}), but spatial_shapes {shapes} "
            f"sum to sum(H*W)={sum(sizes)}; expected them to be equal"
        )
    starts = [0]
    for s in sizes[:-1]:
        starts.append(starts[-1] + s)
    given = level_start_index.tolist()
    if given != starts:
        raise ValueError(
            f"level_start_index is {given}, but spatial_shapes {shapes} give the level starts "
            f"{starts} (the exclusive cumulative sum of H*W)"
        )


def level_start_index_from_shapes(spatial_shapes: torch.Tensor) -> torch.Tensor:
    """Offsets of each level inside the flattened ``S`` axis: ``[0, H0*W0, H0*W0+H1*W1, ...]``."""
    sizes = spatial_shapes.prod(1)  # (L,)
    return torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))  # (L,)


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
        out = out + (w * inside).unsqueeze(-1) * corner
    return out


def ms_deform_attn_loop(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Reference implementation: Eq. (3) of the paper with one loop per level and point."""
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    out = value.new_zeros(N, Lq, M, D)
    for l, ((H, W), start) in enumerate(zip(spatial_shapes.tolist(), level_start_index.tolist())):
        value_l = value[:, start : start + H * W]  # (N, H*W, M, D)
        for k in range(P):
            sample = bilinear_sample(value_l, H, W, sampling_locations[:, :, :, l, k])  # (N, Lq, M, D)
            out = out + attention_weights[:, :, :, l, k].unsqueeze(-1) * sample
    return out.reshape(N, Lq, M * D)  # (N, Lq, M*D)


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


# --------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------
def cupy_available() -> bool:
    """True when CuPy imports and sees a CUDA device (the kernel can run)."""
    from . import cupy_msda

    return cupy_msda.is_available()


def resolve_backend(backend: str, value: torch.Tensor) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "cupy" if value.is_cuda and cupy_available() else "torch"
    return backend


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """Multi-scale deformable attention (the op of the official implementation).

    Args:
        value: (N, S, M, D), the projected values of all levels, flattened; S = sum H_l*W_l.
        spatial_shapes: (L, 2) int64, (H_l, W_l) of every level.
        level_start_index: (L,) int64, offset of level l inside S.
        sampling_locations: (N, Lq, M, L, P, 2), normalised to [0, 1], ordered (x, y).
        attention_weights: (N, Lq, M, L, P), already softmax-normalised over L*P.
        backend: "auto", "loop", "torch" or "cupy" (see the module docstring).

    Returns:
        (N, Lq, M*D), the heads' outputs concatenated (before the output projection).
    """
    name = resolve_backend(backend, value)
    check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    args = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if name == "loop":
        return ms_deform_attn_loop(*args)
    if name == "torch":
        return ms_deform_attn_torch(*args)
    from . import cupy_msda

    return cupy_msda.ms_deform_attn_cupy(*args)


__all__: Sequence[str] = (
    "ms_deform_attn",
    "ms_deform_attn_loop",
    "ms_deform_attn_torch",
    "check_inputs",
    "level_start_index_from_shapes",
    "bilinear_sample",
    "BACKENDS",
)
