"""The CUDA kernel of ``kernels/msda.cu``: its source, its launches, and CuPy underneath.

Notation as in :mod:`ddetr_minimal.ops.msda` (N batch, S positions, M heads, D channels per
head, Lq queries, L levels, P points per head and level).

How a call travels:

1. The op ``torch.ops.ddetr_minimal.ms_deform_attn`` (:mod:`.library`) picks the backend;
   for the kernel it calls :func:`run_forward` with a *launcher* -- a function
   ``launch(kernel_name, grid, block, args)`` -- and, in the backward, :func:`run_backward`.
2. :func:`run_forward` makes the inputs contiguous (a no-op when they already are),
   allocates the output with PyTorch and hands the kernel raw device pointers: no copy,
   no conversion to CuPy arrays. :func:`cupy_launch` runs the kernel on PyTorch's current
   CUDA stream of the tensors' device, so it is ordered with the surrounding PyTorch work.
3. :func:`run_backward` writes the gradients of value, sampling locations and attention
   weights in the accumulator type (float32 for float16 / bfloat16, float64 for float64)
   and casts them back to the inputs' dtypes.

The source is found by :func:`kernels_dir` (installed or copied layout) and compiled
with NVRTC once per (dtype, device) by :func:`compiled`, which also remembers a failed
compilation with its NVRTC log, so a broken setup is reported once, not recompiled per call.

The forward reads value's channels with vector loads where it can: :func:`vector_width`
picks, from D, the dtype and value's data pointer, how many neighbouring channels each thread
takes (the template argument VEC of ``msda_forward``); 1 is the scalar fallback. Every width
is compiled, so the choice costs nothing at run time.

The launch logic (argument order, grid sizes, output allocation) does not depend on
CuPy: :mod:`ddetr_minimal.ops.emulation` passes a launcher that runs the same kernels on the
CPU, which is how the tests check this file without a GPU.

CuPy is imported lazily, so ``import ddetr_minimal`` never needs it.
"""
from __future__ import annotations

import functools
import threading
import warnings
from typing import Callable, Dict, List, Sequence, Union

import torch

from . import cuda_versions
from .kernel_files import (KERNEL_FILE, KERNEL_FILES, KERNEL_TYPES, VECTOR_BYTES, channels_per_thread,  # noqa: F401
                           entry_points, kernel_names, kernel_source, kernels_dir, vector_width, vector_widths)

THREADS_PER_BLOCK = 256  # a multiple of 32: the backward kernel gives each warp one head
WARP_SIZE = 32
MAX_BLOCKS = 65535  # the kernels loop grid-stride, so a capped grid still covers everything
COMPILE_OPTIONS = ("-std=c++17",)  # CuPy's RawModule adds -ftz=true and the -arch of the device
INSTALL_HINT = cuda_versions.INSTALL_HINT

KernelArg = Union[torch.Tensor, int]
Launcher = Callable[[str, int, int, List[KernelArg]], None]


class CupyUnavailableError(RuntimeError):
    """``backend="cupy"`` was asked for but CuPy or a CUDA GPU is missing."""


class CupyKernelError(RuntimeError):
    """The kernel could not be compiled or loaded for this device (the message holds NVRTC's log)."""


