"""The torch backend's two formulations: sparse matrix products (the CPU) and grid_sample (GPUs).

``ms_deform_attn(..., backend="torch")`` on a CPU runs only the sparse one, so both are held
to the loop reference here directly, on the same cases."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_op_inputs, output_and_grads
from ddetr_minimal.ops import sparse
from ddetr_minimal.ops.grid_sample import ms_deform_attn_grid_sample
from ddetr_minimal.ops.reference import ms_deform_attn_loop
from ddetr_minimal.ops.sparse import ms_deform_attn_sparse
from ddetr_minimal.ops.torch_backend import formulation, ms_deform_attn_torch

FORMULATIONS = {"sparse": ms_deform_attn_sparse, "grid_sample": ms_deform_attn_grid_sample}


def assert_same(a, b, tol, what=""):
    for name, x, y in zip(("out", "grad value", "grad loc", "grad weights"), a, b):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol, msg=lambda m: f"{what} {name}: {m}")


@pytest.mark.parametrize("name", FORMULATIONS)
@pytest.mark.parametrize("shapes,N,Lq,M,D,P", [
    ([(3, 4)], 1, 3, 1, 2, 1),
    ([(4, 5), (2, 3), (1, 1)], 2, 4, 2, 3, 2),
    ([(1, 1)], 1, 2, 2, 1, 3),  # more points per query than value rows: sparse's gathering path
    ([(2, 7), (5, 2)], 2, 3, 3, 2, 2),
])
def test_gradcheck_float64(name, shapes, N, Lq, M, D, P):
    v, ss, lsi, loc, aw = make_op_inputs(shapes, N, Lq, M, D, P, requires_grad=True, seed=N + Lq)
    fn = FORMULATIONS[name]
    assert torch.autograd.gradcheck(lambda v, loc, aw: fn(v, ss, lsi, loc, aw), (v, loc, aw), eps=1e-6, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    levels=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=4),
    N=st.integers(1, 2), Lq=st.integers(1, 5), M=st.integers(1, 3), D=st.integers(1, 4), P=st.integers(1, 3),
    lo=st.floats(-1.5, 0.5), span=st.floats(0.05, 3.0), seed=st.integers(0, 2**16),
)
def test_both_formulations_match_the_loop(levels, N, Lq, M, D, P, lo, span, seed):
    """Random shapes, locations inside, straddling and far outside the maps (clamped onto the ring).
    Random locations (span > 0) never sit exactly on a pixel centre, where the derivative has a
    kink and grid_sample's rounding of the coordinate may pick the other side."""
    inputs = make_op_inputs(levels, N, Lq, M, D, P, lo=lo, hi=lo + span, seed=seed, requires_grad=True)
    reference = output_and_grads(ms_deform_attn_loop, inputs)
    for name, fn in FORMULATIONS.items():
        assert_same(output_and_grads(fn, inputs), reference, 1e-8, name)


def test_float32_at_model_shapes():
    inputs = make_op_inputs([(16, 16), (8, 8), (4, 4), (2, 2)], N=2, Lq=50, M=8, D=32, P=4,
                            dtype=torch.float32, requires_grad=True)
    reference = output_and_grads(ms_deform_attn_loop, inputs)
    for name, fn in FORMULATIONS.items():
        assert_same(output_and_grads(fn, inputs), reference, 2e-5, name)


def test_the_torch_backend_picks_sparse_on_the_cpu():
    v = torch.zeros(1, 4, 1, 2)
    assert formulation(v) == "sparse" and formulation(v.double()) == "sparse"
    assert formulation(v.half()) == "grid_sample"  # sparse CSR products are float32/float64 only
    inputs = make_op_inputs([(3, 4)], requires_grad=True)
    assert_same(output_and_grads(ms_deform_attn_torch, inputs), output_and_grads(ms_deform_attn_sparse, inputs), 0)


