"""Compile every instantiation of kernels/msda.cu with NVRTC for Turing to Hopper, without a GPU.

The CPU emulation cannot see code that only the GPU compiles (the half-precision PTX,
the shuffle and atomic overloads), so a syntax or type error there is caught here, with
the exact source and options that ``ddetr_minimal.ops.cupy_kernel`` hands to CuPy, plus the
options CuPy's RawModule adds to them (``cupy/cuda/compiler.py``: ``-ftz=true``,
``--device-as-default-execution-space`` and ``-arch=sm_XX`` for the device). sm_75 is
Colab's T4; sm_80 A100, sm_86 the RTX 30 series, sm_89 L4 and the RTX 40 series, sm_90 H100.

Every entry point is compiled: the forward once per vector width (``msda_forward<float, float, 4>``
reads four channels per load) and once with one channel per load, and the backward. The PTX
of a vector forward must really use vector loads and stores (``ld.global.nc.v4.f32``, ...).

CuPy is in requirements.txt, so if CuPy is installed but NVRTC cannot be loaded these
tests FAIL; they are skipped only when CuPy itself is not installed.
"""
import importlib.util
import re

import pytest
import torch

if importlib.util.find_spec("cupy") is None:
    pytest.skip("CuPy is not installed (pip install cupy-cuda13x): no NVRTC to compile the kernels with",
                allow_module_level=True)

from ddetr_minimal.ops.cupy_kernel import (COMPILE_OPTIONS, KERNEL_TYPES, entry_points, kernel_names,  # noqa: E402
                                            kernel_source)

SM = (75, 80, 86, 89, 90)
ARCHS = tuple(f"{kind}_{sm}" for sm in SM for kind in ("compute", "sm"))  # PTX and machine code (cubin)
CUPY_OPTIONS = ("-ftz=true", "--device-as-default-execution-space")  # what RawModule adds, besides -arch
# (value dtype, location dtype): every instantiation that entry_points can ask for
DTYPES = [(t, t) for t in KERNEL_TYPES] + [(torch.float16, torch.float32), (torch.bfloat16, torch.float32)]


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
            nvrtc.compileProgram(prog, [*COMPILE_OPTIONS, *CUPY_OPTIONS, f"-arch={arch}"])
        except nvrtc.NVRTCError as exc:
            raise AssertionError(f"NVRTC failed for {arch}:\n{nvrtc.getProgramLog(prog)}") from exc
        lowered = [nvrtc.getLoweredName(prog, name) for name in names]
        binary = nvrtc.getCUBIN(prog) if arch.startswith("sm_") else nvrtc.getPTX(prog)
        return lowered, binary, nvrtc.getProgramLog(prog)
    finally:
        nvrtc.destroyProgram(prog)


def test_nvrtc_supports_turing_to_hopper(nvrtc):
    archs = nvrtc.getSupportedArchs()
    assert set(SM) <= set(archs), f"NVRTC {nvrtc.getVersion()} supports {archs}"


def entry_body(ptx, mangled):
    """The PTX of one kernel entry: from its ``.entry`` line to the next one."""
    start = ptx.index(f".entry {mangled}(")
    end = ptx.find(".entry ", start + 1)
    return ptx[start:end if end >= 0 else len(ptx)]


VECTOR_ACCESS = re.compile(r"\b(ld\.global(\.nc)?|st\.global)\.v[24]\.")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
def test_every_instantiation_compiles(nvrtc, arch, dtypes):
    names = entry_points(*dtypes)
    assert len(names) >= 3 and names[0] == kernel_names(*dtypes)[0] and names[-1] == kernel_names(*dtypes)[1]
    lowered, binary, log = compile_kernels(nvrtc, arch, names)
    assert "warning" not in log.lower(), log
    assert len(binary) > 0
    for name, mangled in zip(names, lowered):
        assert mangled.startswith("_Z"), (name, mangled)  # a C++ template instantiation was emitted
        if arch.startswith("compute_"):
            text = binary.decode() if isinstance(binary, bytes) else binary
            assert f".entry {mangled}(" in text, f"{name} ({mangled}) is not a kernel entry in the PTX"
            if name.startswith("msda_forward"):  # vector loads and stores exactly in the vector forwards
                body = entry_body(text, mangled)
                vector = name.count(",") == 2
                loads = set(m.group(0) for m in VECTOR_ACCESS.finditer(body))
                assert bool(loads) == vector, f"{name} on {arch}: vector accesses {sorted(loads)}"
                if vector:
                    assert {x.split(".v")[0].split(".")[0] for x in loads} == {"ld", "st"}, (name, loads)


def test_a_type_error_in_gpu_only_code_fails(nvrtc):
    """The check above can fail: break the float16 conversion and NVRTC must reject it."""
    broken = kernel_source().replace('asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h.bits));',
                                     "f = h;  // a half_t struct is not a float")
    assert broken != kernel_source()
    with pytest.raises(AssertionError, match="NVRTC failed"):
        compile_kernels(nvrtc, "compute_80", kernel_names(torch.float16), source=broken)
