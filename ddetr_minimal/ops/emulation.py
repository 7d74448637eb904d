"""Run the CUDA kernels of ``kernels/msda.cu`` on the CPU, to check them without a GPU.

The same ``.cu`` file that CuPy compiles for the GPU is compiled here by ``g++`` as
plain C++, with ``kernels/cuda_host_emulation.h`` standing in for CUDA: it defines
``threadIdx`` and friends, ``atomicAdd`` and the warp shuffles, and plays a kernel launch
by running every thread of every block, one after another, with the 32 lanes of a warp
meeting at each shuffle as on a GPU. The result is a shared library loaded with
:mod:`ctypes`; it exports one function, ``emu_launch(name, grid, block, args)``, shaped
like CUDA's own ``cuLaunchKernel``: the kernel's name, the grid and block sizes, and an
array of pointers to the kernel's arguments.

:func:`ms_deform_attn_emulated` plugs that launcher into the very code the GPU path uses
(the op ``torch.ops.ddetr_minimal.ms_deform_attn`` of :mod:`ddetr_minimal.ops.library` and
:func:`ddetr_minimal.ops.cupy_kernel.run_forward`), so the argument order, the grid sizes, the
output allocation and the autograd plumbing are checked along with the kernels::

    from .emulation import ms_deform_attn_emulated
    out = ms_deform_attn_emulated(value, spatial_shapes, level_start_index, locations, weights)
    out.sum().backward()   # runs msda_backward<float, float> on the CPU

It is slow (every GPU thread becomes a CPU fiber): use small inputs. The library is built
once into a cache directory (``$DDETR_MINIMAL_CACHE``, else ``~/.cache/ddetr_minimal``) and
rebuilt automatically when the sources or the compiler command change.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import List, Optional, Sequence, Union

import torch

from .cupy_kernel import KERNEL_FILE, KERNEL_FILES, MAX_BLOCKS, kernels_dir, KernelArg

HEADER_FILE = "cuda_host_emulation.h"
CXX = os.environ.get("CXX", "g++")
CXX_FLAGS = ("-std=c++17", "-O2", "-shared", "-fPIC", "-x", "c++")
_LAUNCH_LOCK = threading.Lock()  # the emulator plays one grid at a time (it has global state)


def default_cache_dir() -> Path:
    """Where built libraries go: ``$DDETR_MINIMAL_CACHE`` or ``~/.cache/ddetr_minimal/kernel_emulation``."""
    if os.environ.get("DDETR_MINIMAL_CACHE"):
        return Path(os.environ["DDETR_MINIMAL_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "ddetr_minimal" / "kernel_emulation"


def compile_command(source: Path, output: Path) -> List[str]:
    """The g++ command line that turns a ``.cu`` file into a CPU shared library (``-I``: a copy of
    ``msda.cu`` elsewhere still finds the header it includes)."""
    folder = kernels_dir()
    return [CXX, *CXX_FLAGS, "-I", str(folder), "-include", str(folder / HEADER_FILE), str(source), "-o", str(output)]


def build(source: Optional[Union[str, Path]] = None, cache_dir: Optional[Union[str, Path]] = None) -> Path:
    """Compile ``source`` (default: ``kernels/msda.cu``) for the CPU; return the library's path.

    The file name carries a hash of the source, the headers in ``kernels/`` and the compiler
    command, so an edited kernel gets a fresh build and an unchanged one is reused.
    Raises ``RuntimeError`` with the compiler's messages when compilation fails.
    """
    source = Path(source) if source is not None else kernels_dir() / KERNEL_FILE
    if not source.is_file():
        raise FileNotFoundError(f"source must be an existing .cu file, got {source}")
    if shutil.which(CXX) is None:
        raise RuntimeError(f"the CPU emulation needs a C++ compiler; {CXX!r} was not found (apt install g++)")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    headers = [(kernels_dir() / name).read_bytes() for name in (HEADER_FILE, *KERNEL_FILES[1:])]
    for part in (source.read_bytes(), *headers, " ".join(CXX_FLAGS).encode(), CXX.encode()):
        digest.update(part)
    target = cache / f"{source.stem}-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    # Build under a temporary name, then rename: a reader never sees a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    result = subprocess.run(compile_command(source, Path(tmp)), capture_output=True, text=True)
    if result.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"compiling {source} for the CPU failed:\n{result.stderr}")
    os.replace(tmp, target)
    return target


@functools.lru_cache(maxsize=None)
def _load(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    lib.emu_launch.restype = ctypes.c_int
    lib.emu_launch.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint),
                               ctypes.POINTER(ctypes.c_void_p)]
    lib.emu_last_error.restype = ctypes.c_char_p
    return lib


def load(source: Optional[Union[str, Path]] = None, cache_dir: Optional[Union[str, Path]] = None) -> ctypes.CDLL:
    """Build (if needed) and load the emulation library of ``source`` (default ``msda.cu``)."""
    return _load(str(build(source, cache_dir)))


def _as_c_argument(arg: KernelArg):
    """A kernel argument as the C value the kernel expects: pointer for tensors, int otherwise."""
    if isinstance(arg, torch.Tensor):
        if arg.device.type != "cpu" or not arg.is_contiguous():
            raise ValueError(f"the CPU emulation needs contiguous CPU tensors, got one on {arg.device} "
                             f"(contiguous={arg.is_contiguous()})")
        return ctypes.c_void_p(arg.data_ptr())
    if isinstance(arg, bool) or not isinstance(arg, int):
        raise TypeError(f"kernel arguments must be tensors or ints, got {type(arg).__name__}")
    return ctypes.c_int(arg)


def launch(name: str, grid: Union[int, Sequence[int]], block: Union[int, Sequence[int]],
           args: Sequence[KernelArg], library: Optional[ctypes.CDLL] = None) -> None:
    """Run the kernel ``name`` (e.g. ``"msda_forward<float>"``) over ``grid`` x ``block`` threads.

    ``grid`` and ``block`` are ints or (x, y, z) tuples, as in ``kernel<<<grid, block>>>``;
    ``args`` are the kernel's arguments in order: contiguous CPU tensors (passed as
    pointers) and Python ints (passed as C ``int``). Raises ``RuntimeError`` with the
    emulator's message when the launch fails (unknown kernel, broken shuffle, deadlock).
    """
    lib = library if library is not None else load()

    def dims(v):
        v = (v,) if isinstance(v, int) else tuple(v)
        return (ctypes.c_uint * 3)(*(list(v) + [1, 1])[:3])

    values = [_as_c_argument(a) for a in args]  # keep them alive during the call
    pointers = (ctypes.c_void_p * max(1, len(values)))(*[ctypes.addressof(v) for v in values])
    with _LAUNCH_LOCK:
        status = lib.emu_launch(name.encode(), dims(grid), dims(block), pointers)
        message = lib.emu_last_error().decode()
    if status != 0:
        raise RuntimeError(f"emulated launch of {name} failed: {message}")


def cpu_launch(name: str, grid: int, block: int, args: Sequence[KernelArg]) -> None:
    """The launcher of the "emulation" backend: :func:`launch` on the default library."""
    launch(name, grid, block, args, library=load())


def ms_deform_attn_emulated(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                            max_blocks: Optional[int] = None):
    """Multi-scale deformable attention computed by the CUDA kernels running on the CPU.

    Same contract as :func:`ddetr_minimal.ops.msda.ms_deform_attn` (CPU tensors); returns
    (N, Lq, M*D) and supports ``backward()``, which runs the backward kernel. Supported
    dtypes: float32, float64, float16 and bfloat16 (accumulated in float32; their locations
    and weights may be float32). ``max_blocks`` caps the grid (the kernels then loop
    grid-stride); small values make every thread serve several outputs, which the tests
    use to check that loop.
    """
    from .msda import ms_deform_attn  # the op's one entry point: checks once, then the custom op

    if isinstance(value, torch.Tensor) and value.device.type != "cpu":
        raise ValueError(f"the CPU emulation needs CPU tensors, but value is on {value.device}")
    return ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                          backend="emulation", max_blocks=max_blocks or MAX_BLOCKS)


__all__ = ["build", "compile_command", "cpu_launch", "default_cache_dir", "launch", "load", "ms_deform_attn_emulated"]
