"""Multi-scale deformable attention: the op, its input checks and its backends.  (split from msda.py; docstring to be written)"""
from __future__ import annotations
import torch
from .checks import check_inputs
from .reference import ms_deform_attn_loop
from .grid_sample import ms_deform_attn_torch


BACKENDS = ("auto", "loop", "torch", "cupy")


# --------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------
def cupy_available() -> bool:
    """True when CuPy imports and sees a CUDA device (the kernel can run)."""
    from . import cupy_kernel

    return cupy_kernel.is_available()


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
    from . import cupy_kernel

    return cupy_kernel.ms_deform_attn_cupy(*args)