def test_ring_round_trip():
    shapes = [(3, 4), (1, 2)]
    v = torch.randn(2, 14, 3, 5)
    ringed = sparse.with_ring(v, shapes)
    assert ringed.shape == (2, 5 * 6 + 3 * 4, 3, 5)
    assert torch.equal(sparse.without_ring(ringed, shapes), v)
    first = ringed[:, :30].view(2, 5, 6, 3, 5)
    assert not first[:, 0].any() and not first[:, -1].any() and not first[:, :, 0].any() and not first[:, :, -1].any()


def test_one_sort_orders_every_corner():
    """Sorted by corner (0, 0), each corner's column never decreases: A_k.T is a valid CSR for all k."""
    shapes = [(5, 4), (2, 3)]
    v, ss, lsi, loc, aw = make_op_inputs(shapes, N=2, Lq=9, M=3, D=2, P=3, lo=-0.8, hi=1.8, seed=4)
    g = sparse.geometry(shapes, loc, aw, torch.int64)
    columns = sparse.corner_columns(g.first, shapes, 3).flatten(1)  # (4, nnz)
    order = torch.sort(columns[0], stable=True).indices
    assert (columns[:, order].diff(dim=1) >= 0).all()
    assert columns.min() >= 0 and columns.max() < 2 * sum((h + 2) * (w + 2) for h, w in shapes) * 3


def test_int64_indices_give_the_same_result(monkeypatch):
    """Beyond 2**31 entries the indices are int64; forced here on a small case."""
    inputs = make_op_inputs([(4, 5), (2, 3)], N=2, Lq=6, M=2, D=3, P=2, requires_grad=True)
    int32 = output_and_grads(ms_deform_attn_sparse, inputs)
    assert sparse.index_dtype_for(2**31 - 1) == torch.int32 and sparse.index_dtype_for(2**31) == torch.int64
    monkeypatch.setattr(sparse, "index_dtype_for", lambda *counts: torch.int64)
    assert_same(output_and_grads(ms_deform_attn_sparse, inputs), int32, 1e-12, "int64")


def test_deterministic_and_independent_of_threads():
    inputs = make_op_inputs([(12, 12), (6, 6), (3, 3)], N=2, Lq=40, M=4, D=8, P=4, dtype=torch.float32,
                            requires_grad=True)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = output_and_grads(ms_deform_attn_sparse, inputs)
        torch.set_num_threads(2)
        two = output_and_grads(ms_deform_attn_sparse, inputs)
        again = output_and_grads(ms_deform_attn_sparse, inputs)
    finally:
        torch.set_num_threads(before)
    for a, b, c in zip(one, two, again):
        assert torch.equal(a, b) and torch.equal(b, c)


@pytest.mark.parametrize("name", FORMULATIONS)
def test_undefined_locations(name):
    """NaN and infinite locations: NaN output for that head; the point adds nothing to value's
    gradient (whose incoming gradient here is finite: ones)."""
    v, ss, lsi, loc, aw = make_op_inputs([(4, 5), (2, 3)], N=2, Lq=3, M=2, D=3, P=2, requires_grad=True)
    loc = loc.detach().clone()
    loc[1, 2, 0, 1, 1, 0] = float("nan")
    loc[0, 1, 1, 0, 0, 1] = float("-inf")
    loc.requires_grad_()
    out, grad_value, grad_loc, grad_weights = output_and_grads(FORMULATIONS[name], (v, ss, lsi, loc, aw),
                                                               torch.ones(2, 3, 6))
    bad = torch.zeros(2, 3, 2, dtype=torch.bool)
    bad[1, 2, 0] = bad[0, 1, 1] = True
    assert torch.equal(out.view(2, 3, 2, 3).isnan().all(-1), bad)
    assert not out.view(2, 3, 2, 3)[~bad].isnan().any()
    assert torch.isfinite(grad_value).all()
    assert grad_loc[1, 2, 0, 1, 1].isnan().any() and grad_loc[0, 1, 1, 0, 0].isnan().any()


