"""The CUDA kernels of kernels/msda.cu, run on the CPU, against the torch backend.

kernels/msda.cu is compiled once per test session by g++ through
kernels/cuda_host_emulation.h; ``ms_deform_attn_emulated`` then runs the very launch code
of the GPU wrapper (ddetr_minimal.ops.cupy_kernel) with a CPU launcher.

The tests of the op run twice (fixture ``forward_path``): with the forward's vector loads that
``cupy_kernel.vector_width`` picks, and with the scalar fallback forced; each checks which
forward kernel really ran.
"""
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ddetr_minimal.ops import cupy_kernel, emulation, kernel_files
from ddetr_minimal.ops.emulation import build, launch, load, ms_deform_attn_emulated
from ddetr_minimal.ops.checks import level_start_index_from_shapes
from ddetr_minimal.ops.msda import ms_deform_attn
from conftest import output_and_grads


@pytest.fixture(scope="module", autouse=True)
def emulator(tmp_path_factory):
    """Build the library once, into a fresh cache folder (never the source tree)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DDETR_MINIMAL_CACHE", str(tmp_path_factory.mktemp("emulation")))
        yield build()


class ForwardPath:
    """Records the width (channels per thread) of every forward kernel launched."""

    def __init__(self, name):
        self.name, self.widths = name, []

    def check(self, value):
        """Every forward since the last check took this path for ``value``: its vector width, or 1."""
        want = 1 if self.name == "scalar" else kernel_files.vector_width(value.contiguous())
        ran, self.widths = self.widths, []
        assert ran and set(ran) == {want}, f"{self.name} path for {tuple(value.shape)} {value.dtype}: ran {ran}"


def forward_width(name):
    """'msda_forward<float, float, 4>' -> 4, 'msda_forward<float, float>' -> 1."""
    args = name[name.index("<") + 1:-1].split(", ")
    return int(args[2]) if len(args) == 3 else 1


@pytest.fixture(params=["vector", "scalar"])
def forward_path(request, monkeypatch):
    """Run the op with the vector loads vector_width picks, or with the scalar fallback forced."""
    path, launch = ForwardPath(request.param), emulation.cpu_launch

    def recording(name, grid, block, args):
        if name.startswith("msda_forward"):
            path.widths.append(forward_width(name))
        launch(name, grid, block, args)

    monkeypatch.setattr(emulation, "cpu_launch", recording)
    if request.param == "scalar":
        monkeypatch.setattr(cupy_kernel, "vector_width", lambda value: 1)
    return path


def make_inputs(N, M, D, Lq, shapes, P, dtype=torch.float64, seed=0):
    """Random op inputs; locations spread over [-0.25, 1.25] so some fall off the map."""
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)  # (L, 2)
    L, S = len(shapes), int(spatial_shapes.prod(1).sum())
    value = torch.randn(N, S, M, D, generator=g, dtype=torch.float64)  # (N, S, M, D)
    loc = torch.rand(N, Lq, M, L, P, 2, generator=g, dtype=torch.float64) * 1.5 - 0.25  # (N, Lq, M, L, P, 2)
    loc.view(-1, 2)[::7] = torch.tensor([3.0, -2.0], dtype=torch.float64)  # some far outside
    logits = torch.randn(N, Lq, M, L * P, generator=g, dtype=torch.float64)  # (N, Lq, M, L*P)
    weights = logits.softmax(-1).view(N, Lq, M, L, P)  # (N, Lq, M, L, P)
    return (value.to(dtype), spatial_shapes, level_start_index_from_shapes(spatial_shapes),
            loc.to(dtype), weights.to(dtype))


def torch_backend(*args):
    return ms_deform_attn(*args, backend="torch")


def assert_close_scaled(actual, expected, tol, what):
    """|actual - expected| <= tol * max(1, max|expected|), elementwise, with a readable message."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    err = (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.1g} * {scale:.3g}"


