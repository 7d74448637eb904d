"""Backend ``"torch"``: the op in pure PyTorch, on every device.

* on the CPU, in float32 or float64: :mod:`.sparse`, the op as sparse matrix products, the
  fastest formulation measured on a CPU (``python -m ddetr_minimal bench-formulations``);
* elsewhere (CUDA tensors, other dtypes): :mod:`.grid_sample`, one ``grid_sample`` per level.

Both compute the same numbers and gradients as the ``loop`` reference, up to the order in which
floating-point terms are added (and the one-sided derivative a location gets exactly on a pixel
centre, where bilinear interpolation has a kink); the tests hold each of them to it. Only
:mod:`.grid_sample` supports second-order gradients.
"""
from __future__ import annotations

import torch

from .grid_sample import ms_deform_attn_grid_sample
from .sparse import ms_deform_attn_sparse

SPARSE_DTYPES = (torch.float32, torch.float64)


def formulation(value: torch.Tensor) -> str:
    """``"sparse"`` or ``"grid_sample"``: which formulation the torch backend runs for ``value``."""
    return "sparse" if value.device.type == "cpu" and value.dtype in SPARSE_DTYPES else "grid_sample"


def ms_deform_attn_torch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """The op (see :func:`ddetr_minimal.ops.msda.ms_deform_attn`) on the formulation that suits
    ``value``'s device and dtype. ``spatial_shapes`` and ``level_start_index`` on the CPU."""
    fn = ms_deform_attn_sparse if formulation(value) == "sparse" else ms_deform_attn_grid_sample
    return fn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
