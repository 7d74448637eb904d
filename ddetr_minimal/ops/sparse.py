"""The torch backend on the CPU: multi-scale deformable attention as sparse matrix products.

Every output row -- one query ``q`` of one head ``m`` in one image ``n`` -- is a weighted sum
of value rows: ``L * P`` points, four bilinear corners each, every corner weighted by its
point's attention weight times its bilinear weight. Taking one corner ``k`` of every point at a
time, that is a matrix ``A_k`` with one row per ``(n, q, m)``, one column per value row
``(n, s, m)`` and ``L * P`` nonzeros per row, and the whole op is::

    out = sum_k A_k @ value.view(N * S * M, D)           # A_k: (N*Lq*M, N*S*M)

Its backward pass is two more products with the same nonzeros::

    grad_value = sum_k A_k.T @ grad_out                   # every corner's scatter, as a product
    g_k        = (grad_out @ value.T)[nonzeros of A_k]    # one dot product per corner

from which the attention weights' gradient (``g`` times the bilinear weights) and the
locations' gradient (``g`` times the bilinear weights' slopes) follow point by point.

Why this is the fastest formulation measured on a CPU (``python -m ddetr_minimal
bench-formulations``): ``grid_sample`` reads a corner channel by channel from ``D`` planes
and, in the backward pass, adds its gradient back the same way, one scalar at a time, which is
most of the op's time at small ``D``. Here a corner is one row of ``D`` contiguous numbers,
read, dotted and added by PyTorch's sparse kernels (MKL's where PyTorch is built with it), and
no tensor of samples (``D`` numbers per point) is ever written to memory (except on maps
smaller than the points per query, see :func:`corner_dots`). Rows ``(n, q, m)`` are the
output's ``(N, Lq, M*D)`` memory and columns ``(n, s, m)`` are ``value``'s ``(N, S, M, D)``
rows, so neither needs a transposing copy.

**A ring of zeros around every level.** ``value`` is copied once into maps one pixel larger on
every side, zeros in the ring. A neighbour just off the map then reads a zero from the ring, so
no weight needs an on-map mask, and a point further out is clamped onto the ring (the location
gradient is zero there, as ``grid_sample``'s). The ring also makes the transpose cheap:
``A_k.T``'s rows are ``A_k``'s columns, found by sorting the corners by the value row they
read. Without clamping onto the map, corner ``k`` of a point reads a fixed offset from its
corner ``(0, 0)``: one pixel right is ``M`` value rows on, one pixel down ``(W + 2) * M``. That
offset is the same for every point of a level, and each level's rows are one contiguous block,
so adding it keeps the order: one stable sort of the points by corner ``(0, 0)`` orders all four
corners at once. The sort is stable and each output row of a product is summed by one thread
(MKL splits the work by rows), so every sum runs in the same order, whatever the threads.

The matrices are CSR tensors built with ``check_invariants=False`` on purpose: two points (or
corners) may read the same value row, so a row can list a column twice, unsorted, and ``A_k.T``
can have more entries in a row than columns. PyTorch's products add such duplicate entries
(tested against the loop reference, all points on one pixel included); its stricter invariants
would require coalescing them, an extra sort per matrix.

Second-order gradients (``create_graph=True`` through the backward pass) are not supported
(the backward pass is one custom function, as the official CUDA kernel's is); the ``loop``
backend and :mod:`.grid_sample` support them.

Every per-point step runs on whole ``(N, Lq, M, L, P)`` tensors of one dtype (tensors broadcast
over a short last axis run many times slower), in place where a tensor is not needed again:
every fresh tensor of that size costs page faults, often more than its arithmetic.

Bilinear reading as ``grid_sample`` does it (``align_corners=False``, zeros outside the map):
pixel centres at ``(i + 0.5) / size``. NaN or infinite locations give NaN outputs for their
head and add nothing to ``value``'s gradient.
"""
from __future__ import annotations

import warnings
from typing import List, NamedTuple, Sequence, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

# PyTorch warns once that sparse CSR support is in beta; the products used here are stable
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)

# The four corners of a point, k = 0..3, in the order of every (4, ...) tensor below:
# (y neighbour, x neighbour) = (lower, lower), (lower, upper), (upper, lower), (upper, upper).


def index_dtype_for(*counts: int) -> torch.dtype:
    """int32 indices (MKL's fastest) while every count fits, else int64."""
    return torch.int32 if max(counts) < 2**31 else torch.int64


