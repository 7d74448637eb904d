"""The CUDA kernel of ``kernels/msda.cu`` as a PyTorch op, compiled at run time by CuPy.

How a call travels:

1. :func:`ms_deform_attn_cupy` checks that CuPy and a GPU are there, then calls
   :class:`KernelMSDA` (a ``torch.autograd.Function``).
2. ``KernelMSDA.forward`` makes the inputs contiguous (a no-op when they already are),
   allocates the output with PyTorch and hands the kernel raw device pointers: no copy,
   no conversion to CuPy arrays. The kernel runs on PyTorch's current CUDA stream, so it
   is ordered with the surrounding PyTorch work like any PyTorch op.
3. ``KernelMSDA.backward`` launches the backward kernel, which writes the gradients of
   value, sampling locations and attention weights in the accumulator type (float32 for
   float16 / bfloat16, float64 for float64) and casts them back to the input dtype.

The source is found by :func:`kernels_dir` (installed or copied layout) and compiled
with NVRTC once per dtype and device; CuPy also keeps the binary in its on-disk cache.

The launch logic (argument order, grid sizes, output allocation) does not depend on
CuPy: a *launcher* -- a function ``launch(kernel_name, grid, block, args)`` -- is passed
in. :mod:`ddetr_minimal.ops.emulation` passes one that runs the same kernels on the
CPU, which is how the tests check this file without a GPU.

CuPy is imported lazily, so ``import ddetr_minimal`` never needs it.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch.autograd.function import once_differentiable

from .checks import check_inputs

KERNEL_FILE = "msda.cu"
THREADS_PER_BLOCK = 256  # a multiple of 32: the backward kernel gives each warp one head
WARP_SIZE = 32
MAX_BLOCKS = 65535  # the kernels loop grid-stride, so a capped grid still covers everything
COMPILE_OPTIONS = ("-std=c++17",)
INSTALL_HINT = (
    "install CuPy for your CUDA version, e.g. `pip install cupy-cuda12x` (CUDA 12) or "
    "`pip install cupy-cuda13x` (CUDA 13)"
)

# torch dtype -> (C++ type in msda.cu, dtype the kernel accumulates and writes gradients in)
KERNEL_TYPES: Dict[torch.dtype, Tuple[str, torch.dtype]] = {
    torch.float32: ("float", torch.float32),
    torch.float64: ("double", torch.float64),
    torch.float16: ("half_t", torch.float32),
    torch.bfloat16: ("bfloat16_t", torch.float32),
}

KernelArg = Union[torch.Tensor, int]
Launcher = Callable[[str, int, int, List[KernelArg]], None]


class CupyUnavailableError(RuntimeError):
    """``backend="cupy"`` was asked for but CuPy or a CUDA GPU is missing."""


# ---------------------------------------------------------------------------------------
# Shared by the GPU path and the CPU emulation
# ---------------------------------------------------------------------------------------
def kernels_dir() -> Path:
    """The folder holding ``msda.cu`` and the emulation header.

    Two layouts are supported: the installed package (``pip install .`` puts ``kernels/`` inside
    the package as ``ddetr_minimal/kernels``) and a copy of the repository's two folders,
    ``ddetr_minimal/`` and ``kernels/`` side by side (also what an editable install sees).
    """
    package = Path(__file__).resolve().parent.parent  # .../ddetr_minimal
    candidates = (package / "kernels", package.parent / "kernels")
    for folder in candidates:
        if (folder / KERNEL_FILE).is_file():
            return folder
    raise FileNotFoundError(
        f"cannot find the kernel source {KERNEL_FILE}: looked in "
        + " and ".join(str(c) for c in candidates)
        + "; copy the repository's kernels/ folder next to ddetr_minimal/"
    )


def kernel_source() -> str:
    """The CUDA C source of both kernels."""
    return (kernels_dir() / KERNEL_FILE).read_text()


def kernel_names(dtype: torch.dtype) -> Tuple[str, str]:
    """Names of the forward and backward template instantiations for ``dtype``.

    >>> kernel_names(torch.bfloat16)
    ('msda_forward<bfloat16_t>', 'msda_backward<bfloat16_t>')
    """
    if dtype not in KERNEL_TYPES:
        raise TypeError(
            f"the kernel supports value dtypes {sorted(str(t) for t in KERNEL_TYPES)}, got {dtype}"
        )
    ctype = KERNEL_TYPES[dtype][0]
    return f"msda_forward<{ctype}>", f"msda_backward<{ctype}>"


def grid_size(threads: int, max_blocks: int = MAX_BLOCKS) -> int:
    """Blocks of ``THREADS_PER_BLOCK`` threads for ``threads`` threads, at most ``max_blocks``."""
    return max(1, min(max_blocks, -(-threads // THREADS_PER_BLOCK)))


def _sizes(value: torch.Tensor, sampling_locations: torch.Tensor) -> List[int]:
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    return [N, S, M, D, Lq, L, P]


def run_forward(launch: Launcher, value, spatial_shapes, level_start_index, sampling_locations,
                attention_weights, max_blocks: int = MAX_BLOCKS) -> torch.Tensor:
    """Launch the forward kernel, one thread per output element. Returns (N, Lq, M*D).

    Inputs must already be contiguous, shapes int64 (see :func:`prepare_inputs`).
    """
    N, S, M, D, Lq, L, P = _sizes(value, sampling_locations)
    output = value.new_empty(N, Lq, M, D)  # (N, Lq, M, D)
    threads = N * Lq * M * D
    if threads > 0:
        launch(kernel_names(value.dtype)[0], grid_size(threads, max_blocks), THREADS_PER_BLOCK,
               [value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                output, N, S, M, D, Lq, L, P])
    return output.view(N, Lq, M * D)  # (N, Lq, M*D)


def run_backward(launch: Launcher, grad_output, value, spatial_shapes, level_start_index,
                 sampling_locations, attention_weights, max_blocks: int = MAX_BLOCKS):
    """Launch the backward kernel, one warp per (batch, query, head).

    ``grad_output`` is (N, Lq, M*D). Returns the gradients of value (N, S, M, D), sampling
    locations (N, Lq, M, L, P, 2) and attention weights (N, Lq, M, L, P), in value's dtype.
    """
    N, S, M, D, Lq, L, P = _sizes(value, sampling_locations)
    acc = KERNEL_TYPES[value.dtype][1]
    grad_output = grad_output.contiguous()  # (N, Lq, M*D)
    # grad_value is accumulated with atomicAdd, so it starts at zero; the other two are
    # written exactly once per element by lane 0 of the owning warp.
    grad_value = torch.zeros(value.shape, dtype=acc, device=value.device)  # (N, S, M, D)
    grad_loc = torch.empty(sampling_locations.shape, dtype=acc, device=value.device)  # (N, Lq, M, L, P, 2)
    grad_attn = torch.empty(attention_weights.shape, dtype=acc, device=value.device)  # (N, Lq, M, L, P)
    warps = N * Lq * M
    if warps > 0:
        launch(kernel_names(value.dtype)[1], grid_size(warps * WARP_SIZE, max_blocks), THREADS_PER_BLOCK,
               [value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                grad_output, grad_value, grad_loc, grad_attn, N, S, M, D, Lq, L, P])
    else:
        grad_loc.zero_()
        grad_attn.zero_()
    dtype = value.dtype
    return grad_value.to(dtype), grad_loc.to(dtype), grad_attn.to(dtype)


def prepare_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Contiguous tensors and int64 shapes, as the kernel indexes them. Copies only if needed."""
    return (
        value.contiguous(),
        spatial_shapes.to(torch.int64).contiguous(),
        level_start_index.to(torch.int64).contiguous(),
        sampling_locations.contiguous(),
        attention_weights.contiguous(),
    )


