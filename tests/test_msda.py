"""The op: the loop and torch backends agree on outputs and gradients, and match the paper's math."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ddetr_minimal import ms_deform_attn
from ddetr_minimal.ops.reference import bilinear_sample
from ddetr_minimal.ops.checks import level_start_index_from_shapes
from conftest import make_op_inputs

BACKENDS = ("loop", "torch")


def _op(backend, shapes, lsi):
    return lambda v, loc, aw: ms_deform_attn(v, shapes, lsi, loc, aw, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "shapes,N,Lq,M,D,P",
    [
        ([(3, 4)], 1, 3, 1, 2, 1),  # one level, one point
        ([(4, 5), (2, 3), (1, 1)], 2, 4, 2, 3, 2),  # three levels with a 1x1 map
        ([(1, 1)], 1, 2, 2, 1, 3),  # a single 1x1 map
        ([(2, 7), (5, 2)], 2, 3, 3, 2, 2),  # non-square maps
    ],
)
def test_gradcheck_float64(backend, shapes, N, Lq, M, D, P):
    v, ss, lsi, loc, aw = make_op_inputs(shapes, N, Lq, M, D, P, requires_grad=True, seed=N + Lq)
    assert torch.autograd.gradcheck(_op(backend, ss, lsi), (v, loc, aw), eps=1e-6, atol=1e-5)


def test_output_shape_and_contract_layout():
    v, ss, lsi, loc, aw = make_op_inputs([(4, 5), (2, 3)], N=2, Lq=7, M=4, D=3, P=2)
    out = ms_deform_attn(v, ss, lsi, loc, aw, backend="torch")
    assert out.shape == (2, 7, 4 * 3)


def test_sampling_a_pixel_centre_reads_that_pixel():
    """A point at pixel (i, j)'s centre, (j + 0.5) / W, (i + 0.5) / H, returns exactly value[i, j]."""
    H, W = 3, 4
    value = torch.arange(H * W, dtype=torch.float64).view(1, H * W, 1, 1)  # (N, S, M, D)
    ss = torch.tensor([[H, W]])
    lsi = level_start_index_from_shapes(ss)
    for i in range(H):
        for j in range(W):
            loc = torch.tensor([(j + 0.5) / W, (i + 0.5) / H], dtype=torch.float64).view(1, 1, 1, 1, 1, 2)
            aw = torch.ones(1, 1, 1, 1, 1, dtype=torch.float64)
            for backend in BACKENDS:
                out = ms_deform_attn(value, ss, lsi, loc, aw, backend=backend)
                assert out.item() == pytest.approx(i * W + j), (backend, i, j)


def test_bilinear_midpoint_and_zero_padding():
    """Halfway between four pixel centres gives their mean; fully outside gives zero;
    half a pixel outside the border sees half the border pixel (the other half reads zero)."""
    H, W = 2, 2
    value = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).view(1, 4, 1, 1)
    ss = torch.tensor([[H, W]])
    lsi = level_start_index_from_shapes(ss)
    aw = torch.ones(1, 1, 1, 1, 1, dtype=torch.float64)
    cases = {(0.5, 0.5): 2.5, (1.5, 0.5): 0.0, (-0.5, 0.5): 0.0, (0.0, 0.25): 0.5}
    for (x, y), expected in cases.items():
        loc = torch.tensor([x, y], dtype=torch.float64).view(1, 1, 1, 1, 1, 2)
        for backend in BACKENDS:
            out = ms_deform_attn(value, ss, lsi, loc, aw, backend=backend)
            assert out.item() == pytest.approx(expected), (backend, x, y)


def test_weights_mix_levels_linearly():
    """The output is the attention-weighted sum of the per-sample reads (Eq. 3 is linear in A)."""
    v, ss, lsi, loc, aw = make_op_inputs([(4, 5), (2, 3)], N=1, Lq=2, M=1, D=2, P=2)
    total = ms_deform_attn(v, ss, lsi, loc, aw, backend="torch")
    parts = torch.zeros_like(total)
    for l, (H, W) in enumerate(ss.tolist()):
        start = int(lsi[l])
        for p in range(loc.shape[4]):
            read = bilinear_sample(v[:, start:start + H * W], H, W, loc[:, :, :, l, p])  # (N, Lq, M, D)
            parts += (aw[:, :, :, l, p, None] * read).reshape(parts.shape)
    torch.testing.assert_close(total, parts)


