"""The CUDA kernel (backend "cupy") against the torch backend, on a real GPU.

Tolerances, relative to max(1, largest |reference|) of each compared tensor:
  float64 1e-10 (and gradcheck), float32 1e-5,
  float16 3e-3 and bfloat16 2e-2 (16-bit inputs, float32 accumulation, one final rounding;
  the reference is the torch backend in float64 on the same 16-bit inputs),
  torch.autocast through MSDeformAttn 3e-2 (the two backends differ in where they round).
"""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU: torch.cuda.is_available() is False", allow_module_level=True)

from ddetr_minimal import MSDeformAttn
from ddetr_minimal.ops import cupy_kernel  # noqa: E402
from ddetr_minimal.ops.checks import level_start_index_from_shapes
from ddetr_minimal.ops.msda import ms_deform_attn, resolve_backend  # noqa: E402

if not cupy_kernel.is_available():
    pytest.skip("the CuPy kernel cannot run here: " + "; ".join(cupy_kernel.missing()), allow_module_level=True)

pytestmark = pytest.mark.gpu
DEVICE = "cuda"


def make_inputs(N, M, D, Lq, shapes, P, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)  # (L, 2)
    L, S = len(shapes), int(spatial_shapes.prod(1).sum())
    value = torch.randn(N, S, M, D, generator=g, dtype=torch.float64)  # (N, S, M, D)
    loc = torch.rand(N, Lq, M, L, P, 2, generator=g, dtype=torch.float64) * 1.5 - 0.25  # (N, Lq, M, L, P, 2)
    weights = torch.randn(N, Lq, M, L * P, generator=g, dtype=torch.float64).softmax(-1)  # (N, Lq, M, L*P)
    weights = weights.view(N, Lq, M, L, P)  # (N, Lq, M, L, P)
    starts = level_start_index_from_shapes(spatial_shapes)
    return [value.to(DEVICE, dtype), spatial_shapes.to(DEVICE), starts.to(DEVICE), loc.to(DEVICE, dtype),
            weights.to(DEVICE, dtype)]


def output_and_grads(backend, inputs, seed=1):
    value, shapes, starts, loc, weights = [t.detach().clone() for t in inputs]
    leaves = [t.requires_grad_(True) for t in (value, loc, weights)]
    out = ms_deform_attn(value, shapes, starts, loc, weights, backend=backend)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (out.detach(), *torch.autograd.grad(out, leaves, g.to(out)))


def assert_close_scaled(actual, expected, tol, what):
    assert actual.shape == expected.shape, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = max(1.0, expected.abs().max().item())
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.1g} * {scale:.3g}"


NAMES = ["output", "grad value", "grad sampling_locations", "grad attention_weights"]
CASES = [  # N, M, D, Lq, shapes, P
    (1, 2, 1, 7, [(5, 6)], 2),
    (3, 2, 33, 11, [(9, 7), (5, 4), (1, 1)], 4),
    (2, 8, 32, 50, [(20, 30), (10, 15), (5, 8), (3, 4)], 4),
    (3, 1, 256, 5, [(4, 4), (2, 2), (1, 1), (1, 1), (1, 1)], 3),
    (8, 4, 64, 9, [(6, 7), (3, 4)], 2),
]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=[f"N{c[0]}-M{c[1]}-D{c[2]}-L{len(c[4])}" for c in CASES])
def test_matches_torch_backend(case, dtype, tol):
    inputs = make_inputs(*case, dtype=dtype)
    for name, a, b in zip(NAMES, output_and_grads("cupy", inputs), output_and_grads("torch", inputs)):
        assert a.dtype == dtype and a.is_cuda, name
        assert_close_scaled(a, b, tol, f"{dtype} {name}")


@pytest.mark.parametrize("N", range(1, 9))
def test_batch_sizes(N):
    inputs = make_inputs(N, 2, 16, 6, [(6, 5), (3, 3)], 2, dtype=torch.float32, seed=N)
    for name, a, b in zip(NAMES, output_and_grads("cupy", inputs), output_and_grads("torch", inputs)):
        assert_close_scaled(a, b, 1e-5, f"N={N} {name}")


