"""Does the kernel work on this device? A tiny forward and backward against the torch backend.

``backend="auto"`` must never fail where ``backend="torch"`` would work. Checking that CuPy
imports is not enough: NVRTC may not know the GPU (``invalid value for --gpu-architecture``),
the driver may find no binary for it (``CUDA_ERROR_NO_BINARY_FOR_GPU``), libnvrtc may be
missing or of another CUDA. So on first use per (device, dtype), :func:`kernel_works` runs
the kernel once on small inputs -- synchronised, inside ``try`` -- and compares its output
and gradients with the torch backend. On any failure it warns once, saying what failed and
how to fix it, and "auto" uses torch from then on. The answer is cached.

Notation as in :mod:`ddetr_minimal.ops.msda`.
"""
from __future__ import annotations

import threading
import warnings
from typing import Dict, Optional, Tuple

import torch

from . import cupy_kernel, cuda_versions
from .torch_backend import ms_deform_attn_torch

# tolerance relative to max(1, |reference|), per value dtype (16-bit: one rounding of the result)
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}

_RESULTS: Dict[Tuple[str, torch.dtype, torch.dtype], Optional[str]] = {}  # None: passed; str: why not
_LOCK = threading.Lock()


class SelfTestMismatch(RuntimeError):
    """The kernel ran but its numbers disagree with the torch backend."""


def tiny_inputs(device, dtype, loc_dtype):
    """N=1, M=2, D=33 (more channels than lanes), Lq=3, two levels, P=2; some points off the map."""
    g = torch.Generator().manual_seed(0)
    shapes = torch.tensor([[3, 4], [2, 2]])  # (L, 2)
    starts = torch.tensor([0, 12])  # (L,)
    value = torch.randn(1, 16, 2, 33, generator=g, dtype=torch.float64)  # (N, S, M, D)
    loc = torch.rand(1, 3, 2, 2, 2, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2  # (N, Lq, M, L, P, 2)
    weights = torch.rand(1, 3, 2, 2, 2, generator=g, dtype=torch.float64)  # (N, Lq, M, L, P)
    grad_out = torch.randn(1, 3, 66, generator=g, dtype=torch.float64)  # (N, Lq, M*D)
    return (value.to(device, dtype), shapes.to(device), starts.to(device), loc.to(device, loc_dtype),
            weights.to(device, loc_dtype), grad_out.to(device, dtype))


def self_test(device: torch.device, dtype: torch.dtype, loc_dtype: torch.dtype, launch=None) -> None:
    """Run the kernel's forward and backward once on ``device``; raise on any failure or mismatch."""
    # the first call may come under torch.inference_mode (evaluation): the reference needs autograd
    with torch.inference_mode(False):
        _self_test(device, dtype, loc_dtype, cupy_kernel.cupy_launch if launch is None else launch)


def _self_test(device, dtype, loc_dtype, launch) -> None:
    value, shapes, starts, loc, weights, grad_out = tiny_inputs(device, dtype, loc_dtype)
    first = value[..., :32].contiguous()  # (N, S, M, 32): D = 32 takes every vector width
    widths = cupy_kernel.vector_widths(dtype)
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        got = (cupy_kernel.run_forward(launch, value, shapes, starts, loc, weights),  # D = 33: one channel per load
               *cupy_kernel.run_backward(launch, grad_out, value, shapes, starts, loc, weights))
        vector = [cupy_kernel.run_forward(launch, first, shapes, starts, loc, weights, width=w) for w in widths]
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # a launch error surfaces here, inside the caller's try
    from .library import autograd_inside_kernel  # this runs inside the op's kernel

    with autograd_inside_kernel(), torch.autocast(device.type, enabled=False):
        leaves = [t.detach().double().requires_grad_(True) for t in (value, loc, weights)]
        out = ms_deform_attn_torch(leaves[0], shapes.cpu(), starts.cpu(), leaves[1], leaves[2])
        want = (out.detach(), *torch.autograd.grad(out, leaves, grad_out.double()))
    N, Lq, M, D = *want[0].shape[:2], value.shape[2], value.shape[3]
    want_first = want[0].view(N, Lq, M, D)[..., :32].reshape(N, Lq, M * 32)  # (N, Lq, M*32)
    tol = TOLERANCE[dtype]
    for name, a, b in zip(("output", "grad value", "grad sampling_locations", "grad attention_weights",
                           *(f"output with {w} channels per load" for w in widths)),
                          (*got, *vector), (*want, *[want_first] * len(widths))):
        err = (a.double() - b.double()).abs().max().item()
        scale = max(1.0, b.abs().max().item())
        if not err <= tol * scale:  # also catches NaN
            raise SelfTestMismatch(f"{name} differs from the torch backend by {err:.3g} (tolerance "
                                   f"{tol * scale:.3g})")


def kernel_works(device: torch.device, dtype: torch.dtype, loc_dtype: torch.dtype, launch=None) -> bool:
    """True when the kernel runs and agrees with torch on ``device`` for this dtype pair.

    Runs :func:`self_test` once per (device, dtype, loc dtype); on failure warns once (the
    error and the fix) and returns False from then on. Never raises.
    """
    key = (str(device), dtype, loc_dtype)
    with _LOCK:
        if key in _RESULTS:
            return _RESULTS[key] is None
        problem = None
        if device.type == "cuda" and not cupy_kernel.is_available():
            problem = "; ".join(cupy_kernel.missing())
            # CuPy not installed is a choice, not a fault: say nothing unless the builds clash
            loud = cuda_versions.mismatch() is not None
        else:
            try:
                cupy_kernel.kernel_names(dtype, loc_dtype)
                self_test(device, dtype, loc_dtype, launch)
            except Exception as exc:  # compile, load, launch, illegal address, wrong numbers
                problem = f"{type(exc).__name__}: {exc}"
            loud = problem is not None
        _RESULTS[key] = problem
    if loud:
        warnings.warn(
            f"the CUDA kernel of ms_deform_attn failed its self-test on {device} for value dtype "
            f"{dtype} and location dtype {loc_dtype}, so backend='auto' uses backend='torch' there "
            f"from now on. The error: {problem}\n{cuda_versions.fix_hint()}",
            RuntimeWarning, stacklevel=3)
    return problem is None


def forget() -> None:
    """Clear the cached answers (tests; or after fixing the setup in a live session)."""
    with _LOCK:
        _RESULTS.clear()