# name, N, M, D, Lq, level shapes (H, W), P -- every D of the issue, 1 to 5 levels, 1x1 maps
CASES = [
    ("D1", 3, 2, 1, 4, [(3, 4)], 2),
    ("D2", 1, 3, 2, 5, [(4, 4), (2, 2)], 3),
    ("D7", 3, 1, 7, 3, [(5, 3), (3, 2), (1, 1)], 2),
    ("D32", 1, 2, 32, 4, [(6, 5), (3, 3), (2, 2), (1, 1)], 4),
    ("D33", 3, 2, 33, 3, [(4, 6), (2, 3), (1, 2), (1, 1), (1, 1)], 2),
    ("D64", 1, 1, 64, 3, [(7, 5), (4, 3), (2, 2)], 3),
    ("D256", 3, 1, 256, 2, [(3, 3), (1, 1)], 2),
    ("only-1x1", 3, 2, 32, 3, [(1, 1)], 4),
]
NAMES = ["output", "grad value", "grad sampling_locations", "grad attention_weights"]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_and_gradients_match_torch_backend(case, dtype, tol, forward_path):
    inputs = make_inputs(*case[1:], dtype=dtype)
    got = output_and_grads(ms_deform_attn_emulated, inputs)
    forward_path.check(inputs[0])
    want = output_and_grads(torch_backend, inputs)
    for name, a, b in zip(NAMES, got, want):
        assert a.dtype == dtype
        assert_close_scaled(a, b, tol, f"{case[0]} {dtype} {forward_path.name} {name}")


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    N=st.sampled_from([1, 3]),
    M=st.integers(1, 3),
    D=st.sampled_from([1, 2, 7, 32, 33, 64]),
    Lq=st.integers(1, 4),
    shapes=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=5),
    P=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_match_torch_backend(N, M, D, Lq, shapes, P, seed, forward_path):
    inputs = make_inputs(N, M, D, Lq, shapes, P, seed=seed)
    got = output_and_grads(ms_deform_attn_emulated, inputs)
    forward_path.check(inputs[0])
    for name, a, b in zip(NAMES, got, output_and_grads(torch_backend, inputs)):
        assert_close_scaled(a, b, 1e-12, name)


@pytest.mark.parametrize("max_blocks", [1, 2])
@pytest.mark.parametrize("D,Lq", [(33, 4), (64, 4), (16, 17)], ids=["D33-per-thread", "D64-warp-shared",
                                                                    "D16-segments-last-warp-partial"])
def test_grid_stride_loop_covers_everything_with_a_small_grid(max_blocks, D, Lq, forward_path):
    # 3*4*2*D = 792 or 1536 outputs and 24 warps, but only 256 or 512 threads: each thread
    # loops; D = 64 takes the forward's warp-shared path, D = 33 its per-thread one. D = 16:
    # 102 heads share points in segments of 16 lanes (scalar) or 8 (float64 pairs, where the
    # last warp is partly past the end of the work)
    inputs = make_inputs(3, 2, D, Lq, [(4, 5), (2, 2)], 3)
    small = output_and_grads(lambda *a: ms_deform_attn_emulated(*a, max_blocks=max_blocks), inputs)
    forward_path.check(inputs[0])
    for name, a, b in zip(NAMES, small, output_and_grads(torch_backend, inputs)):
        assert_close_scaled(a, b, 1e-12, f"max_blocks={max_blocks} {forward_path.name} {name}")