@settings(max_examples=25, deadline=None)
@given(
    levels=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=4),
    N=st.integers(1, 2),
    Lq=st.integers(1, 5),
    M=st.integers(1, 3),
    D=st.integers(1, 4),
    P=st.integers(1, 3),
    lo=st.floats(-1.0, 0.5),
    span=st.floats(0.0, 2.0),
    seed=st.integers(0, 2**16),
)
def test_backends_agree_property(levels, N, Lq, M, D, P, lo, span, seed):
    """Random shapes and location ranges (inside, straddling and outside [0, 1])."""
    v, ss, lsi, loc, aw = make_op_inputs(levels, N, Lq, M, D, P, lo=lo, hi=lo + span, seed=seed,
                                         requires_grad=True)
    outs, grads = [], []
    for backend in BACKENDS:
        out = ms_deform_attn(v, ss, lsi, loc, aw, backend=backend)
        g = torch.autograd.grad(out, (v, loc, aw), torch.ones_like(out) + out.detach())
        outs.append(out.detach())
        grads.append(g)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-10)
    for name, a, b in zip(("value", "sampling_locations", "attention_weights"), *grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8, msg=lambda m: f"grad {name}: {m}")


def test_float32_backends_agree():
    v, ss, lsi, loc, aw = make_op_inputs([(8, 9), (4, 5), (2, 3), (1, 1)], N=2, Lq=11, M=4, D=8, P=4,
                                         dtype=torch.float32)
    a = ms_deform_attn(v, ss, lsi, loc, aw, backend="loop")
    b = ms_deform_attn(v, ss, lsi, loc, aw, backend="torch")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_auto_uses_torch_on_cpu():
    v, ss, lsi, loc, aw = make_op_inputs([(3, 3)])
    torch.testing.assert_close(ms_deform_attn(v, ss, lsi, loc, aw), ms_deform_attn(v, ss, lsi, loc, aw, backend="torch"))


def test_level_start_index_from_shapes():
    ss = torch.tensor([[4, 5], [2, 3], [1, 1]])
    assert level_start_index_from_shapes(ss).tolist() == [0, 20, 26]
    assert level_start_index_from_shapes(ss).dtype == torch.int64
    assert level_start_index_from_shapes(torch.tensor([[7, 9]])).tolist() == [0]  # one level starts at 0


# --- the custom op: torch.library, torch.compile, no host sync per call ------------------
OP = torch.ops.ddetr_minimal.ms_deform_attn.default
OP_BACKWARD = torch.ops.ddetr_minimal.ms_deform_attn_backward.default


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_forward_and_backward_torch_backend(dtype):
    v, ss, lsi, loc, aw = make_op_inputs([(4, 5), (2, 3)], N=2, Lq=3, M=2, D=4, P=2, dtype=dtype,
                                         requires_grad=True)
    torch.library.opcheck(OP, (v, ss, lsi, loc, aw, "torch", 0))  # raises OpCheckError on a failure
    g = torch.randn(2, 3, 8, dtype=dtype)
    torch.library.opcheck(OP_BACKWARD, (g, v.detach(), ss, lsi, loc.detach(), aw.detach(), "torch", 0))


def test_torch_compile_fullgraph_matches_eager():
    v, ss, lsi, loc, aw = make_op_inputs([(4, 5), (2, 3)], N=2, Lq=3, M=2, D=4, P=2, dtype=torch.float32,
                                         requires_grad=True)

    def loss(v, loc, aw):
        return ms_deform_attn(v, ss, lsi, loc, aw, backend="torch").square().sum()

    compiled = torch.compile(loss, fullgraph=True)  # a graph break would raise here
    got = compiled(v, loc, aw)
    got_grads = torch.autograd.grad(got, (v, loc, aw))
    want = loss(v, loc, aw)
    want_grads = torch.autograd.grad(want, (v, loc, aw))
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)


def test_level_table_is_read_once_per_tensor(monkeypatch):
    from ddetr_minimal.ops import checks

    reads = []
    real = checks._read_table
    monkeypatch.setattr(checks, "_read_table", lambda *a: reads.append(1) or real(*a))
    v, ss, lsi, loc, aw = make_op_inputs([(4, 5), (2, 3)])
    ss, lsi = ss.clone(), lsi.clone()  # tensors no other test has seen
    first = ms_deform_attn(v, ss, lsi, loc, aw, backend="torch")
    for _ in range(3):
        ms_deform_attn(v, ss, lsi, loc, aw, backend="torch")
    assert len(reads) == 1  # one read (on a GPU: one device-to-host copy) for four calls
    with pytest.raises(ValueError, match=r"value has S=25 positions"):  # S is still checked per call
        ms_deform_attn(v[:, :25], ss, lsi, loc, aw, backend="torch")
    lsi[1] = 19  # an in-place edit bumps the version: read again, and rejected
    with pytest.raises(ValueError, match=r"level_start_index is \[0, 19\]"):
        ms_deform_attn(v, ss, lsi, loc, aw, backend="torch")
    assert len(reads) == 2
    lsi[1] = 20
    torch.testing.assert_close(ms_deform_attn(v, ss, lsi, loc, aw, backend="torch"), first)


