"""The torch backend on GPUs: multi-scale deformable attention vectorised with ``grid_sample``.

``grid_sample`` does the bilinear read (zeros outside the map, pixel centres at
``(i + 0.5) / size``) for every point of a level at once; the attention weights then mix the
samples. Level by level, so that the largest tensor alive is one level's samples::

    for each level l:
        samples_l = grid_sample(value_l, grid_l)        # (N*M, D, P, Lq)
        for each point p:
            out += samples_l[:, :, p] * weights_l[:, :, p]  # (N*M, D, Lq), one addcmul

Five choices make this the fastest ``grid_sample`` formulation measured on a CPU
(``python -m ddetr_minimal bench-formulations`` records the alternatives; on the CPU the torch
backend runs :mod:`.sparse` instead, faster still):

* **one level at a time, summed as it comes**, instead of stacking the samples of all levels
  into one ``(N*M, D, Lq, L, P)`` tensor first. The stacked tensor is ``L`` times larger than
  one level's, and every pass over it (the stack itself, the product with the weights, and
  both again in the backward pass) reads and writes main memory; a level's samples are small
  enough to be reused from cache, and a fresh allocation of that size does not have to be
  mapped and zeroed page by page by the operating system;
* **points before queries** in the grid, ``(N*M, P, Lq, 2)``, so that each point's samples
  are one contiguous ``(N*M, D, Lq)`` block (vectorised), not every ``P``-th number;
* **one multiply-add per point** (``addcmul``) into the output, so that no product as large as
  the samples is written in the forward pass, nor its counterpart (for the weights' gradient)
  in the backward pass: the only tensors of that size are the samples and their gradient;
* **levels split once** (``split``/``unbind``), so that the backward pass assembles the
  gradient of ``value``, of the locations and of the weights in one concatenation each,
  instead of one full-size zero tensor per level;
* **a contiguous gradient before it fans out**: the output's gradient comes back transposed
  (queries before channels); copying it once, small, spares ``grid_sample``'s backward a
  transposing copy of each level's ``P`` times larger gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def ms_deform_attn_grid_sample(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """The op (see :func:`ddetr_minimal.ops.msda.ms_deform_attn`) with one ``grid_sample`` per level."""
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    values = value.split([H * W for H, W in shapes], dim=1)  # L x (N, H*W, M, D)
    # grid_sample wants [-1, 1]; points before queries, one (N*M, P, Lq, 2) grid per level
    grids = (2 * sampling_locations - 1).permute(3, 0, 2, 4, 1, 5)  # (L, N, M, P, Lq, 2)
    grids = grids.reshape(L, N * M, P, Lq, 2).contiguous().unbind(0)  # L x (N*M, P, Lq, 2)
    weights = attention_weights.permute(3, 0, 2, 4, 1)  # (L, N, M, P, Lq)
    weights = weights.reshape(L, N * M, 1, P, Lq).contiguous().unbind(0)  # L x (N*M, 1, P, Lq)
    out = value.new_zeros(N * M, D, Lq)
    for (H, W), value_l, grid_l, weight_l in zip(shapes, values, grids, weights):
        value_l = value_l.permute(0, 2, 3, 1).reshape(N * M, D, H, W)  # (N*M, D, H, W)
        samples = F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros",
                                align_corners=False)  # (N*M, D, P, Lq)
        for samples_p, weight_p in zip(samples.unbind(2), weight_l.unbind(2)):  # (N*M, D, Lq), (N*M, 1, Lq)
            out = torch.addcmul(out, samples_p, weight_p)  # out + samples_p * weight_p, (N*M, D, Lq)
    if out.requires_grad:
        # the gradient arrives transposed from the (N, Lq, M*D) output; made contiguous here, at
        # 1/P of the size, grid_sample's backward does not have to copy every level's samples' gradient
        out.register_hook(lambda grad: None if grad is None else grad.contiguous())
    return out.view(N, M * D, Lq).transpose(1, 2).contiguous()  # (N, Lq, M*D)
