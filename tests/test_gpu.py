"""The CUDA kernel (backend "cupy") against the torch backend, on a real GPU.

Tolerances, relative to max(1, largest |reference|) of each compared tensor:
  float64 1e-10 (and gradcheck), float32 1e-5,
  float16 3e-3 and bfloat16 2e-2 (16-bit inputs, float32 accumulation, one final rounding;
  the reference is the torch backend in float64 on the same 16-bit inputs),
  torch.autocast through MSDeformAttn 3e-2 (the two backends differ in where they round),
  through the whole detector 5e-2.
Also here: the self-test, stream hand-off, a current device other than the tensors', the
grid-stride loops, pixel centres / borders / NaN, Lq=0, a non-contiguous grad_output,
deterministic mode, opcheck and torch.compile on the kernel, and the forward's vector loads
against its one-channel fallback (every width; misaligned value).
"""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU: torch.cuda.is_available() is False", allow_module_level=True)

import warnings

from ddetr_minimal import MSDeformAttn
from ddetr_minimal.models.build import build_model
from ddetr_minimal.training.engine import _to_float
from ddetr_minimal.ops import cupy_kernel, selftest  # noqa: E402
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


def output_and_grads(backend, inputs, seed=1, grad_output=None, **kwargs):
    # detach, not clone: a clone would move a deliberately misaligned value to aligned memory
    value, shapes, starts, loc, weights = [t.detach() for t in inputs]
    leaves = [t.requires_grad_(True) for t in (value, loc, weights)]
    out = ms_deform_attn(value, shapes, starts, loc, weights, backend=backend, **kwargs)
    g = grad_output
    if g is None:
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out)
    return (out.detach(), *torch.autograd.grad(out, leaves, g))


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
        with torch.autocast(DEVICE, dtype=dtype):
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


@pytest.mark.parametrize("dtype,loc_dtype", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                             (torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                             (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16)])
def test_self_test_passes_on_this_gpu(dtype, loc_dtype):
    selftest.forget()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert selftest.kernel_works(torch.device(DEVICE, torch.cuda.current_device()), dtype, loc_dtype)


def test_compiles_once_per_dtype(monkeypatch):
    inputs = make_inputs(2, 2, 8, 5, [(4, 3)], 2, dtype=torch.float32)
    ms_deform_attn(*inputs, backend="cupy")
    compiles = []
    real = cupy_kernel._compile_module
    monkeypatch.setattr(cupy_kernel, "_compile_module", lambda *a: compiles.append(a) or real(*a))
    output_and_grads("cupy", inputs)
    assert compiles == []


def test_the_kernel_runs_on_the_current_stream_without_waiting():
    """Inputs are written late on a side stream and the result is checked on that stream: a
    kernel queued anywhere else would read the NaN placeholder (or race past the copy)."""
    inputs = make_inputs(2, 4, 32, 64, [(32, 32), (16, 16)], 4, dtype=torch.float32)
    want = output_and_grads("torch", inputs)
    ms_deform_attn(*inputs, backend="cupy")  # compile first: host-side work, outside the race
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        staged = [torch.full_like(t, float("nan")) if t.is_floating_point() else t for t in inputs]
        torch.cuda._sleep(100_000_000)  # keep the side stream busy while the host runs ahead
        for a, b in zip(staged, inputs):
            if a.is_floating_point():
                a.copy_(b)
        got = output_and_grads("cupy", staged)
        errors = torch.stack([(a.double() - b.double()).abs().max() for a, b in zip(got, want)])
    side.synchronize()
    assert (errors <= 1e-4).all(), errors.tolist()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_another_device_than_the_current_one():
    inputs = make_inputs(2, 2, 33, 5, [(6, 5), (3, 3)], 2, dtype=torch.float32)
    inputs = [t.to("cuda:1") for t in inputs]
    want = output_and_grads("torch", inputs)
    with torch.cuda.device(0):
        got = output_and_grads("cupy", inputs)
        assert library_resolve_on(inputs[0]) == "cupy"
    for name, a, b in zip(NAMES, got, want):
        assert a.device == torch.device("cuda:1"), name
        assert_close_scaled(a, b, 1e-5, f"cuda:1 from cuda:0 {name}")


def library_resolve_on(value):
    from ddetr_minimal.ops import library

    return library.resolve("auto", value, value.dtype)


@pytest.mark.parametrize("max_blocks", [1, 2, 3])
def test_grid_stride_loops_with_a_small_grid(max_blocks):
    inputs = make_inputs(3, 4, 40, 70, [(9, 7), (5, 4)], 3, dtype=torch.float64)  # 33600 outputs, 840 warps
    for name, a, b in zip(NAMES, output_and_grads("cupy", inputs, max_blocks=max_blocks),
                          output_and_grads("torch", inputs)):
        assert_close_scaled(a, b, 1e-10, f"max_blocks={max_blocks} {name}")


