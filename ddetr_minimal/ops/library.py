"""The op as a PyTorch custom operator: ``torch.ops.ddetr_minimal.ms_deform_attn``.

Registered with :mod:`torch.library`, so that ``torch.compile(fullgraph=True)`` sees one
opaque op with a known output shape instead of tracing into the backends (whose Python
reads the level table's values, which a graph cannot guard on):

* ``ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
  attention_weights, backend, max_blocks) -> (N, Lq, M*D)`` and
  ``ms_deform_attn_backward(grad_output, ...) -> (grad value, grad locations, grad weights)``;
* a fake (meta) implementation of each, which only computes shapes;
* autograd: the forward saves its inputs, the backward calls the backward op.

``backend`` is ``"torch"``, ``"cupy"``, ``"auto"`` (resolved here, at run time: the kernel
for CUDA tensors when its self-test passed, else torch) or ``"emulation"`` (the kernel run on
the CPU, for tests). ``max_blocks`` caps the kernel's grid (0: no cap beyond CUDA's).

Precision: with 16-bit values both backends compute in float32 and round the result once;
sampling locations and attention weights may stay float32 (see ``msda.sampling_dtype``).
Notation as in :mod:`ddetr_minimal.ops.msda`.
"""
import contextlib
import sys
from typing import Tuple

import torch
from torch import Tensor

from . import cupy_kernel, selftest
from .checks import SIXTEEN_BIT, level_table
from .torch_backend import ms_deform_attn_torch

OP_BACKENDS = ("auto", "torch", "cupy", "emulation")
KERNEL_DEVICE_TYPES = ("cuda",)  # where "auto" may pick the kernel


def _capturing(value: Tensor) -> bool:
    return value.is_cuda and torch.cuda.is_current_stream_capturing()


def resolve(backend: str, value: Tensor, loc_dtype: torch.dtype) -> str:
    """The backend that runs: "auto" becomes "cupy" or "torch"; "cupy" raises if it cannot run."""
    if backend not in OP_BACKENDS:
        raise ValueError(f"backend must be one of {OP_BACKENDS}, got {backend!r}")
    if backend == "cupy":
        cupy_kernel.require_gpu(value)
        cupy_kernel.kernel_names(value.dtype, loc_dtype)  # TypeError before anything compiles
    if backend != "auto":
        return backend
    if value.device.type not in KERNEL_DEVICE_TYPES or value.dtype not in cupy_kernel.KERNEL_TYPES:
        return "torch"
    # deterministic mode: the kernel's backward adds with atomics; during CUDA graph capture
    # the self-test's synchronisation is not allowed
    if torch.are_deterministic_algorithms_enabled() or _capturing(value):
        return "torch"
    return "cupy" if selftest.kernel_works(value.device, value.dtype, loc_dtype) else "torch"


def launcher(name: str):
    """The launcher of a kernel backend: CuPy on the GPU, or the CPU emulation."""
    if name == "emulation":
        from .emulation import cpu_launch

        return cpu_launch
    return cupy_kernel.cupy_launch  # looked up per call, so a test can replace it


def _compute_dtype(value: Tensor) -> torch.dtype:
    return torch.float32 if value.dtype in SIXTEEN_BIT else value.dtype


def torch_forward(value, table, loc, weights) -> Tensor:
    """The torch backend on a checked level table: float32 compute for 16-bit values. (N, Lq, M*D)"""
    dtype = _compute_dtype(value)
    with torch.autocast(value.device.type, enabled=False):
        out = ms_deform_attn_torch(value.to(dtype), table.cpu_shapes, table.cpu_starts, loc.to(dtype),
                                   weights.to(dtype))  # (N, Lq, M*D)
    return out.to(value.dtype)


@contextlib.contextmanager
def autograd_inside_kernel():
    """Let autograd record again inside a custom op's kernel.

    The dispatcher runs a custom op's kernel below the autograd layer (autograd keys excluded
    from the thread's dispatch set), so ``torch.enable_grad()`` alone records nothing there.
    The torch backend's backward differentiates its forward by recomputing it, so it puts
    the autograd keys back for that block. (``torch.func.vjp`` would also work, but its
    wrapper tensors break ``torch.library.opcheck``'s schema and fake-tensor checks.)
    """
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (keys.AutogradFunctionality, keys.AutogradOther, keys.AutogradNestedTensor, keys.ADInplaceOrView):
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), \
            torch.enable_grad():
        yield