@pytest.mark.parametrize("D", [7, 8])
def test_non_contiguous_inputs(D, forward_path):
    value, shapes, starts, loc, weights = make_inputs(2, 2, D, 3, [(4, 3), (2, 2)], 2)
    value_t = value.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    loc_t = loc.permute(5, 0, 1, 2, 3, 4).contiguous().permute(1, 2, 3, 4, 5, 0)
    assert not value_t.is_contiguous() and not loc_t.is_contiguous()
    got = ms_deform_attn_emulated(value_t, shapes, starts, loc_t, weights)
    forward_path.check(value_t)
    torch.testing.assert_close(got, ms_deform_attn(value, shapes, starts, loc, weights, backend="torch"))


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)], ids=["f16", "bf16"])
@pytest.mark.parametrize("D", [33, 32])
def test_16_bit_inputs_accumulate_in_float32(dtype, tol, D, forward_path):
    """Same 16-bit inputs, reference in float64: errors stay within a 16-bit rounding."""
    inputs = make_inputs(3, 2, D, 4, [(5, 4), (3, 2), (1, 1)], 3, dtype=dtype)
    got = output_and_grads(ms_deform_attn_emulated, inputs)
    forward_path.check(inputs[0])
    want = output_and_grads(torch_backend, [t.double() if t.is_floating_point() else t for t in inputs])
    for name, a, b in zip(NAMES, got, want):
        assert a.dtype == dtype, name
        assert_close_scaled(a, b, tol, f"{dtype} {name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_16_bit_output_is_rounded_like_torch(dtype, forward_path):
    """One point per head sitting on a pixel centre: out = a * v exactly in float32, so the
    kernel's rounding back to 16 bits must agree bit for bit with torch's."""
    N, M, D, Lq, H, W = 2, 2, 40, 16, 4, 4
    g = torch.Generator().manual_seed(3)
    shapes = torch.tensor([[H, W]])
    value = (torch.randn(N, H * W, M, D, generator=g) * 3).to(dtype)  # (N, S, M, D)
    pixel = torch.randint(0, W, (N, Lq, M, 1, 1, 2), generator=g)  # (N, Lq, M, 1, 1, 2)
    loc = ((pixel + 0.5) / W).to(dtype)  # centres (i + 0.5) / 4 are exact in 16 bits
    weights = torch.rand(N, Lq, M, 1, 1, generator=g).to(dtype)  # (N, Lq, M, 1, 1)
    out = ms_deform_attn_emulated(value, shapes, level_start_index_from_shapes(shapes), loc, weights)
    forward_path.check(value)
    flat = pixel[..., 0, 0, 1] * W + pixel[..., 0, 0, 0]  # (N, Lq, M) row-major position
    picked = torch.stack([value[n, flat[n, :, m], m] for n in range(N) for m in range(M)])  # (N*M, Lq, D)
    picked = picked.view(N, M, Lq, D).transpose(1, 2)  # (N, Lq, M, D)
    expected = (weights.float().view(N, Lq, M, 1) * picked.float()).to(dtype)  # (N, Lq, M, D)
    assert torch.equal(out.view(N, Lq, M, D), expected)


def test_unsupported_dtype_is_rejected():
    value, shapes, starts, loc, weights = make_inputs(1, 1, 2, 1, [(2, 2)], 1)
    with pytest.raises(TypeError, match="dtype"):
        ms_deform_attn_emulated(value.to(torch.complex64), shapes, starts, loc.to(torch.complex64),
                                weights.to(torch.complex64))


# --- the emulation header itself: shuffles, __syncthreads, error reports ---------------
HEADER_TEST_KERNELS = textwrap.dedent("""
    template <typename T> __global__ void warp_totals(const T* in, T* out) {
      const int i = blockIdx.x * blockDim.x + threadIdx.x;
      T v = in[i];
      for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
      if (threadIdx.x % 32 == 0) out[i / 32] = v;
    }
    __global__ void butterfly(const int* in, int* out) {  // every lane ends with the warp total
      int v = in[threadIdx.x];
      for (int mask = 16; mask > 0; mask /= 2) v += __shfl_xor_sync(0xffffffffu, v, mask);
      out[threadIdx.x] = v;
    }
    __global__ void reverse_block(const float* in, float* out) {  // needs __syncthreads across warps
      __shared__ float tile[1024];
      const int i = blockIdx.x * blockDim.x + threadIdx.x;
      tile[threadIdx.x] = in[i];
      __syncthreads();
      out[i] = tile[blockDim.x - 1 - threadIdx.x];
    }
    __global__ void half_warp_returns_early(const int* in, int* out) {  // a bug the emulator reports
      if (threadIdx.x >= 16) return;
      out[threadIdx.x] = __shfl_down_sync(0xffffffffu, in[threadIdx.x], 1);
    }
    EMU_REGISTER_KERNEL(warp_totals<float>)
    EMU_REGISTER_KERNEL(warp_totals<double>)
    EMU_REGISTER_KERNEL(butterfly)
    EMU_REGISTER_KERNEL(reverse_block)
    EMU_REGISTER_KERNEL(half_warp_returns_early)
""")


@pytest.fixture(scope="module")
def header_kernels(tmp_path_factory):
    source = tmp_path_factory.mktemp("src") / "header_kernels.cu"
    source.write_text(HEADER_TEST_KERNELS)
    return source, load(source)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_header_shuffle_down_reduces_each_warp(header_kernels, dtype):
    _, lib = header_kernels
    x = torch.randn(3 * 128, dtype=dtype, generator=torch.Generator().manual_seed(0))
    out = torch.zeros(3 * 128 // 32, dtype=dtype)
    launch(f"warp_totals<{'float' if dtype == torch.float32 else 'double'}>", 3, 128, [x, out], library=lib)
    torch.testing.assert_close(out, x.view(-1, 32).sum(1))


def test_header_shuffle_xor_and_syncthreads(header_kernels):
    _, lib = header_kernels
    x = torch.arange(32, dtype=torch.int32)
    out = torch.zeros(32, dtype=torch.int32)
    launch("butterfly", 1, 32, [x, out], library=lib)
    assert out.tolist() == [int(x.sum())] * 32
    y = torch.randn(2 * 96)
    rev = torch.zeros(2 * 96)
    launch("reverse_block", 2, 96, [y, rev], library=lib)  # three warps meet at __syncthreads
    torch.testing.assert_close(rev, y.view(2, 96).flip(1).reshape(-1))


def test_header_reports_a_shuffle_with_missing_lanes(header_kernels):
    _, lib = header_kernels
    with pytest.raises(RuntimeError, match="has already returned"):
        launch("half_warp_returns_early", 1, 32, [torch.zeros(32, dtype=torch.int32)] * 2, library=lib)
    with pytest.raises(RuntimeError, match="no kernel registered"):
        launch("not_a_kernel", 1, 32, [], library=lib)


def test_build_reuses_the_cache_and_rebuilds_when_the_source_changes(header_kernels, tmp_path):
    source, _ = header_kernels
    first = build(source)
    assert first.parent == emulation.default_cache_dir() and first.is_file()
    mtime = first.stat().st_mtime_ns
    assert build(source) == first and first.stat().st_mtime_ns == mtime  # unchanged: not recompiled
    edited = tmp_path / source.name
    edited.write_text(source.read_text() + "\n// edited\n")
    assert build(edited) != first


# --- item by item: fp32 locations, NaN, borders, Lq = 0, grad_output strides, opcheck -----
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 8e-3), (torch.float16, 1e-3)], ids=["bf16", "f16"])
@pytest.mark.parametrize("D", [33, 32])
def test_16_bit_values_with_float32_locations_match_the_float32_reference(dtype, tol, D, forward_path):
    """16-bit values, float32 locations and weights: the float32 torch backend on the same
    (rounded) values is the reference; only the final rounding of each result differs."""
    value, shapes, starts, loc, weights = make_inputs(2, 2, D, 4, [(5, 167), (3, 84), (1, 1)], 3,
                                                      dtype=torch.float32)
    inputs = (value.to(dtype), shapes, starts, loc, weights)
    got = output_and_grads(ms_deform_attn_emulated, inputs)
    forward_path.check(inputs[0])
    want = output_and_grads(torch_backend, (value.to(dtype).float(), shapes, starts, loc, weights))
    for name, a, b, t in zip(NAMES, got, want, (dtype, dtype, torch.float32, torch.float32)):
        assert a.dtype == t, name
        assert_close_scaled(a, b, tol, f"{dtype} values, float32 locations: {name}")