def test_inference_mode_tensors(monkeypatch):
    """Tensors made under torch.inference_mode have no version counter: still read once."""
    from ddetr_minimal.ops import checks

    reads = []
    real = checks._read_table
    monkeypatch.setattr(checks, "_read_table", lambda *a: reads.append(1) or real(*a))
    with torch.inference_mode():
        v, ss, lsi, loc, aw = make_op_inputs([(4, 5), (2, 3)])
        outs = [ms_deform_attn(v, ss, lsi, loc, aw, backend=b) for b in ("torch", "torch", "loop", "auto")]
    assert len(reads) == 1
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0])


def test_level_table_forgets_tensors_that_are_gone():
    from ddetr_minimal.ops import checks

    v, ss, lsi, loc, aw = make_op_inputs([(3, 3)])
    for _ in range(5):
        ms_deform_attn(v, ss.clone(), lsi.clone(), loc, aw, backend="torch")
    alive = [entry for entry in checks._TABLES.values() if entry[0]() is not None]
    assert len(checks._TABLES) - len(alive) <= 1  # dead entries are dropped at the next read


# --- 16-bit values with float32 locations and weights ------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_16_bit_values_with_float32_locations_compute_in_float32(backend, dtype):
    """The result is the float32 computation on the same 16-bit values, rounded once."""
    v, ss, lsi, loc, aw = make_op_inputs([(6, 167), (3, 84)], N=2, Lq=4, M=2, D=3, P=2, dtype=torch.float32)
    v16 = v.to(dtype)
    out = ms_deform_attn(v16, ss, lsi, loc, aw, backend=backend)
    assert out.dtype == dtype
    want = ms_deform_attn(v16.float(), ss, lsi, loc, aw, backend=backend).to(dtype)
    assert torch.equal(out, want)
    # locations rounded to 16 bits instead: visibly worse on a map 167 pixels wide
    coarse = ms_deform_attn(v16, ss, lsi, loc.to(dtype), aw.to(dtype), backend=backend).float()
    exact = ms_deform_attn(v16.float(), ss, lsi, loc, aw, backend=backend)
    assert (coarse - exact).abs().max() > 2 * (out.float() - exact).abs().max()


def test_msdeformattn_keeps_locations_float32_under_autocast(monkeypatch):
    from ddetr_minimal import MSDeformAttn
    from ddetr_minimal.models import deformable_attention

    seen = []
    real = deformable_attention.ms_deform_attn
    monkeypatch.setattr(deformable_attention, "ms_deform_attn",
                        lambda *a, **k: seen.append([t.dtype for t in a]) or real(*a, **k))
    m = MSDeformAttn(16, n_levels=2, n_heads=2, n_points=2, backend="torch")
    ss = torch.tensor([[4, 5], [2, 3]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(torch.randn(1, 3, 16), torch.rand(1, 3, 2, 2), torch.randn(1, 26, 16), ss,
                level_start_index_from_shapes(ss))
    assert seen[0][0] == torch.bfloat16  # value, from the autocast linear layer
    assert seen[0][3] == torch.float32 and seen[0][4] == torch.float32  # locations, weights
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


# --- NaN locations, Lq = 0 ------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_location_gives_nan_where_it_is_used(backend):
    v, ss, lsi, loc, aw = make_op_inputs([(4, 5), (2, 3)], N=2, Lq=3, M=2, D=3, P=2)
    loc = loc.clone()
    loc[1, 2, 0, 1, 1, 0] = float("nan")  # one point: batch 1, query 2, head 0
    out = ms_deform_attn(v, ss, lsi, loc, aw, backend=backend).view(2, 3, 2, 3)  # (N, Lq, M, D)
    nan = torch.zeros(2, 3, 2, 3, dtype=torch.bool)
    nan[1, 2, 0] = True
    assert torch.equal(out.isnan(), nan)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_queries(backend):
    v, ss, lsi, loc, aw = make_op_inputs([(4, 5)], N=2, Lq=0, M=2, D=3, P=2, requires_grad=True)
    out = ms_deform_attn(v, ss, lsi, loc, aw, backend=backend)
    assert out.shape == (2, 0, 6)
    grad_v, = torch.autograd.grad(out.sum(), (v,))
    assert torch.equal(grad_v, torch.zeros_like(v))