def test_pixel_centres_borders_and_nan():
    H, W = 3, 4
    value = torch.arange(1, H * W + 1, dtype=torch.float64).view(1, H * W, 1, 1).repeat(1, 1, 1, 33)
    points = [((j + 0.5) / W, (i + 0.5) / H) for i in range(H) for j in range(W)]
    points += [(0.0, 0.5), (1.0, 0.5), (-0.5 / W, 0.5), (1 + 0.5 / W, 0.5), (-1.0, 0.5), (1e30, 0.5),
               (float("nan"), 0.5), (0.5, float("inf"))]
    Lq = len(points)
    shapes = torch.tensor([[H, W]], device=DEVICE)
    loc = torch.tensor(points, dtype=torch.float64).view(1, Lq, 1, 1, 1, 2)
    inputs = [value.to(DEVICE), shapes, level_start_index_from_shapes(shapes), loc.to(DEVICE),
              torch.ones(1, Lq, 1, 1, 1, dtype=torch.float64, device=DEVICE)]
    got, want = output_and_grads("cupy", inputs), output_and_grads("torch", inputs)
    assert torch.equal(got[0].isnan(), want[0].isnan()) and got[0][0, -2:].isnan().all()
    finite = ~want[0].isnan()
    assert_close_scaled(got[0][finite], want[0][finite], 1e-12, "pixel centres and borders")
    assert_close_scaled(got[1], want[1], 1e-12, "grad value (NaN points add nothing)")


def test_no_queries():
    inputs = make_inputs(2, 2, 33, 0, [(4, 5)], 2, dtype=torch.float32)
    for name, a, b in zip(NAMES, output_and_grads("cupy", inputs), output_and_grads("torch", inputs)):
        assert a.shape == b.shape and (a == 0).all(), name


def test_non_contiguous_grad_output():
    inputs = make_inputs(2, 2, 33, 6, [(4, 5), (2, 2)], 2, dtype=torch.float32)
    g = torch.randn(2, 66, 6, device=DEVICE).transpose(1, 2)  # (N, Lq, M*D), not contiguous
    for name, a, b in zip(NAMES, output_and_grads("cupy", inputs, grad_output=g),
                          output_and_grads("torch", inputs, grad_output=g.contiguous())):
        assert_close_scaled(a, b, 1e-5, f"non-contiguous grad_output {name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_16_bit_values_with_float32_locations(dtype):
    value, shapes, starts, loc, weights = make_inputs(2, 4, 32, 20, [(12, 167), (6, 84)], 4, dtype=torch.float32)
    inputs = [value.to(dtype), shapes, starts, loc, weights]
    reference = [value.to(dtype).float(), shapes, starts, loc, weights]
    for name, a, b in zip(NAMES, output_and_grads("cupy", inputs), output_and_grads("torch", reference)):
        assert_close_scaled(a, b, 1e-2, f"{dtype} values, float32 locations: {name}")


def test_deterministic_mode():
    inputs = make_inputs(1, 2, 8, 3, [(4, 3)], 2, dtype=torch.float32)
    try:
        torch.use_deterministic_algorithms(True)
        assert resolve_backend("auto", inputs[0]) == "torch"
        with pytest.raises(RuntimeError, match="does not have a deterministic implementation"):
            output_and_grads("cupy", inputs)
    finally:
        torch.use_deterministic_algorithms(False)


def test_opcheck_and_torch_compile_on_the_kernel():
    value, shapes, starts, loc, weights = make_inputs(2, 2, 8, 5, [(4, 3), (2, 2)], 2, dtype=torch.float32)
    leaves = [t.requires_grad_(True) for t in (value, loc, weights)]
    torch.library.opcheck(torch.ops.ddetr_minimal.ms_deform_attn.default,
                          (leaves[0], shapes, starts, leaves[1], leaves[2], "cupy", 0))

    def loss(v, l, a):
        return ms_deform_attn(v, shapes, starts, l, a, backend="cupy").square().sum()

    got = torch.compile(loss, fullgraph=True)(*leaves)
    got_grads = torch.autograd.grad(got, leaves)
    want = loss(*leaves)
    for a, b in zip((got, *got_grads), (want, *torch.autograd.grad(want, leaves))):
        assert_close_scaled(a, b, 1e-5, "torch.compile")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_autocast_through_the_whole_detector(dtype):
    tiny = dict(backbone="small", d_model=64, n_heads=4, enc_layers=2, dec_layers=2, dim_feedforward=128,
                num_queries=20, dropout=0.0)
    torch.manual_seed(0)
    kernel, criterion, _ = build_model(num_classes=5, backend="cupy", **tiny)
    reference, _, _ = build_model(num_classes=5, backend="torch", **tiny)
    reference.load_state_dict(kernel.state_dict())
    images = torch.randn(2, 3, 96, 128, device=DEVICE)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool, device=DEVICE)
    mask[1, 64:] = True
    targets = [{"labels": torch.tensor([1], device=DEVICE), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]], device=DEVICE)}] * 2
    results = []
    for model in (kernel.to(DEVICE), reference.to(DEVICE)):
        model.train()
        with torch.autocast(DEVICE, dtype=dtype):
            out = model(images, mask)
        out = _to_float(out)  # the loss in float32, as the training engine computes it
        loss = criterion.total_loss(criterion(out, targets))
        loss.backward()
        grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
        results.append((out["pred_boxes"].float(), out["pred_logits"].float(), grads))
        assert torch.isfinite(loss) and torch.isfinite(grads).all()
    for name, a, b in zip(("boxes", "logits", "gradients"), *results):
        assert_close_scaled(a, b, 5e-2, f"autocast {dtype} detector {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_misaligned_rows_take_the_one_channel_loads(dtype):
    """A value tensor one element into its storage: a two-channel load there would fault."""
    value, shapes, starts, loc, weights = make_inputs(2, 2, 32, 5, [(4, 5), (2, 2)], 2, dtype=dtype)
    shifted = torch.empty(value.numel() + 1, dtype=dtype, device=DEVICE)[1:].view(value.shape)
    shifted.copy_(value)
    assert shifted.is_contiguous() and shifted.data_ptr() % (2 * shifted.element_size()) != 0
    for name, a, b in zip(NAMES, output_and_grads("cupy", [shifted, shapes, starts, loc, weights]),
                          output_and_grads("cupy", [value, shapes, starts, loc, weights])):
        assert_close_scaled(a, b, 1e-5 if dtype == torch.float32 else 2e-2, f"misaligned {dtype} {name}")


VECTOR_PAIRS = [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.float16, torch.float32),
                (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)]