@pytest.mark.parametrize("D", [5, 4])
def test_nan_locations_agree_with_loop_and_torch(D, forward_path):
    inputs = list(make_inputs(2, 2, D, 3, [(4, 5), (2, 3)], 2))
    loc = inputs[3].clone()
    loc[1, 2, 0, 1, 1, 0] = float("nan")  # x of one point
    loc[0, 1, 1, 0, 0, 1] = float("inf")  # y of another: also no defined sample
    inputs[3] = loc
    results = {b: output_and_grads(lambda *a, b=b: ms_deform_attn(*a, backend=b), inputs) for b in ("loop", "torch")}
    results["kernel"] = output_and_grads(ms_deform_attn_emulated, inputs)
    forward_path.check(inputs[0])
    bad = torch.zeros(2, 3, 2, dtype=torch.bool)  # (N, Lq, M)
    bad[1, 2, 0] = bad[0, 1, 1] = True
    for name, (out, grad_value, grad_loc, grad_weights) in results.items():
        assert torch.equal(out.view(2, 3, 2, D).isnan().all(-1), bad), name  # whole head NaN, nothing else
        assert not out.view(2, 3, 2, D)[~bad].isnan().any(), name
        assert torch.isfinite(grad_value).all(), name  # the NaN point adds nothing to grad_value
        assert torch.equal(grad_weights.isnan().any(-1).any(-1), bad), name
        assert grad_loc[1, 2, 0, 1, 1].isnan().any() and grad_loc[0, 1, 1, 0, 0].isnan().any(), name
    for name in ("loop", "kernel"):
        assert_close_scaled(results[name][1], results["torch"][1], 1e-12, f"{name} grad value")