# ---------------------------------------------------------------------------------------
# Shared by the GPU path and the CPU emulation
# ---------------------------------------------------------------------------------------
def grid_size(threads: int, max_blocks: int = MAX_BLOCKS) -> int:
    """Blocks of ``THREADS_PER_BLOCK`` threads for ``threads`` threads, at most ``max_blocks``."""
    return max(1, min(max_blocks, -(-threads // THREADS_PER_BLOCK)))


def _sizes(value: torch.Tensor, sampling_locations: torch.Tensor) -> List[int]:
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    return [N, S, M, D, Lq, L, P]


def prepare_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Contiguous tensors and int64 shapes, as the kernel indexes them. Copies only if needed."""
    return (
        value.contiguous(),
        spatial_shapes.to(torch.int64).contiguous(),
        level_start_index.to(torch.int64).contiguous(),
        sampling_locations.contiguous(),
        attention_weights.contiguous(),
    )


def run_forward(launch: Launcher, value, spatial_shapes, level_start_index, sampling_locations,
                attention_weights, max_blocks: int = MAX_BLOCKS, width: int = None) -> torch.Tensor:
    """Launch the forward kernel, one thread per ``width`` neighbouring output elements
    (default: :func:`vector_width` of value; 1 forces one channel per load). Returns (N, Lq, M*D)."""
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = prepare_inputs(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    N, S, M, D, Lq, L, P = _sizes(value, sampling_locations)
    output = value.new_empty(N, Lq, M, D)  # (N, Lq, M, D)
    if width is None:
        width = vector_width(value)
    # the output is PyTorch's fresh allocation, aligned far beyond 16 bytes: checked all the same
    fits = channels_per_thread(D, value.dtype, value.data_ptr() | output.data_ptr())
    if width != 1 and (width not in vector_widths(value.dtype) or fits % width != 0):
        raise ValueError(f"width must be 1 or a vector width that divides D (here {D}) and fits value's "
                         f"alignment (vector_width(value) is {vector_width(value)}), got {width!r}")
    threads = N * Lq * M * D // width
    if threads > 0:
        launch(kernel_names(value.dtype, sampling_locations.dtype, width)[0], grid_size(threads, max_blocks),
               THREADS_PER_BLOCK, [value, spatial_shapes, level_start_index, sampling_locations,
                                   attention_weights, output, N, S, M, D, Lq, L, P])
    return output.view(N, Lq, M * D)  # (N, Lq, M*D)


def alert_not_deterministic(what: str) -> None:
    """Do what PyTorch's own nondeterministic ops do under ``torch.use_deterministic_algorithms``:
    raise ``RuntimeError``, or warn once per call site when ``warn_only=True``."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    message = (
        f"{what} does not have a deterministic implementation (it adds into grad_value with "
        "atomicAdd, in an order that changes from run to run), but you set "
        "'torch.use_deterministic_algorithms(True)'. Use backend='torch' or backend='auto' (which "
        "picks it in deterministic mode), or pass warn_only=True to use_deterministic_algorithms."
    )
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, UserWarning, stacklevel=3)
    else:
        raise RuntimeError(message)


def run_backward(launch: Launcher, grad_output, value, spatial_shapes, level_start_index,
                 sampling_locations, attention_weights, max_blocks: int = MAX_BLOCKS):
    """Launch the backward kernel, one warp per (n, q, m).

    ``grad_output`` is (N, Lq, M*D), any strides. Returns the gradients of value (N, S, M, D),
    sampling locations (N, Lq, M, L, P, 2) and attention weights (N, Lq, M, L, P), each in the
    dtype of its input.
    """
    alert_not_deterministic("ms_deform_attn's backward on the CUDA kernel (backend='cupy')")
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = prepare_inputs(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    N, S, M, D, Lq, L, P = _sizes(value, sampling_locations)
    acc = KERNEL_TYPES[value.dtype][1]
    grad_output = grad_output.to(value.dtype).contiguous()  # (N, Lq, M*D)
    # grad_value is accumulated with atomicAdd, so it starts at zero; the other two are
    # written exactly once per element by lane 0 of the owning warp.
    grad_value = torch.zeros(value.shape, dtype=acc, device=value.device)  # (N, S, M, D)
    grad_loc = torch.empty(sampling_locations.shape, dtype=acc, device=value.device)  # (N, Lq, M, L, P, 2)
    grad_attn = torch.empty(attention_weights.shape, dtype=acc, device=value.device)  # (N, Lq, M, L, P)
    warps = N * Lq * M
    if warps > 0:
        launch(kernel_names(value.dtype, sampling_locations.dtype)[1],
               grid_size(warps * WARP_SIZE, max_blocks), THREADS_PER_BLOCK,
               [value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                grad_output, grad_value, grad_loc, grad_attn, N, S, M, D, Lq, L, P])
    else:
        grad_loc.zero_()
        grad_attn.zero_()
    return (grad_value.to(value.dtype), grad_loc.to(sampling_locations.dtype),
            grad_attn.to(attention_weights.dtype))


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
        mismatch = cuda_versions.mismatch()
        if mismatch:
            problems.append(mismatch)
        try:
            if cupy.cuda.runtime.getDeviceCount() < 1:
                problems.append("CuPy sees no CUDA device")
        except Exception as exc:
            problems.append(f"CuPy cannot reach the GPU ({type(exc).__name__}: {exc}); {INSTALL_HINT}")
    return problems


@functools.lru_cache(maxsize=1)
def is_available() -> bool:
    """True when CuPy imports, matches torch's CUDA and sees a device, so ``backend="cupy"`` can
    try to run (whether the kernel compiles and works is what the self-test of "auto" finds out).

    Never raises; the answer is cached for the life of the process.
    """
    return not missing()


_COMPILED: Dict[tuple, object] = {}  # (dtype, loc dtype, device index) -> kernels or CupyKernelError
_COMPILE_LOCK = threading.Lock()


def _compile_module(names: Sequence[str], device_index: int) -> Dict[str, object]:
    """Compile the kernels ``names`` with NVRTC for the device ``device_index`` (raises on failure)."""
    cupy = _import_cupy()
    with cupy.cuda.Device(device_index):
        module = cupy.RawModule(code=kernel_source(), options=COMPILE_OPTIONS, name_expressions=list(names))
        return {name: module.get_function(name) for name in names}


def compiled(dtype: torch.dtype, loc_dtype: torch.dtype, device_index) -> Dict[str, object]:
    """The compiled forward and backward kernels for one dtype pair on one device.

    Compiled on first use; the kernels -- or the failure, as a :class:`CupyKernelError` holding
    NVRTC's log and the fix -- are cached, so a failure is raised again without recompiling.
    """
    key = (dtype, loc_dtype, device_index)
    with _COMPILE_LOCK:
        if key not in _COMPILED:
            names = entry_points(dtype, loc_dtype)
            try:
                _COMPILED[key] = _compile_module(names, device_index)
            except Exception as exc:  # CompileException (NVRTC log), CUDADriverError, ImportError, ...
                log = exc.get_message() if hasattr(exc, "get_message") else str(exc)
                _COMPILED[key] = CupyKernelError(
                    f"compiling {', '.join(names)} for cuda:{device_index} failed "
                    f"({type(exc).__name__}):\n{log}\n{cuda_versions.fix_hint()}")
        result = _COMPILED[key]
    if isinstance(result, CupyKernelError):
        raise result
    return result


def cupy_launch(name: str, grid: int, block: int, args: Sequence[KernelArg]) -> None:
    """Launch ``name`` on the device and current PyTorch stream of the first tensor argument."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    device = tensors[0].device  # value comes first, the locations fourth
    kernel = compiled(tensors[0].dtype, tensors[3].dtype, device.index)[name]
    import numpy as np

    cupy = _import_cupy()
    # A device pointer is a 64-bit address and an `int` parameter is 32 bits: CuPy copies
    # NumPy scalars into the kernel's argument buffer as they are.
    packed = tuple(np.uint64(a.data_ptr()) if isinstance(a, torch.Tensor) else np.int32(a) for a in args)
    # The device of the tensors, not the current one: on a second GPU the kernel must run
    # there, on that device's current PyTorch stream.
    with cupy.cuda.Device(device.index), _cupy_stream(cupy, torch.cuda.current_stream(device)):
        kernel((grid,), (block,), packed)


def _cupy_stream(cupy, stream: "torch.cuda.Stream"):
    """PyTorch's stream seen by CuPy (no new stream: the kernel queues behind PyTorch's work)."""
    if hasattr(cupy.cuda.Stream, "from_external") and hasattr(stream, "__cuda_stream__"):
        return cupy.cuda.Stream.from_external(stream)  # CuPy >= 14
    return cupy.cuda.ExternalStream(stream.cuda_stream, stream.device_index)


def require_gpu(value: torch.Tensor) -> None:
    """Raise :class:`CupyUnavailableError` (what is missing, how to get it) or ``ValueError``
    (CPU tensors) when ``backend="cupy"`` cannot run on ``value``."""
    if not is_available():  # cached: no CUDA or package queries per call
        raise CupyUnavailableError("backend='cupy' cannot run here: " + "; ".join(missing()))
    if not value.is_cuda:
        raise ValueError(
            f"backend='cupy' needs CUDA tensors, but value is on {value.device}; move the inputs with "
            ".to('cuda') or use backend='torch'"
        )


__all__ = [
    "CupyKernelError",
    "CupyUnavailableError",
    "alert_not_deterministic",
    "channels_per_thread",
    "compiled",
    "cupy_launch",
    "entry_points",
    "is_available",
    "kernel_names",
    "kernel_source",
    "missing",
    "require_gpu",
    "run_backward",
    "run_forward",
    "vector_width",
    "vector_widths",
]
