"""What ``kernels/`` holds: where the folder is, the source as NVRTC compiles it, the kernels'
names for each dtype, and the widths of the forward's vector loads.

Notation as in :mod:`ddetr_minimal.ops.msda` (N batch, S positions, M heads, D channels per head).
:mod:`ddetr_minimal.ops.cupy_kernel` re-exports all of it.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Tuple

import torch

KERNEL_FILE = "msda.cu"
KERNEL_FILES = (KERNEL_FILE, "msda_types.cuh")  # the kernel source and the header it includes
VECTOR_BYTES = (16, 8, 4)  # sizes of the forward's vector loads, widest first


# value dtype -> (C++ type in msda.cu, dtype the kernel accumulates and writes gradients in)
KERNEL_TYPES: Dict[torch.dtype, Tuple[str, torch.dtype]] = {
    torch.float32: ("float", torch.float32),
    torch.float64: ("double", torch.float64),
    torch.float16: ("half_t", torch.float32),
    torch.bfloat16: ("bfloat16_t", torch.float32),
}


def kernels_dir() -> Path:
    """The folder holding ``msda.cu``, the header it includes and the emulation header.

    Two layouts are supported: the installed package (``pip install .`` puts ``kernels/`` inside
    the package as ``ddetr_minimal/kernels``) and a copy of the repository's two folders,
    ``ddetr_minimal/`` and ``kernels/`` side by side (also what an editable install sees).
    """
    package = Path(__file__).resolve().parent.parent  # .../ddetr_minimal
    candidates = (package / "kernels", package.parent / "kernels")
    for folder in candidates:
        if all((folder / name).is_file() for name in KERNEL_FILES):
            return folder
    raise FileNotFoundError(
        f"cannot find the kernel source {' and '.join(KERNEL_FILES)}: looked in "
        + " and ".join(str(c) for c in candidates)
        + "; copy the repository's kernels/ folder next to ddetr_minimal/"
    )


_INCLUDE = re.compile(r'^#include "([^"/]+)"[^\n]*$', re.MULTILINE)


def kernel_source() -> str:
    """The CUDA C source of both kernels, as NVRTC compiles it: ``msda.cu`` with the header it
    includes from its own folder pasted in place of the ``#include`` line (so NVRTC needs no
    include path, and CuPy's cache of compiled kernels sees an edit of the header)."""
    folder = kernels_dir()
    return _INCLUDE.sub(lambda m: (folder / m.group(1)).read_text(), (folder / KERNEL_FILE).read_text())


def kernel_names(dtype: torch.dtype, loc_dtype: torch.dtype = None, width: int = 1) -> Tuple[str, str]:
    """Names of the forward and backward template instantiations for value dtype ``dtype``
    and location/weight dtype ``loc_dtype`` (default: ``dtype``); the forward reads ``width``
    channels per load (1, or one of :func:`vector_widths`).

    >>> kernel_names(torch.bfloat16, torch.float32)
    ('msda_forward<bfloat16_t, float>', 'msda_backward<bfloat16_t, float>')
    >>> kernel_names(torch.float32, width=4)[0]
    'msda_forward<float, float, 4>'
    """
    loc_dtype = dtype if loc_dtype is None else loc_dtype
    if dtype not in KERNEL_TYPES:
        raise TypeError(
            f"the kernel supports value dtypes {sorted(str(t) for t in KERNEL_TYPES)}, got {dtype}"
        )
    if loc_dtype != dtype and not (KERNEL_TYPES[dtype][1] == torch.float32 and loc_dtype == torch.float32):
        raise TypeError(
            f"the kernel takes sampling_locations and attention_weights of value's dtype {dtype}"
            f"{' or torch.float32' if KERNEL_TYPES[dtype][1] == torch.float32 else ''}, got {loc_dtype}"
        )
    if width != 1 and width not in vector_widths(dtype):
        raise ValueError(f"width must be 1 or one of {vector_widths(dtype)} for {dtype}, got {width!r}")
    types = f"{KERNEL_TYPES[dtype][0]}, {KERNEL_TYPES[loc_dtype][0]}"
    forward = f"msda_forward<{types}>" if width == 1 else f"msda_forward<{types}, {width}>"
    return forward, f"msda_backward<{types}>"


def entry_points(dtype: torch.dtype, loc_dtype: torch.dtype = None) -> Tuple[str, ...]:
    """Every kernel compiled for one dtype pair: the forward for each width (1 first), then the
    backward."""
    widths = (1, *vector_widths(dtype))
    return (*(kernel_names(dtype, loc_dtype, w)[0] for w in widths), kernel_names(dtype, loc_dtype)[1])


def vector_widths(dtype: torch.dtype) -> Tuple[int, ...]:
    """The forward's vector widths for value dtype ``dtype``, widest first: as many channels as fit
    in 16, 8 and 4 bytes, two at least. float32 (4, 2), float64 (2,), 16-bit types (8, 4, 2)."""
    if dtype not in KERNEL_TYPES:
        raise TypeError(
            f"the kernel supports value dtypes {sorted(str(t) for t in KERNEL_TYPES)}, got {dtype}"
        )
    size = torch.empty((), dtype=dtype).element_size()
    return tuple(b // size for b in VECTOR_BYTES if b // size >= 2)


def channels_per_thread(D: int, dtype: torch.dtype, data_ptr: int = 0) -> int:
    """The widest of :func:`vector_widths` that divides ``D`` and whose size in bytes divides
    ``data_ptr`` (the address of value[0, 0, 0, 0]); 1 (one channel per load) when none does."""
    size = torch.empty((), dtype=dtype).element_size()
    for width in vector_widths(dtype):
        if D % width == 0 and data_ptr % (width * size) == 0:
            return width
    return 1


def vector_width(value: torch.Tensor) -> int:
    """How many neighbouring channels each thread of the forward reads per load for ``value``
    (N, S, M, D): the widest vector that divides D and value's alignment allows (then every row
    [n, s, m, :] starts on a vector boundary too), else 1, the scalar fallback.

    A non-contiguous ``value`` is copied before the launch, into fresh (aligned) memory: its
    answer depends on D and the dtype only.

    >>> vector_width(torch.zeros(1, 4, 2, 32))
    4
    >>> vector_width(torch.zeros(1 + 1 * 4 * 2 * 32)[1:].view(1, 4, 2, 32))  # one element in: 4 bytes
    1
    """
    ptr = value.data_ptr() if value.is_contiguous() else 0
    return channels_per_thread(value.shape[-1], value.dtype, ptr)


__all__ = ["KERNEL_FILE", "KERNEL_FILES", "KERNEL_TYPES", "VECTOR_BYTES", "channels_per_thread", "entry_points",
           "kernel_names", "kernel_source", "kernels_dir", "vector_width", "vector_widths"]