class KernelMSDA(torch.autograd.Function):
    """Autograd wrapper around the two kernels; ``launch`` decides where they run."""

    @staticmethod
    def forward(ctx, launch: Launcher, max_blocks: int, value, spatial_shapes, level_start_index,
                sampling_locations, attention_weights):
        inputs = prepare_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        ctx.launch, ctx.max_blocks = launch, max_blocks
        ctx.save_for_backward(*inputs)
        return run_forward(launch, *inputs, max_blocks=max_blocks)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        grad_value, grad_loc, grad_attn = run_backward(ctx.launch, grad_output, *ctx.saved_tensors,
                                                       max_blocks=ctx.max_blocks)
        return None, None, grad_value, None, None, grad_loc, grad_attn


# ---------------------------------------------------------------------------------------
# The GPU path: CuPy
# ---------------------------------------------------------------------------------------
def _import_cupy():
    import cupy  # noqa: F401  (lazy: only the "cupy" backend needs it)

    return cupy


def missing() -> List[str]:
    """What stops the kernel from running here (empty when it can run). Never raises."""
    problems = []
    try:
        cupy = _import_cupy()
    except Exception as exc:  # ImportError, or a broken CUDA library underneath
        problems.append(f"CuPy cannot be imported ({type(exc).__name__}: {exc}); {INSTALL_HINT}")
        cupy = None
    try:
        has_torch_gpu = torch.cuda.is_available()
    except Exception:
        has_torch_gpu = False
    if not has_torch_gpu:
        problems.append(
            "no CUDA GPU is usable (torch.cuda.is_available() is False); run on a machine with an "
            "NVIDIA GPU, or use backend='torch', which runs anywhere"
        )
    elif cupy is not None:
        try:
            if cupy.cuda.runtime.getDeviceCount() < 1:
                problems.append("CuPy sees no CUDA device")
        except Exception as exc:
            problems.append(f"CuPy cannot reach the GPU ({type(exc).__name__}: {exc}); {INSTALL_HINT}")
    return problems