@pytest.mark.parametrize("D", [33, 32])
def test_pixel_centres_and_borders(D, forward_path):
    """A pixel centre reads that pixel; half a pixel beyond the border reads half of it;
    a whole pixel beyond reads zero; the exact borders 0 and 1 read half the border pixel."""
    H, W = 3, 4
    value = torch.arange(1, H * W + 1, dtype=torch.float64).view(1, H * W, 1, 1).repeat(1, 1, 1, D)
    shapes = torch.tensor([[H, W]])
    points, expected = [], []
    for i in range(H):
        for j in range(W):
            points.append(((j + 0.5) / W, (i + 0.5) / H))
            expected.append(i * W + j + 1)
    row = 1  # middle row: pixels 5, 6, 7, 8
    y = (row + 0.5) / H
    for x, e in ((0.0, 0.5 * 5), (1.0, 0.5 * 8), (-0.5 / W, 0.0), (1 + 0.5 / W, 0.0), (-1.0, 0.0), (2.0, 0.0)):
        points.append((x, y))
        expected.append(e)
    Lq = len(points)
    loc = torch.tensor(points, dtype=torch.float64).view(1, Lq, 1, 1, 1, 2)  # (N, Lq, M, L, P, 2)
    weights = torch.ones(1, Lq, 1, 1, 1, dtype=torch.float64)  # (N, Lq, M, L, P)
    for fn in (ms_deform_attn_emulated, torch_backend):
        out = fn(value, shapes, level_start_index_from_shapes(shapes), loc, weights)  # (1, Lq, D)
        torch.testing.assert_close(out[0], torch.tensor(expected, dtype=torch.float64)[:, None].expand(Lq, D),
                                   rtol=0, atol=1e-12)
    forward_path.check(value)


@pytest.mark.parametrize("D", [33, 32])
def test_no_queries_and_non_contiguous_grad_output(D, forward_path):
    empty = make_inputs(2, 2, D, 0, [(4, 5)], 2)
    for name, a, b in zip(NAMES, output_and_grads(ms_deform_attn_emulated, empty),
                          output_and_grads(torch_backend, empty)):
        assert a.shape == b.shape and (a == 0).all() and (b == 0).all(), name
    assert forward_path.widths == []  # nothing to launch
    inputs = make_inputs(2, 2, D, 4, [(4, 5), (2, 2)], 2)
    g = torch.randn(2, 2 * D, 4, dtype=torch.float64).transpose(1, 2)  # (N, Lq, M*D), not contiguous
    assert not g.is_contiguous()
    got = output_and_grads(ms_deform_attn_emulated, inputs, g)
    forward_path.check(inputs[0])
    for name, a, b in zip(NAMES, got, output_and_grads(torch_backend, inputs, g.contiguous())):
        assert_close_scaled(a, b, 1e-12, f"non-contiguous grad_output: {name}")


