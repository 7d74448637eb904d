"""Shared fixtures: small random inputs for the op in the layout of its contract."""
import os

os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch

from ddetr_minimal.ops.random_inputs import random_op_inputs


def make_op_inputs(shapes, N=2, Lq=5, M=2, D=3, P=2, dtype=torch.float64, lo=-0.2, hi=1.2, seed=0,
                   requires_grad=False):
    """Random op inputs with some locations off the maps (see ``random_op_inputs``)."""
    return random_op_inputs(shapes, N=N, Lq=Lq, M=M, D=D, P=P, dtype=dtype, loc_range=(lo, hi), seed=seed,
                            requires_grad=requires_grad)


def output_and_grads(fn, inputs, grad_output=None):
    """Forward output and the gradients of value, sampling locations and attention weights of
    ``fn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)``; the
    output's gradient is ``grad_output``, random (seed 1) when None."""
    # detach, not clone: a clone would move a deliberately misaligned value to aligned memory
    value, shapes, starts, loc, weights = [t.detach() for t in inputs]
    for t in (value, loc, weights):
        t.requires_grad_(True)
    out = fn(value, shapes, starts, loc, weights)
    if grad_output is None:
        grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(out, (value, loc, weights), grad_output.to(out.dtype))
    return (out.detach(), *grads)


def giou_cxcywh(a, b):
    """GIoU of two (cx, cy, w, h) boxes, written out from its definition (for checking the library)."""
    ax1, ay1, ax2, ay2 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx1, by1, bx2, by2 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0, min(ax2, bx2) - max(ax1, bx1)) * max(0, min(ay2, by2) - max(ay1, by1))
    union = a[2] * a[3] + b[2] * b[3] - inter
    hull = (max(ax2, bx2) - min(ax1, bx1)) * (max(ay2, by2) - min(ay1, by1))
    return inter / union - (hull - union) / hull


@pytest.fixture
def op_inputs():
    return make_op_inputs


def pytest_configure(config):
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
