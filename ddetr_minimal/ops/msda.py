"""Multi-scale deformable attention, ``ms_deform_attn``: the op's entry point and its backends.

Notation, one meaning per letter, in every module of :mod:`ddetr_minimal.ops`, the kernel
and the book:

=========  ==============================================================
letter     meaning
=========  ==============================================================
N          batch size
S          flattened positions of all levels, ``S = sum_l H_l * W_l``
M          attention heads
D          channels per head (``d_model = M * D``)
Lq         queries
L          feature levels
P          sampling points per head and level
H_l, W_l   height and width of level l
=========  ==============================================================

Backends:

* ``"loop"`` -- :mod:`.reference`, bilinear interpolation spelled out (readable, slow);
* ``"torch"`` -- :mod:`.torch_backend`, pure PyTorch, runs anywhere: on the CPU sparse matrix
  products (:mod:`.sparse`), on GPUs one ``grid_sample`` per level (:mod:`.grid_sample`);
* ``"cupy"`` -- the CUDA kernel of ``kernels/msda.cu`` (:mod:`.cupy_kernel`); raises with
  the reason (CuPy missing, CUDA versions that do not match, NVRTC's log) when it cannot run;
* ``"auto"`` -- the kernel for CUDA tensors when it passed its self-test on that device and
  dtype (:mod:`.selftest`), else ``"torch"``; also ``"torch"`` in deterministic mode
  (``torch.use_deterministic_algorithms(True)``) and during CUDA graph capture.

``"torch"``, ``"cupy"`` and ``"auto"`` run through one custom operator (:mod:`.library`), so
``torch.compile(fullgraph=True)`` works; in eager mode the torch backend is called directly
(its backward then reuses the forward's autograd graph instead of recomputing it). Either
way the level table is read from the device once per tensor, not once per call
(:func:`.checks.level_table`); under CUDA graph capture, call the op once before capturing,
so that this one read (a device-to-host copy) does not happen inside the capture.

Precision: with float16 / bfloat16 values, ``sampling_locations`` and ``attention_weights`` may
(and under autocast should) stay float32 -- a bfloat16 location on a map 167 pixels wide is
off by up to a third of a pixel. Both the kernel and the torch backend then compute in
float32 and round the output once to the value's dtype. NaN locations give NaN outputs, as
``grid_sample`` does.
"""
from __future__ import annotations

import torch

from .checks import SIXTEEN_BIT, check_inputs, level_table
from .library import ms_deform_attn_op, resolve, torch_forward
from .reference import ms_deform_attn_loop

BACKENDS = ("auto", "loop", "torch", "cupy")
_INTERNAL = ("emulation",)  # the kernel on the CPU, see emulation.ms_deform_attn_emulated


def sampling_dtype(value_dtype: torch.dtype) -> torch.dtype:
    """The dtype locations and weights should have for values of ``value_dtype``: float32 for
    16-bit values (their precision matters more than their memory), else the value's dtype."""
    return torch.float32 if value_dtype in SIXTEEN_BIT else value_dtype


def cupy_available() -> bool:
    """True when CuPy imports and sees a CUDA device (the kernel can try to run)."""
    from . import cupy_kernel

    return cupy_kernel.is_available()


def _check_backend(backend) -> None:
    if not isinstance(backend, str) or backend not in BACKENDS + _INTERNAL:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def resolve_backend(backend: str, value: torch.Tensor) -> str:
    """The backend a call with ``value`` (and locations of ``sampling_dtype``) runs on."""
    _check_backend(backend)
    return backend if backend == "loop" else resolve(backend, value, sampling_dtype(value.dtype))


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    backend: str = "auto",
    max_blocks: int = 0,
) -> torch.Tensor:
    """Multi-scale deformable attention (the op of the official implementation).

    Args:
        value: (N, S, M, D), the projected values of all levels, flattened; S = sum H_l*W_l.
        spatial_shapes: (L, 2) int64, (H_l, W_l) of every level.
        level_start_index: (L,) int64, offset of level l inside S.
        sampling_locations: (N, Lq, M, L, P, 2), normalised to [0, 1], ordered (x, y);
            value's dtype, or float32 when value is float16 / bfloat16.
        attention_weights: (N, Lq, M, L, P), already softmax-normalised over L*P; same dtype
            as sampling_locations.
        backend: "auto", "loop", "torch" or "cupy" (see the module docstring).
        max_blocks: caps the kernel's grid (its loops are grid-stride); 0 for no cap.

    Returns:
        (N, Lq, M*D), the heads' outputs concatenated (before the output projection), in
        value's dtype.
    """
    _check_backend(backend)
    check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if backend == "loop":
        table = level_table(spatial_shapes, level_start_index, value.shape[1])
        dtype = torch.float32 if value.dtype in SIXTEEN_BIT else value.dtype
        out = ms_deform_attn_loop(value.to(dtype), table.cpu_shapes, table.cpu_starts,
                                  sampling_locations.to(dtype), attention_weights.to(dtype))
        return out.to(value.dtype)  # (N, Lq, M*D)
    if not torch.compiler.is_compiling() and resolve(backend, value, sampling_locations.dtype) == "torch":
        # Eager and on torch: call it directly, so autograd records the backend's own backward
        # and does not recompute the forward (the custom op's backward has to).
        table = level_table(spatial_shapes, level_start_index, value.shape[1])
        return torch_forward(value, table, sampling_locations, attention_weights)  # (N, Lq, M*D)
    return ms_deform_attn_op(value, spatial_shapes, level_start_index, sampling_locations,
                             attention_weights, backend, int(max_blocks))  # (N, Lq, M*D)