def test_opcheck_on_the_kernel_path():
    """The custom op, with the kernel's launch code (run on the CPU) behind it."""
    value, shapes, starts, loc, weights = make_inputs(1, 2, 3, 2, [(3, 4), (1, 2)], 2, dtype=torch.float32)
    leaves = [t.requires_grad_(True) for t in (value, loc, weights)]
    torch.library.opcheck(torch.ops.ddetr_minimal.ms_deform_attn.default,
                          (leaves[0], shapes, starts, leaves[1], leaves[2], "emulation", 1))
    g = torch.randn(1, 2, 6)
    torch.library.opcheck(torch.ops.ddetr_minimal.ms_deform_attn_backward.default,
                          (g, value.detach(), shapes, starts, loc.detach(), weights.detach(), "emulation", 0))


def test_deterministic_mode_alerts_in_the_kernel_backward():
    inputs = make_inputs(1, 1, 4, 2, [(3, 3)], 1)
    ms_deform_attn_emulated(*inputs)  # the forward is deterministic: no alert
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="does not have a deterministic implementation"):
            output_and_grads(ms_deform_attn_emulated, inputs)
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="does not have a deterministic implementation"):
            output_and_grads(ms_deform_attn_emulated, inputs)
        output_and_grads(torch_backend, inputs)  # the torch backend on the CPU is fine
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 1.6e-2)], ids=["f32", "bf16"])
def test_misaligned_rows_take_the_one_channel_loads(dtype, tol, forward_path):
    """value starting one element into its storage cannot be read two channels per load: the
    forward and the backward fall back to one channel per load, with the same numbers."""
    value, shapes, starts, loc, weights = make_inputs(2, 2, 32, 3, [(4, 5), (2, 2)], 2, dtype=dtype)
    shifted = torch.empty(value.numel() + 1, dtype=dtype)[1:].view(value.shape)  # (N, S, M, D), odd offset
    shifted.copy_(value)
    assert shifted.is_contiguous() and shifted.data_ptr() % (2 * shifted.element_size()) != 0
    reference = [t.double() if t.is_floating_point() else t for t in (value, shapes, starts, loc, weights)]
    want = output_and_grads(torch_backend, reference)
    assert kernel_files.vector_width(shifted) == 1 and kernel_files.vector_width(value) > 1  # (not the patched one)
    for inputs in ((value, shapes, starts, loc, weights), (shifted, shapes, starts, loc, weights)):
        got = output_and_grads(ms_deform_attn_emulated, inputs)
        forward_path.check(inputs[0])
        for name, a, b in zip(NAMES, got, want):
            assert_close_scaled(a, b, tol, f"{dtype} offset {inputs[0].storage_offset()} {name}")


# --- the forward's vector loads and their scalar fallback ------------------------------
def shifted_copy(value, offset):
    """``value``'s numbers in a contiguous tensor starting ``offset`` elements into its storage."""
    out = torch.empty(value.numel() + offset, dtype=value.dtype)[offset:].view(value.shape)
    return out.copy_(value)


@pytest.mark.parametrize("dtype,D,offset,width", [
    (torch.float32, 32, 0, 4), (torch.float32, 6, 0, 2), (torch.float32, 7, 0, 1),
    (torch.float32, 32, 1, 1), (torch.float32, 32, 2, 2), (torch.float32, 32, 4, 4),
    (torch.float64, 32, 0, 2), (torch.float64, 33, 0, 1), (torch.float64, 32, 1, 1),
    (torch.float16, 32, 0, 8), (torch.float16, 12, 0, 4), (torch.float16, 6, 0, 2), (torch.float16, 5, 0, 1),
    (torch.float16, 32, 1, 1), (torch.float16, 32, 2, 2), (torch.float16, 32, 4, 4),
    (torch.bfloat16, 40, 0, 8), (torch.bfloat16, 40, 3, 1),
])
def test_vector_width_follows_D_dtype_and_alignment(dtype, D, offset, width):
    value = shifted_copy(torch.zeros(2, 5, 3, D, dtype=dtype), offset)  # (N, S, M, D)
    assert cupy_kernel.vector_width(value) == width
    assert cupy_kernel.vector_width(value.transpose(0, 1)) == cupy_kernel.channels_per_thread(D, dtype)  # copied