def _torch_backward(grad_output, value, table, loc, weights):
    dtype = _compute_dtype(value)
    with autograd_inside_kernel(), torch.autocast(value.device.type, enabled=False):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in (value, loc, weights)]
        out = ms_deform_attn_torch(leaves[0], table.cpu_shapes, table.cpu_starts, leaves[1], leaves[2])
        grads = torch.autograd.grad(out, leaves, grad_output.to(dtype), allow_unused=True)
    return tuple((torch.zeros_like(t) if g is None else g).to(t.dtype).contiguous()
                 for g, t in zip(grads, (value, loc, weights)))


def _forward_kernel(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                    backend, max_blocks):
    table = level_table(spatial_shapes, level_start_index, value.shape[1])
    name = resolve(backend, value, sampling_locations.dtype)
    if name == "torch":
        return torch_forward(value, table, sampling_locations, attention_weights)
    return cupy_kernel.run_forward(launcher(name), value, spatial_shapes, level_start_index,
                                   sampling_locations, attention_weights,
                                   max_blocks=max_blocks or cupy_kernel.MAX_BLOCKS)


def _this():
    """This module as ``sys.modules`` has it now. Importing the module again (a reloaded
    package, a test that re-imports it) registers the op again, replacing the kernels below;
    looking the bodies up at call time keeps the live module's code in charge."""
    return sys.modules[__name__]


@torch.library.custom_op("ddetr_minimal::ms_deform_attn", mutates_args=())
def ms_deform_attn_op(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                      sampling_locations: Tensor, attention_weights: Tensor, backend: str,
                      max_blocks: int) -> Tensor:
    """(N, Lq, M*D). Inputs' metadata are checked by the caller; the level table here, once."""
    return _this()._forward_kernel(value, spatial_shapes, level_start_index, sampling_locations,
                                   attention_weights, backend, max_blocks)


@ms_deform_attn_op.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend, max_blocks):
    N, _, M, D = value.shape
    return value.new_empty(N, sampling_locations.shape[1], M * D)  # (N, Lq, M*D)


@torch.library.custom_op("ddetr_minimal::ms_deform_attn_backward", mutates_args=())
def ms_deform_attn_backward_op(grad_output: Tensor, value: Tensor, spatial_shapes: Tensor,
                               level_start_index: Tensor, sampling_locations: Tensor,
                               attention_weights: Tensor, backend: str,
                               max_blocks: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of value (N, S, M, D), locations (N, Lq, M, L, P, 2), weights (N, Lq, M, L, P)."""
    return _this()._backward_kernel(grad_output, value, spatial_shapes, level_start_index,
                                    sampling_locations, attention_weights, backend, max_blocks)


def _backward_kernel(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                     attention_weights, backend, max_blocks):
    table = level_table(spatial_shapes, level_start_index, value.shape[1])
    name = resolve(backend, value, sampling_locations.dtype)
    if name == "torch":
        return _torch_backward(grad_output, value, table, sampling_locations, attention_weights)
    return cupy_kernel.run_backward(launcher(name), grad_output, value, spatial_shapes, level_start_index,
                                    sampling_locations, attention_weights,
                                    max_blocks=max_blocks or cupy_kernel.MAX_BLOCKS)


@ms_deform_attn_backward_op.register_fake
def _(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
      backend, max_blocks):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device)  # contiguous, as both backends give
                 for t in (value, sampling_locations, attention_weights))


def _setup_context(ctx, inputs, output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend, max_blocks = inputs
    ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    ctx.backend, ctx.max_blocks = backend, max_blocks


def _backward(ctx, grad_output):
    grad_value, grad_loc, grad_weights = ms_deform_attn_backward_op(grad_output, *ctx.saved_tensors,
                                                                    ctx.backend, ctx.max_blocks)
    return grad_value, None, None, grad_loc, grad_weights, None, None


torch.library.register_autograd("ddetr_minimal::ms_deform_attn", _backward, setup_context=_setup_context)
