"""Compile every instantiation of kernels/msda.cu with NVRTC for Ampere and Hopper, without a GPU.

The CPU emulation cannot see code that only the GPU compiles (the half-precision PTX,
the shuffle and atomic overloads), so a syntax or type error there is caught here, with
the exact source and options that ``ddetr_minimal.ops.cupy_kernel`` hands to CuPy.

CuPy is in requirements.txt, so if CuPy is installed but NVRTC cannot be loaded these
tests FAIL; they are skipped only when CuPy itself is not installed.
"""
import importlib.util

import pytest
import torch

if importlib.util.find_spec("cupy") is None:
    pytest.skip("CuPy is not installed (pip install cupy-cuda13x): no NVRTC to compile the kernels with",
                allow_module_level=True)

from ddetr_minimal.ops.cupy_kernel import COMPILE_OPTIONS, KERNEL_TYPES, kernel_names, kernel_source  # noqa: E402

ARCHS = ("compute_80", "sm_80", "compute_90", "sm_90")  # PTX and machine code (cubin) for each
DTYPES = list(KERNEL_TYPES)


@pytest.fixture(scope="module")
def nvrtc():
    from cupy_backends.cuda.libs import nvrtc as lib

    lib.getVersion()  # raises if libnvrtc cannot be loaded: a failure, not a skip
    return lib


def compile_kernels(nvrtc, arch, names, source=None):
    """Compile ``names`` for ``arch``; return (lowered names, PTX or cubin bytes, log)."""
    prog = nvrtc.createProgram(source if source is not None else kernel_source(), "msda.cu", [], [])
    try:
        for name in names:
            nvrtc.addNameExpression(prog, name)
        try:
            nvrtc.compileProgram(prog, [f"--gpu-architecture={arch}", *COMPILE_OPTIONS])
        except nvrtc.NVRTCError as exc:
            raise AssertionError(f"NVRTC failed for {arch}:\n{nvrtc.getProgramLog(prog)}") from exc
        lowered = [nvrtc.getLoweredName(prog, name) for name in names]
        binary = nvrtc.getCUBIN(prog) if arch.startswith("sm_") else nvrtc.getPTX(prog)
        return lowered, binary, nvrtc.getProgramLog(prog)
    finally:
        nvrtc.destroyProgram(prog)


def test_nvrtc_supports_ampere_and_hopper(nvrtc):
    archs = nvrtc.getSupportedArchs()
    assert 80 in archs and 90 in archs, f"NVRTC {nvrtc.getVersion()} supports {archs}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_instantiation_compiles(nvrtc, arch, dtype):
    names = kernel_names(dtype)
    lowered, binary, log = compile_kernels(nvrtc, arch, names)
    assert "warning" not in log.lower(), log
    assert len(binary) > 0
    for name, mangled in zip(names, lowered):
        assert mangled.startswith("_Z"), (name, mangled)  # a C++ template instantiation was emitted
        if arch.startswith("compute_"):
            text = binary.decode() if isinstance(binary, bytes) else binary
            assert f".entry {mangled}(" in text, f"{name} ({mangled}) is not a kernel entry in the PTX"


def test_a_type_error_in_gpu_only_code_fails(nvrtc):
    """The check above can fail: break the float16 conversion and NVRTC must reject it."""
    broken = kernel_source().replace('asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h.bits));',
                                     "f = h;  // a half_t struct is not a float")
    assert broken != kernel_source()
    with pytest.raises(AssertionError, match="NVRTC failed"):
        compile_kernels(nvrtc, "compute_80", kernel_names(torch.float16), source=broken)