@pytest.mark.parametrize("name", FORMULATIONS)
def test_no_queries(name):
    v, ss, lsi, loc, aw = make_op_inputs([(3, 4)], N=2, Lq=0, M=2, D=3, P=2, requires_grad=True)
    out, grad_value, grad_loc, grad_weights = output_and_grads(FORMULATIONS[name], (v, ss, lsi, loc, aw))
    assert out.shape == (2, 0, 6) and not grad_value.any() and grad_loc.shape == loc.shape


def test_saves_less_than_transformers_at_the_benchmark_shapes():
    """The issue's two shapes (the paper's encoder layer and the toy's): fewer bytes saved for backward."""
    pytest.importorskip("transformers")
    from ddetr_minimal.measure.memory import saved_tensor_bytes
    from ddetr_minimal.measure.versus_transformers import OP_CASES, op_inputs, transformers_op

    theirs = transformers_op()
    for case, sizes in OP_CASES.items():
        inputs = op_inputs(**sizes)
        ours = saved_tensor_bytes(ms_deform_attn_sparse, *inputs)
        assert 0 < ours < saved_tensor_bytes(theirs, *inputs), case


def test_every_point_on_one_pixel():
    """Rows that list one column many times (the CSR matrices are built without PyTorch's
    sorted-and-distinct invariant on purpose): duplicates are added, as the loop does."""
    v, ss, lsi, loc, aw = make_op_inputs([(3, 4), (2, 2)], N=2, Lq=3, M=2, D=3, P=4, requires_grad=True)
    centre = torch.tensor([1.5 / 4 + 0.01, 1.5 / 3 - 0.02], dtype=torch.float64)  # near pixel (1, 1)
    loc = centre.expand(loc.shape).clone().requires_grad_()
    reference = output_and_grads(ms_deform_attn_loop, (v, ss, lsi, loc, aw))
    assert_same(output_and_grads(ms_deform_attn_sparse, (v, ss, lsi, loc, aw)), reference, 1e-12)


def test_nan_attention_weights_reach_value_gradient_as_in_the_loop():
    """Only undefined *locations* are kept out of value's gradient; a NaN weight shows up there."""
    v, ss, lsi, loc, aw = make_op_inputs([(4, 5)], N=1, Lq=3, M=2, D=3, P=2, requires_grad=True)
    aw = aw.detach().clone()
    aw[0, 1, 0, 0, 1] = float("nan")
    aw.requires_grad_()
    for fn in (ms_deform_attn_loop, ms_deform_attn_sparse):
        out, grad_value, grad_loc, grad_weights = output_and_grads(fn, (v, ss, lsi, loc, aw))
        assert grad_value.isnan().any() and not grad_weights[0, 0].isnan().any(), fn.__name__


def test_a_location_exactly_on_the_ring_has_the_one_sided_gradient():
    """x exactly one pixel left of the first pixel centre (pixel coordinate -1): the loop's
    and grid_sample's derivative there is the one towards the map, not zero."""
    v, ss, lsi, loc, aw = make_op_inputs([(4, 4)], N=1, Lq=1, M=1, D=2, P=1, requires_grad=True)
    loc = torch.tensor([-0.5 / 4, 0.4], dtype=torch.float64).view(1, 1, 1, 1, 1, 2).requires_grad_()
    reference = output_and_grads(ms_deform_attn_loop, (v, ss, lsi, loc, aw))
    assert reference[2][..., 0].abs().sum() > 0
    for name, fn in FORMULATIONS.items():
        assert_same(output_and_grads(fn, (v, ss, lsi, loc, aw)), reference, 1e-12, name)


def test_second_order_gradients_refused_clearly():
    v, ss, lsi, loc, aw = make_op_inputs([(3, 4)], requires_grad=True)
    out = ms_deform_attn_sparse(v, ss, lsi, loc, aw)
    (grad_value,) = torch.autograd.grad(out.square().sum(), v, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad_value.sum().backward()