@pytest.mark.parametrize("dtypes", VECTOR_PAIRS, ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
@pytest.mark.parametrize("case", CASES + [(2, 3, 40, 13, [(6, 5), (3, 3)], 3), (3, 2, 16, 17, [(5, 4)], 2)],
                         ids=lambda c: f"N{c[0]}-M{c[1]}-D{c[2]}")
def test_vector_and_scalar_forwards_agree(case, dtypes, monkeypatch):
    """Every vector width that divides D against one channel per load, on the GPU: the same sums
    in the same order, so equal up to the compiler's contraction of multiply-adds; also with a
    one-block grid, and through the op (forward and backward) with the fallback forced."""
    value, shapes, starts, loc, weights = make_inputs(*case, dtype=dtypes[0])
    inputs = [value, shapes, starts, loc.to(dtypes[1]), weights.to(dtypes[1])]
    tol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtypes[0], 1e-2)  # 16 bit: one final rounding
    scalar = cupy_kernel.run_forward(cupy_kernel.cupy_launch, *inputs, width=1)
    widths = [w for w in cupy_kernel.vector_widths(dtypes[0]) if value.shape[-1] % w == 0]
    for width in widths:
        for max_blocks in (cupy_kernel.MAX_BLOCKS, 1):
            vector = cupy_kernel.run_forward(cupy_kernel.cupy_launch, *inputs, max_blocks=max_blocks, width=width)
            assert_close_scaled(vector, scalar, tol, f"width {width} max_blocks {max_blocks} against width 1")
    chosen = output_and_grads("cupy", inputs)
    assert cupy_kernel.vector_width(value) == (widths[0] if widths else 1)
    monkeypatch.setattr(cupy_kernel, "vector_width", lambda value: 1)
    grad_tol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtypes[0], 1e-2)  # atomics add in any order
    for name, a, b in zip(NAMES, chosen, output_and_grads("cupy", inputs)):
        assert_close_scaled(a, b, tol if name == "output" else grad_tol, f"vector against scalar path: {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_misaligned_value_takes_the_scalar_forward(dtype):
    """One element into its storage, a 16-byte load would fault: vector_width says 1 and the
    forward agrees with the aligned copy's vector forward."""
    value, shapes, starts, loc, weights = make_inputs(2, 4, 32, 9, [(6, 5), (3, 3)], 2, dtype=dtype)
    shifted = torch.empty(value.numel() + 1, dtype=dtype, device=DEVICE)[1:].view(value.shape)
    shifted.copy_(value)
    assert cupy_kernel.vector_width(value) == cupy_kernel.vector_widths(dtype)[0]
    assert cupy_kernel.vector_width(shifted) == 1
    with pytest.raises(ValueError, match="width must be 1 or a vector width"):
        cupy_kernel.run_forward(cupy_kernel.cupy_launch, shifted, shapes, starts, loc, weights, width=2)
    a = cupy_kernel.run_forward(cupy_kernel.cupy_launch, shifted, shapes, starts, loc, weights)
    b = cupy_kernel.run_forward(cupy_kernel.cupy_launch, value, shapes, starts, loc, weights)
    torch.cuda.synchronize()
    assert_close_scaled(a, b, 1e-6 if dtype == torch.float32 else 1e-2, f"misaligned {dtype} forward")
