"""backend="auto" falls back to torch when the kernel cannot work, found out by a self-test;
tested on the CPU by running the kernel in the emulation and injecting failures into it."""
import warnings

import pytest
import torch

from ddetr_minimal.ops import cupy_kernel, cuda_versions, emulation, library, selftest
from ddetr_minimal.ops.checks import level_start_index_from_shapes
from ddetr_minimal.ops.msda import ms_deform_attn

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_caches(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DDETR_MINIMAL_CACHE", str(tmp_path_factory.getbasetemp() / "emulation"))
    for clear in (cupy_kernel.is_available.cache_clear, selftest.forget, cupy_kernel._COMPILED.clear):
        clear()
    yield
    for clear in (cupy_kernel.is_available.cache_clear, selftest.forget, cupy_kernel._COMPILED.clear):
        clear()


@pytest.fixture
def kernel_on_cpu(monkeypatch):
    """Let "auto" pick the kernel for CPU tensors, with CuPy's launcher replaced by the emulation's:
    the self-test and the dispatch then run for real, on the CPU."""
    calls = []
    monkeypatch.setattr(library, "KERNEL_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(torch.version, "cuda", "13.0")  # matching builds, whatever this machine has
    monkeypatch.setattr(cuda_versions, "installed_cupy_packages", lambda: ["cupy-cuda13x"])

    def launch(name, grid, block, args):
        calls.append(name)
        emulation.cpu_launch(name, grid, block, args)

    monkeypatch.setattr(cupy_kernel, "cupy_launch", launch)
    return calls


def small_inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor([[3, 4], [1, 1]])  # (L, 2)
    value = torch.randn(2, 13, 2, 4, generator=g).to(dtype)  # (N, S, M, D)
    loc = torch.rand(2, 5, 2, 2, 3, 2, generator=g)  # (N, Lq, M, L, P, 2)
    weights = torch.rand(2, 5, 2, 2, 3, generator=g).softmax(-1)  # (N, Lq, M, L, P)
    return [value, shapes, level_start_index_from_shapes(shapes), loc.to(dtype), weights.to(dtype)]


def test_the_self_test_passes_and_auto_uses_the_kernel(kernel_on_cpu):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when the kernel works
        out = ms_deform_attn(*small_inputs(), backend="auto")
    assert "msda_forward<float, float>" in kernel_on_cpu and "msda_backward<float, float>" in kernel_on_cpu
    # the self-test also ran every vector width of the forward
    assert {"msda_forward<float, float, 4>", "msda_forward<float, float, 2>"} <= set(kernel_on_cpu)
    runs = len(kernel_on_cpu)
    torch.testing.assert_close(ms_deform_attn(*small_inputs(), backend="auto"), out)
    assert kernel_on_cpu[runs:] == ["msda_forward<float, float, 4>"]  # D = 4, aligned; the self-test ran once
    torch.testing.assert_close(out, ms_deform_attn(*small_inputs(), backend="torch"))


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_the_self_test_passes_under_no_grad_and_inference_mode(kernel_on_cpu, mode):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with getattr(torch, mode)():
            out = ms_deform_attn(*small_inputs(), backend="auto")  # the first call: the self-test runs here
    assert "msda_backward<float, float>" in kernel_on_cpu  # the self-test ran (and passed)
    torch.testing.assert_close(out, ms_deform_attn(*small_inputs(), backend="torch"))


def test_a_launch_failure_warns_once_and_auto_uses_torch(kernel_on_cpu, monkeypatch):
    attempts = []

    def broken(name, grid, block, args):
        attempts.append(name)
        raise RuntimeError("CUDA_ERROR_NO_BINARY_FOR_GPU: no kernel image is available for execution")

    monkeypatch.setattr(cupy_kernel, "cupy_launch", broken)
    with pytest.warns(RuntimeWarning, match=r"(?s)failed its self-test.*backend='torch'.*CUDA_ERROR_NO_BINARY_FOR_GPU"
                      r".*Check that CuPy matches torch's CUDA version"):
        out = ms_deform_attn(*small_inputs(), backend="auto")
    torch.testing.assert_close(out, ms_deform_attn(*small_inputs(), backend="torch"), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the second call neither warns nor tries again
        ms_deform_attn(*small_inputs(), backend="auto")
    assert len(attempts) == 1
    assert library.resolve("auto", small_inputs()[0], torch.float32) == "torch"
    # another dtype is another self-test (here: it fails too, and says so once)
    with pytest.warns(RuntimeWarning, match="torch.float64"):
        ms_deform_attn(*small_inputs(torch.float64), backend="auto")


def test_wrong_numbers_fail_the_self_test(kernel_on_cpu, monkeypatch):
    def off_by_a_bit(name, grid, block, args):
        emulation.cpu_launch(name, grid, block, args)
        if name.startswith("msda_forward"):
            args[5].add_(1e-2)  # the output

    monkeypatch.setattr(cupy_kernel, "cupy_launch", off_by_a_bit)
    with pytest.warns(RuntimeWarning, match="SelfTestMismatch: output differs from the torch backend"):
        assert selftest.kernel_works(CPU, torch.float32, torch.float32) is False


def test_a_wrong_vector_forward_fails_the_self_test(kernel_on_cpu, monkeypatch):
    """Only the forward that reads four channels per load is off: the self-test runs it too."""
    def vector_off(name, grid, block, args):
        emulation.cpu_launch(name, grid, block, args)
        if name == "msda_forward<float, float, 4>":
            args[5].add_(1e-2)  # the output

    monkeypatch.setattr(cupy_kernel, "cupy_launch", vector_off)
    with pytest.warns(RuntimeWarning, match="SelfTestMismatch: output with 4 channels per load differs"):
        assert selftest.kernel_works(CPU, torch.float32, torch.float32) is False


class FakeCompileException(Exception):
    """Shaped like cupy.cuda.compiler.CompileException: the log comes from get_message()."""

    def get_message(self):
        return "nvrtc: error: invalid value for --gpu-architecture (-arch)\nmsda.cu(1): the log"


def test_a_compile_failure_is_cached_with_its_log(monkeypatch):
    compiles = []

    def fail(names, device_index):
        compiles.append(names)
        raise FakeCompileException()

    # the real CuPy launcher: it asks for the compiled kernels before it touches CuPy
    monkeypatch.setattr(library, "KERNEL_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(cupy_kernel, "_compile_module", fail)
    with pytest.warns(RuntimeWarning, match=r"(?s)invalid value for --gpu-architecture.*the log"):
        out = ms_deform_attn(*small_inputs(), backend="auto")  # falls back
    torch.testing.assert_close(out, ms_deform_attn(*small_inputs(), backend="torch"))
    # what an explicit backend="cupy" meets: the cached error with NVRTC's log, no recompiling
    for _ in range(2):
        with pytest.raises(cupy_kernel.CupyKernelError, match=r"(?s)compiling msda_forward<float, float>.*"
                                                               r"invalid value for --gpu-architecture"):
            cupy_kernel.cupy_launch("msda_forward<float, float>", 1, 256, small_inputs())
    assert len(compiles) == 1


def test_deterministic_mode_and_graph_capture_use_torch(kernel_on_cpu, monkeypatch):
    value = small_inputs()[0]
    assert library.resolve("auto", value, torch.float32) == "cupy"
    try:
        torch.use_deterministic_algorithms(True)
        assert library.resolve("auto", value, torch.float32) == "torch"
        ms_deform_attn(*small_inputs(), backend="auto").sum()  # runs, on torch
    finally:
        torch.use_deterministic_algorithms(False)
    monkeypatch.setattr(library, "_capturing", lambda value: True)
    assert library.resolve("auto", value, torch.float32) == "torch"


# --- CuPy's CUDA against torch's CUDA ----------------------------------------------------
@pytest.mark.parametrize("torch_cuda,installed,expected", [
    ("13.0", ["cupy-cuda12x"], "pip uninstall -y cupy-cuda12x && pip install cupy-cuda13x"),
    ("12.6", ["cupy-cuda13x"], "pip uninstall -y cupy-cuda13x && pip install cupy-cuda12x"),
    ("13.0", ["cupy-cuda12x", "cupy-cuda13x"], "pip uninstall -y cupy-cuda12x && pip install cupy-cuda13x"),
    ("13.0", ["cupy-cuda13x"], None),
    ("12.8", ["cupy-cuda12x"], None),
    (None, ["cupy-cuda12x"], None),  # a CPU build of torch: nothing to match
    ("13.0", [], None),  # no CuPy wheel (a source build, or none): nothing to compare
])
def test_cuda_mismatch_names_both_and_the_fix(monkeypatch, torch_cuda, installed, expected):
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    monkeypatch.setattr(cuda_versions, "installed_cupy_packages", lambda: list(installed))
    message = cuda_versions.mismatch()
    if expected is None:
        assert message is None
    else:
        assert expected in message and f"CUDA {torch_cuda.split('.')[0]}" in message
        assert all(p in message for p in installed)


def test_a_mismatch_stops_the_cupy_backend_with_the_fix(monkeypatch):
    import sys
    import types

    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=lambda: 1)))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cuda_versions, "installed_cupy_packages", lambda: ["cupy-cuda12x"])
    assert cupy_kernel.is_available() is False
    with pytest.raises(cupy_kernel.CupyUnavailableError, match=r"cupy-cuda12x.*pip install cupy-cuda13x"):
        ms_deform_attn(*small_inputs(), backend="cupy")
    assert "pip install cupy-cuda13x" in cuda_versions.fix_hint()