def test_a_width_that_does_not_fit_is_rejected():
    value, shapes, starts, loc, weights = make_inputs(1, 2, 32, 2, [(3, 3)], 2, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"width must be 1 or one of \(4, 2\) for torch.float32, got 8"):
        cupy_kernel.kernel_names(torch.float32, width=8)
    for bad, width in ((shifted_copy(value, 2), 4), (value[..., :30].contiguous(), 4), (value, 3)):
        with pytest.raises(ValueError, match=f"width must be 1 or a vector width .* got {width}"):
            cupy_kernel.run_forward(emulation.cpu_launch, bad, shapes, starts, loc, weights, width=width)


SIXTEEN_WITH_FLOAT32 = [(torch.float16, torch.float32), (torch.bfloat16, torch.float32)]
DTYPE_PAIRS = [(t, t) for t in cupy_kernel.KERNEL_TYPES] + SIXTEEN_WITH_FLOAT32


@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
@pytest.mark.parametrize("case", CASES + [("D16", 3, 1, 16, 3, [(4, 3), (2, 2)], 3),
                                          ("D40", 2, 2, 40, 3, [(3, 5), (1, 2)], 2)], ids=lambda c: c[0])
def test_every_vector_width_gives_the_scalar_forward_bit_for_bit(case, dtypes):
    """Same sums in the same order, only the loads differ: every width that divides D agrees
    exactly with one channel per load, also with a one-block grid that loops."""
    value, shapes, starts, loc, weights = make_inputs(*case[1:], dtype=dtypes[0])
    loc, weights = loc.to(dtypes[1]), weights.to(dtypes[1])
    D = value.shape[-1]
    scalar = cupy_kernel.run_forward(emulation.cpu_launch, value, shapes, starts, loc, weights, width=1)
    widths = [w for w in cupy_kernel.vector_widths(dtypes[0]) if D % w == 0]
    for width in widths:
        for max_blocks in (cupy_kernel.MAX_BLOCKS, 1):
            vector = cupy_kernel.run_forward(emulation.cpu_launch, value, shapes, starts, loc, weights,
                                             max_blocks=max_blocks, width=width)
            assert torch.equal(vector.isnan(), scalar.isnan()), (width, max_blocks)
            assert torch.equal(vector.nan_to_num(), scalar.nan_to_num()), f"{case[0]} width {width} {max_blocks}"


@pytest.mark.parametrize("dtype,D,offset,width,tol", [
    (torch.float32, 6, 0, 2, 2e-5),      # D a multiple of 2, not of 4
    (torch.float32, 32, 2, 2, 2e-5),     # 8-byte aligned only
    (torch.float32, 32, 1, 1, 2e-5),     # one element in: scalar
    (torch.float32, 30, 0, 2, 2e-5),
    (torch.float64, 32, 1, 1, 1e-12),
    (torch.float16, 12, 0, 4, 2e-3),     # a multiple of 4, not of 8
    (torch.float16, 32, 2, 2, 2e-3),
    (torch.bfloat16, 7, 0, 1, 1.6e-2),   # odd D: scalar
    (torch.bfloat16, 32, 1, 1, 1.6e-2),
], ids=lambda v: str(v).replace("torch.", ""))
def test_the_fallbacks_match_torch_forward_and_backward(dtype, D, offset, width, tol, forward_path):
    """D not a multiple of the widest vector, or value not aligned to it: a narrower vector or one
    channel per load, with the torch backend's numbers (forward and gradients)."""
    value, shapes, starts, loc, weights = make_inputs(2, 2, D, 3, [(4, 5), (2, 2)], 2, dtype=dtype)
    moved = shifted_copy(value, offset)
    assert kernel_files.vector_width(moved) == width  # what the vector path picks (not the patched one)
    reference = [t.double() if t.is_floating_point() else t for t in (value, shapes, starts, loc, weights)]
    got = output_and_grads(ms_deform_attn_emulated, (moved, shapes, starts, loc, weights))
    forward_path.check(moved)
    for name, a, b in zip(NAMES, got, output_and_grads(torch_backend, reference)):
        assert_close_scaled(a, b, tol, f"{dtype} D={D} offset {offset} {forward_path.name} {name}")