# --- the ring of zeros ------------------------------------------------------------------------

def ringed(shapes: Sequence[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """(H + 2, W + 2) of every level: the maps with their ring."""
    return [(H + 2, W + 2) for H, W in shapes]


def with_ring(value: Tensor, shapes: Sequence[Tuple[int, int]]) -> Tensor:
    """(N, S, M, D) -> (N, S_ring, M, D): every level's map inside a ring of zeros."""
    N, _, M, D = value.shape
    out = value.new_zeros(N, sum(H * W for H, W in ringed(shapes)), M, D)
    for inner, outer in zip(_levels(value, shapes), _levels(out, ringed(shapes))):
        outer[:, 1:-1, 1:-1] = inner
    return out


def without_ring(grad: Tensor, shapes: Sequence[Tuple[int, int]]) -> Tensor:
    """The inverse cut: (N, S_ring, M, D) -> (N, S, M, D)."""
    N, _, M, D = grad.shape
    out = grad.new_empty(N, sum(H * W for H, W in shapes), M, D)
    for inner, outer in zip(_levels(out, shapes), _levels(grad, ringed(shapes))):
        inner.copy_(outer[:, 1:-1, 1:-1])
    return out


def _levels(t: Tensor, shapes) -> List[Tensor]:
    """(N, sum H*W, M, D) -> one (N, H, W, M, D) view per level."""
    N, _, M, D = t.shape
    return [v.view(N, H, W, M, D) for (H, W), v in zip(shapes, t.split([H * W for H, W in shapes], 1))]


# --- where every corner reads -----------------------------------------------------------------

class Axis(NamedTuple):
    """One axis of the bilinear read for every point, (N, Lq, M, L, P) each."""

    low: Tensor  # the lower neighbour's pixel index, -1 .. size - 1 (-1 and size are the ring)
    frac: Tensor  # the upper neighbour's weight; the lower one's is 1 - frac
    gain: Tensor  # d pixel / d location (the level's size) times the attention weight; 0 where the
    # location was clamped onto the ring (it does not move the samples there)


def _axis(coord: Tensor, size: Tensor, weights: Tensor) -> Axis:
    """``coord`` (in [0, 1]), ``size`` (the level's width or height in pixels) and the attention
    ``weights``, all (N, Lq, M, L, P)."""
    pixel = coord * size
    pixel -= 0.5  # pixel centres at integers
    # a NaN or infinite location has no defined sample: its weights (and gain) become NaN
    undefined = pixel * 0  # 0, or NaN where the pixel is not finite
    gain = ((pixel >= -1) & (pixel < size)).to(coord.dtype).add_(undefined).mul_(size).mul_(weights)
    pixel = torch.clamp(pixel, pixel.new_tensor(-1.0), size)  # onto the ring
    low = torch.minimum(pixel.floor(), size - 1)  # pixel = size reads the ring with weight 1
    frac = pixel.sub_(low).add_(undefined)
    return Axis(torch.nan_to_num_(low, nan=-1.0), frac, gain)  # undefined points read the ring


class Geometry(NamedTuple):
    """Where every point's corners read and with what weight."""

    first: Tensor  # (N, Lq, M, L, P): value row (ringed) of corner (0, 0), (n * S_ring + s) * M + m
    values: Tensor  # (4, N, Lq, M, L, P): attention weight * bilinear weight, corner by corner
    x: Axis
    y: Axis


def per_point(level_numbers: Sequence, points: Sequence[int], dtype) -> Tensor:
    """One number per level -> (N, Lq, M, L, P), written out once, so that the steps that use
    it run over flat tensors instead of broadcasting over the short last axis P."""
    return torch.tensor(level_numbers, dtype=dtype).view(-1, 1).expand(*points).contiguous()


def geometry(shapes: Sequence[Tuple[int, int]], loc: Tensor, weights: Tensor, index_dtype: torch.dtype
             ) -> Geometry:
    """The corners of every point: ``shapes`` the levels' (H, W); ``loc`` (N, Lq, M, L, P, 2) in
    [0, 1], x then y; ``weights`` (N, Lq, M, L, P). Value rows are those of :func:`with_ring`."""
    N, Lq, M, L, P, _ = loc.shape
    points = (N, Lq, M, L, P)
    x = _axis(loc[..., 0], per_point([W for _, W in shapes], points, loc.dtype), weights)
    y = _axis(loc[..., 1], per_point([H for H, _ in shapes], points, loc.dtype), weights)
    rings = ringed(shapes)
    starts = [sum(h * w for h, w in rings[:l]) for l in range(L)]
    step = per_point([w for _, w in rings], points, index_dtype)  # W + 2
    n = torch.arange(N, dtype=index_dtype).view(N, 1, 1, 1, 1)
    m = torch.arange(M, dtype=index_dtype).view(1, 1, M, 1, 1)
    S_ring = sum(h * w for h, w in rings)
    # (n * S_ring + start + (y + 1) * (W + 2) + x + 1) * M + m, pixel indices from -1 on
    first = per_point([start + w + 1 for start, (_, w) in zip(starts, rings)], points, index_dtype)
    first += n * S_ring
    first += y.low.to(index_dtype) * step + x.low.to(index_dtype)
    first = first * M + m
    values = torch.empty((4, N, Lq, M, L, P), dtype=loc.dtype)
    upper = weights * y.frac
    for i, w_y in ((1, upper), (0, weights - upper)):  # attention weight * y weight
        torch.mul(w_y, x.frac, out=values[2 * i + 1])
        torch.sub(w_y, values[2 * i + 1], out=values[2 * i])
    return Geometry(first, values, x, y)


def corner_columns(first: Tensor, shapes: Sequence[Tuple[int, int]], M: int) -> Tensor:
    """(4, N, Lq, M, L, P): the value row each corner reads, ``first`` (corner (0, 0)) plus its
    fixed offset: ``M`` to the right, ``(W + 2) * M`` down."""
    columns = torch.empty((4, *first.shape), dtype=first.dtype)
    columns[0] = first
    torch.add(first, M, out=columns[1])
    torch.add(first, per_point([w * M for _, w in ringed(shapes)], first.shape, first.dtype), out=columns[2])
    torch.add(columns[2], M, out=columns[3])
    return columns


# --- the sparse matrices ----------------------------------------------------------------------

def _csr(crow: Tensor, col: Tensor, values: Tensor, size) -> Tensor:
    """A CSR tensor whose rows may repeat a column (see the module's docstring)."""
    return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


def corner_matrix(column: Tensor, values: Tensor, cols: int) -> Tensor:
    """A_k in CSR: row (n, q, m), its L*P nonzeros at ``column`` (N, Lq, M, L, P) with ``values``."""
    per_row = column.shape[-1] * column.shape[-2]
    crow = torch.arange(0, column.numel() + 1, per_row, dtype=column.dtype)
    return _csr(crow, column.reshape(-1), values.reshape(-1), (column.numel() // per_row, cols))


def entry_rows(column: Tensor) -> Tensor:
    """(nnz,): the row of A_k that each entry of ``column`` (N, Lq, M, L, P) belongs to."""
    per_row = column.shape[-1] * column.shape[-2]
    return torch.arange(column.numel() // per_row, dtype=column.dtype).view(-1, 1).expand(-1, per_row).reshape(-1)


def transposes(columns: Tensor, values: Tensor, cols: int):
    """A_k.T in CSR for k = 0..3, one after the other: row c lists the corners that read value
    row c. One stable sort of the points by their corner (0, 0) orders every corner (the
    module's docstring says why); the gathered values' buffer is reused from one k to the next."""
    per_row = columns.shape[-1] * columns.shape[-2]
    rows = columns[0].numel() // per_row
    order = torch.sort(columns[0].reshape(-1), stable=True).indices
    a_row = entry_rows(columns[0]).index_select(0, order)  # the row of A_k of each sorted entry
    gathered = torch.empty(order.numel(), dtype=values.dtype)
    crow = torch.zeros(cols + 1, dtype=columns.dtype)
    for column, value in zip(columns, values):
        torch.cumsum(torch.bincount(column.reshape(-1), minlength=cols), 0, out=crow[1:])
        torch.index_select(value.reshape(-1), 0, order, out=gathered)
        yield _csr(crow, a_row, gathered, (cols, rows))


def corner_dots(columns: Tensor, g_rows: Tensor, value_rows: Tensor) -> Tensor:
    """(4, N, Lq, M, L, P): for every corner, the dot product of its row of ``g_rows`` and the
    value row it reads -- ``sampled_addmm``, which computes ``g_rows @ value_rows.T`` only where
    A_k has an entry, written into one buffer. (It refuses a row with more entries than A_k has
    columns, possible only on maps smaller than the points per query; those small cases gather
    the rows instead.)"""
    cols = value_rows.shape[0]
    dots = torch.zeros(columns.shape, dtype=value_rows.dtype)  # zeros: the pattern sampled_addmm multiplies by beta = 0
    for column, out in zip(columns, dots):
        if column.shape[-1] * column.shape[-2] <= cols:
            pattern = corner_matrix(column, out, cols)  # its values are `out`, written in place
            torch.sparse.sampled_addmm(pattern, g_rows, value_rows.t(), beta=0.0, out=pattern)
        else:
            rows = g_rows.index_select(0, entry_rows(column))
            torch.sum(rows * value_rows.index_select(0, column.reshape(-1)), -1, out=out.view(-1))
    return dots


# --- the op -----------------------------------------------------------------------------------

class _SparseMSDA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, loc, weights):
        N, S, M, D = value.shape
        _, Lq, _, L, P, _ = loc.shape
        shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
        value_rows = with_ring(value, shapes).view(-1, D)  # (N * S_ring * M, D)
        cols = value_rows.shape[0]
        g = geometry(shapes, loc, weights, index_dtype_for(N * Lq * M * L * P + 1, cols))
        columns = corner_columns(g.first, shapes, M)
        out = corner_matrix(columns[0], g.values[0], cols) @ value_rows  # (N*Lq*M, D)
        for column, values in zip(columns[1:], g.values[1:]):
            out.addmm_(corner_matrix(column, values, cols), value_rows)
        ctx.save_for_backward(value_rows, g.first, g.values, g.x.frac, g.x.gain, g.y.frac, g.y.gain)
        ctx.sizes = (shapes, M, D)
        return out.view(N, Lq, M * D)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        value_rows, first, values, frac_x, gain_x, frac_y, gain_y = ctx.saved_tensors
        shapes, M, D = ctx.sizes
        cols = value_rows.shape[0]
        columns = corner_columns(first, shapes, M)
        g_rows = grad_out.reshape(-1, D).contiguous()  # (N*Lq*M, D)
        grad_value = grad_loc = grad_weights = None
        if ctx.needs_input_grad[0]:
            undefined = frac_x.isnan() | frac_y.isnan()  # NaN or infinite locations: no sample
            if undefined.any():  # to add nothing to value's gradient (NaN weights still do)
                values = values.masked_fill(undefined, 0.0)
            ringed_grad = None
            for a_t in transposes(columns, values, cols):
                if ringed_grad is None:
                    ringed_grad = a_t @ g_rows  # (N * S_ring * M, D)
                else:
                    ringed_grad.addmm_(a_t, g_rows)
            N = grad_out.shape[0]
            grad_value = without_ring(ringed_grad.view(N, -1, M, D), shapes)
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            # g[corner] = <grad_out row, value row of the corner> = d loss / d (its weight in A);
            # corners in the ring read zeros, so their g is 0
            g00, g01, g10, g11 = corner_dots(columns, g_rows, value_rows)
            across = [g01.sub_(g00), g11.sub_(g10)]  # d / d x of each row of corners (upper - lower)
            along_x = [g00.addcmul_(across[0], frac_x), g10.addcmul_(across[1], frac_x)]  # each row's sample
            if ctx.needs_input_grad[4]:
                grad_weights = torch.lerp(along_x[0], along_x[1], frac_y)  # (N, Lq, M, L, P)
            if ctx.needs_input_grad[3]:
                grad_x = torch.lerp(across[0], across[1], frac_y).mul_(gain_x)
                grad_y = along_x[1].sub_(along_x[0]).mul_(gain_y)
                grad_loc = torch.stack((grad_x, grad_y), -1)
        return grad_value, None, None, grad_loc, grad_weights


def ms_deform_attn_sparse(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """The op (see :func:`ddetr_minimal.ops.msda.ms_deform_attn`) as sparse matrix products.

    ``spatial_shapes`` and ``level_start_index`` on the CPU (the levels are assumed packed in
    order, as :func:`ddetr_minimal.ops.checks.level_table` checks); float32 or float64. (N, Lq, M*D)
    """
    return _SparseMSDA.apply(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