@functools.lru_cache(maxsize=1)
def is_available() -> bool:
    """True when CuPy imports AND a CUDA device is usable, so ``backend="cupy"`` can run.

    Never raises; the answer is cached for the life of the process.
    """
    return not missing()


@functools.lru_cache(maxsize=None)
def _module(dtype: torch.dtype, device_index: int):
    """The compiled kernels for one dtype on one device (compiled on first use, then cached)."""
    cupy = _import_cupy()
    with cupy.cuda.Device(device_index):
        module = cupy.RawModule(code=kernel_source(), options=COMPILE_OPTIONS,
                                name_expressions=list(kernel_names(dtype)))
        return {name: module.get_function(name) for name in kernel_names(dtype)}


def _cupy_launch(name: str, grid: int, block: int, args: Sequence[KernelArg]) -> None:
    """Launch ``name`` on the device and current PyTorch stream of the first tensor argument."""
    import numpy as np

    cupy = _import_cupy()
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    device = tensors[0].device
    dtype = tensors[0].dtype  # value comes first
    kernel = _module(dtype, device.index)[name]
    # A device pointer is a 64-bit address and an `int` parameter is 32 bits: CuPy copies
    # NumPy scalars into the kernel's argument buffer as they are.
    packed = tuple(np.uint64(a.data_ptr()) if isinstance(a, torch.Tensor) else np.int32(a) for a in args)
    with cupy.cuda.Device(device.index), _cupy_stream(cupy, torch.cuda.current_stream(device)):
        kernel((grid,), (block,), packed)


def _cupy_stream(cupy, stream: "torch.cuda.Stream"):
    """PyTorch's stream seen by CuPy (no new stream: the kernel queues behind PyTorch's work)."""
    if hasattr(cupy.cuda.Stream, "from_external") and hasattr(stream, "__cuda_stream__"):
        return cupy.cuda.Stream.from_external(stream)  # CuPy >= 14
    return cupy.cuda.ExternalStream(stream.cuda_stream, stream.device_index)


def _require_gpu(value: torch.Tensor) -> None:
    problems = missing()
    if problems:
        raise CupyUnavailableError("backend='cupy' cannot run here: " + "; ".join(problems))
    if not value.is_cuda:
        raise ValueError(
            f"backend='cupy' needs CUDA tensors, but value is on {value.device}; move the inputs with "
            ".to('cuda') or use backend='torch'"
        )


def ms_deform_attn_cupy(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                        max_blocks: Optional[int] = None):
    """Multi-scale deformable attention with the CUDA kernel. Same contract as
    :func:`ddetr_minimal.ops.msda.ms_deform_attn`; returns (N, Lq, M*D) and supports backward.

    Raises :class:`CupyUnavailableError` saying what is missing (CuPy, a GPU) and how to get it.
    """
    _require_gpu(value)
    check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    kernel_names(value.dtype)  # TypeError for unsupported dtypes, before anything is compiled
    return KernelMSDA.apply(_cupy_launch, max_blocks or MAX_BLOCKS, value, spatial_shapes,
                            level_start_index, sampling_locations, attention_weights)


__all__ = [
    "CupyUnavailableError",
    "KernelMSDA",
    "is_available",
    "kernel_names",
    "kernel_source",
    "missing",
    "ms_deform_attn_cupy",
    "run_backward",
    "run_forward",
]
