"""CPU-side behaviour of the "cupy" backend: helpful errors, lazy import, "auto" dispatch."""
import importlib
import sys
import types

import pytest
import torch

from ddetr_minimal.measure import bench_kernel
from ddetr_minimal.ops import cupy_kernel, selftest
from ddetr_minimal.ops.checks import level_start_index_from_shapes
from ddetr_minimal.ops.msda import ms_deform_attn, resolve_backend


def small_inputs(device="cpu"):
    g = torch.Generator().manual_seed(0)
    shapes = torch.tensor([[3, 4], [1, 1]])  # (L, 2)
    value = torch.randn(2, 13, 2, 4, generator=g)  # (N, S, M, D)
    loc = torch.rand(2, 5, 2, 2, 3, 2, generator=g)  # (N, Lq, M, L, P, 2)
    weights = torch.rand(2, 5, 2, 2, 3, generator=g).softmax(-1)  # (N, Lq, M, L, P)
    return [t.to(device) for t in (value, shapes, level_start_index_from_shapes(shapes), loc, weights)]


@pytest.fixture(autouse=True)
def fresh_availability():
    """is_available(), the self-test and the compiler cache their answers; every test here
    starts and ends without them."""
    cupy_kernel.is_available.cache_clear()
    selftest.forget()
    cupy_kernel._COMPILED.clear()
    yield
    cupy_kernel.is_available.cache_clear()
    selftest.forget()
    cupy_kernel._COMPILED.clear()


@pytest.fixture
def without_cupy(monkeypatch):
    """`import cupy` raises ImportError, as on a machine without CuPy."""
    monkeypatch.setitem(sys.modules, "cupy", None)


def test_cupy_backend_without_cupy_says_how_to_install(without_cupy):
    assert cupy_kernel.is_available() is False
    with pytest.raises(cupy_kernel.CupyUnavailableError, match=r"pip install cupy-cuda13x"):
        ms_deform_attn(*small_inputs(), backend="cupy")


def test_cupy_backend_without_gpu_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(cupy_kernel.CupyUnavailableError, match=r"no CUDA GPU.*backend='torch'"):
        ms_deform_attn(*small_inputs(), backend="cupy")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU; tests/test_gpu.py covers it")
def test_cupy_backend_raises_the_helpful_error_on_this_machine():
    with pytest.raises(cupy_kernel.CupyUnavailableError) as info:
        ms_deform_attn(*small_inputs(), backend="cupy")
    assert "backend='cupy' cannot run here" in str(info.value)
    assert "torch.cuda.is_available() is False" in str(info.value)


def test_cupy_backend_rejects_cpu_tensors_even_when_cupy_works(monkeypatch):
    monkeypatch.setattr(cupy_kernel, "missing", lambda: [])
    with pytest.raises(ValueError, match=r"needs CUDA tensors.*on cpu"):
        ms_deform_attn(*small_inputs(), backend="cupy")


def test_is_available_never_raises(monkeypatch):
    def broken():
        raise RuntimeError("driver too old")

    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=broken)))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cupy_kernel.is_available() is False
    assert any("driver too old" in p for p in cupy_kernel.missing())


@pytest.fixture
def reimported_package():
    """Forget every ddetr_minimal module so the next import runs the package's code again."""
    saved = {k: v for k, v in sys.modules.items() if k == "ddetr_minimal" or k.startswith("ddetr_minimal.")}
    for k in saved:
        del sys.modules[k]
    yield
    for k in [k for k in sys.modules if k == "ddetr_minimal" or k.startswith("ddetr_minimal.")]:
        del sys.modules[k]
    sys.modules.update(saved)


def test_import_does_not_need_cupy(without_cupy, reimported_package):
    pkg = importlib.import_module("ddetr_minimal")
    out = pkg.ms_deform_attn(*small_inputs(), backend="auto")  # works, on the torch backend
    assert out.shape == (2, 5, 8)
    assert importlib.import_module("ddetr_minimal.ops.cupy_kernel").is_available() is False
    importlib.import_module("ddetr_minimal.ops.emulation")  # the CPU emulation does not need CuPy either
    importlib.import_module("ddetr_minimal.measure.bench_kernel")


def test_auto_picks_torch_for_cpu_tensors(monkeypatch):
    inputs = small_inputs()
    monkeypatch.setattr(cupy_kernel, "is_available", lambda: True)  # even when the kernel could run
    assert resolve_backend("auto", inputs[0]) == "torch"
    torch.testing.assert_close(ms_deform_attn(*inputs, backend="auto"), ms_deform_attn(*inputs, backend="torch"),
                               rtol=0, atol=0)


def test_kernel_names_reject_unsupported_dtypes():
    assert cupy_kernel.kernel_names(torch.float16) == ("msda_forward<half_t, half_t>",
                                                       "msda_backward<half_t, half_t>")
    assert cupy_kernel.kernel_names(torch.bfloat16, torch.float32) == ("msda_forward<bfloat16_t, float>",
                                                                       "msda_backward<bfloat16_t, float>")
    with pytest.raises(TypeError, match="torch.int32"):
        cupy_kernel.kernel_names(torch.int32)
    with pytest.raises(TypeError, match="value.s dtype torch.float64, got torch.float16"):
        cupy_kernel.kernel_names(torch.float64, torch.float16)


def test_kernel_source_comes_from_the_installed_package():
    src = cupy_kernel.kernel_source()
    assert "__global__ void msda_forward" in src and "__global__ void msda_backward" in src
    # the header msda.cu includes is pasted in: NVRTC gets one self-contained source
    header = (cupy_kernel.kernels_dir() / "msda_types.cuh").read_text()
    assert '#include "' not in src and header in src and "struct alignas(V * sizeof(scalar_t)) Vec" in src


def test_entry_points_hold_every_vector_width_of_the_forward():
    assert cupy_kernel.vector_widths(torch.float32) == (4, 2)
    assert cupy_kernel.vector_widths(torch.float64) == (2,)
    assert cupy_kernel.vector_widths(torch.bfloat16) == (8, 4, 2)
    assert cupy_kernel.entry_points(torch.float32) == (
        "msda_forward<float, float>", "msda_forward<float, float, 4>", "msda_forward<float, float, 2>",
        "msda_backward<float, float>")
    assert cupy_kernel.entry_points(torch.float16, torch.float32)[1] == "msda_forward<half_t, float, 8>"
    with pytest.raises(ValueError, match=r"width must be 1 or one of \(2,\) for torch.float64, got 4"):
        cupy_kernel.kernel_names(torch.float64, width=4)


# --- the GPU benchmark script, on a machine without one --------------------------------
def test_bench_exits_with_a_clear_message_without_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr(bench_kernel, "missing", lambda: ["no CUDA GPU is usable"])
    with pytest.raises(SystemExit) as info:
        bench_kernel.main(["--out-dir", str(tmp_path)])
    assert "needs a CUDA GPU" in str(info.value.code) and "no CUDA GPU is usable" in str(info.value.code)
    assert list(tmp_path.iterdir()) == []


def test_bench_never_overwrites_without_force(tmp_path):
    path = bench_kernel.output_path(tmp_path, "NVIDIA H100 80GB HBM3")
    assert path.name == "NVIDIA-H100-80GB-HBM3.json"
    bench_kernel.write_result(path, {"run": 1})
    with pytest.raises(FileExistsError, match="--force"):
        bench_kernel.write_result(path, {"run": 2})
    assert '"run": 1' in path.read_text()
    bench_kernel.write_result(path, {"run": 2}, force=True)
    assert '"run": 2' in path.read_text()