def test_gradcheck_float64():
    value, shapes, starts, loc, weights = make_inputs(2, 2, 5, 3, [(4, 3), (2, 2)], 2, dtype=torch.float64)
    leaves = [t.requires_grad_(True) for t in (value, loc, weights)]

    def op(v, l, w):
        return ms_deform_attn(v, shapes, starts, l, w, backend="cupy")

    assert torch.autograd.gradcheck(op, leaves, eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)], ids=["f16", "bf16"])
def test_16_bit_inputs(dtype, tol):
    inputs = make_inputs(3, 4, 32, 20, [(12, 10), (6, 5), (3, 3), (1, 1)], 4, dtype=dtype)
    reference = [t.double() if t.is_floating_point() else t for t in inputs]
    for name, a, b in zip(NAMES, output_and_grads("cupy", inputs), output_and_grads("torch", reference)):
        assert a.dtype == dtype, name
        assert_close_scaled(a, b, tol, f"{dtype} {name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_autocast_through_msdeformattn(dtype):
    torch.manual_seed(0)
    N, C, L, Lq = 2, 64, 3, 17
    shapes = torch.tensor([[12, 10], [6, 5], [3, 3]], device=DEVICE)  # (L, 2)
    S = int(shapes.prod(1).sum())
    kernel = MSDeformAttn(C, n_levels=L, n_heads=4, n_points=2, backend="cupy").to(DEVICE)
    torch.nn.init.normal_(kernel.sampling_offsets.weight, std=0.5)  # leave the ring of the init
    reference = MSDeformAttn(C, n_levels=L, n_heads=4, n_points=2, backend="torch").to(DEVICE)
    reference.load_state_dict(kernel.state_dict())
    query = torch.randn(N, Lq, C, device=DEVICE)
    src = torch.randn(N, S, C, device=DEVICE)
    ref_points = torch.rand(N, Lq, L, 2, device=DEVICE)
    starts = level_start_index_from_shapes(shapes)
    outs, grads = [], []
    for module in (kernel, reference):
        module.zero_grad()
        with torch.autocast("cuda", dtype=dtype):
            out = module(query, ref_points, src, shapes, starts)
        out.float().square().mean().backward()
        outs.append(out.float())
        grads.append(module.value_proj.weight.grad.clone())
    assert_close_scaled(outs[0], outs[1], 3e-2, f"autocast {dtype} output")
    assert_close_scaled(grads[0], grads[1], 3e-2, f"autocast {dtype} value_proj gradient")


def test_non_contiguous_inputs():
    value, shapes, starts, loc, weights = make_inputs(2, 2, 8, 5, [(4, 3), (2, 2)], 2, dtype=torch.float32)
    value_t = value.transpose(0, 1).contiguous().transpose(0, 1)
    loc_t = loc.permute(5, 0, 1, 2, 3, 4).contiguous().permute(1, 2, 3, 4, 5, 0)
    weights_t = weights.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (value_t.is_contiguous() or loc_t.is_contiguous() or weights_t.is_contiguous())
    inputs_t = [value_t, shapes, starts, loc_t, weights_t]
    for name, a, b in zip(NAMES, output_and_grads("cupy", inputs_t),
                          output_and_grads("torch", [value, shapes, starts, loc, weights])):
        assert_close_scaled(a, b, 1e-5, f"non-contiguous {name}")


def test_auto_picks_the_kernel_for_cuda_tensors():
    inputs = make_inputs(1, 1, 4, 2, [(2, 2)], 1, dtype=torch.float32)
    assert resolve_backend("auto", inputs[0]) == "cupy"


def test_compiles_once_per_dtype_and_runs_on_the_current_stream():
    inputs = make_inputs(2, 2, 8, 5, [(4, 3)], 2, dtype=torch.float32)
    ms_deform_attn(*inputs, backend="cupy")
    before = cupy_kernel._module.cache_info()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = ms_deform_attn(*inputs, backend="cupy")
    stream.synchronize()
    assert cupy_kernel._module.cache_info().misses == before.misses  # no new compilation
    torch.testing.assert_close(out, ms_deform_attn(*inputs, backend="torch"))
