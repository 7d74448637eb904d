"""The package copied into a coursework folder, not installed: ``ddetr_minimal/`` and ``kernels/``
side by side find the kernel source and the emulation header."""
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch
    import ddetr_minimal
    from ddetr_minimal.ops import cupy_kernel, emulation
    from ddetr_minimal.ops.msda import ms_deform_attn
    from ddetr_minimal.ops.random_inputs import random_op_inputs

    here = Path.cwd().resolve()
    assert Path(ddetr_minimal.__file__).resolve().is_relative_to(here), ddetr_minimal.__file__
    assert cupy_kernel.kernels_dir().resolve() == here / "kernels", cupy_kernel.kernels_dir()
    inputs = random_op_inputs([(4, 5), (2, 3)], N=1, Lq=3, M=2, D=4, P=2, loc_range=(-0.1, 1.1))
    emulated = emulation.ms_deform_attn_emulated(*inputs)
    reference = ms_deform_attn(*inputs, backend="torch")
    torch.testing.assert_close(emulated, reference)
    print("copied layout OK", emulation.kernels_dir())
""")


def _copy(tmp_path, folders):
    for name in folders:
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))


def _run(tmp_path):
    # a fresh interpreter whose first import path is the coursework folder, not the repository
    return subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home())})


@pytest.mark.skipif(shutil.which("g++") is None, reason="the kernel's CPU emulation needs g++")
def test_copied_folders_run_the_emulated_kernel(tmp_path):
    _copy(tmp_path, ["ddetr_minimal", "kernels"])
    result = _run(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "copied layout OK" in result.stdout
    assert str(tmp_path / "kernels") in result.stdout


def test_a_copy_without_kernels_says_what_is_missing(tmp_path):
    _copy(tmp_path, ["ddetr_minimal"])
    result = _run(tmp_path)
    assert result.returncode != 0
    assert "cannot find the kernel source msda.cu" in result.stderr
    assert "copy the repository's kernels/ folder next to ddetr_minimal/" in result.stderr


def test_a_kernels_folder_without_the_types_header_says_what_is_missing(tmp_path):
    _copy(tmp_path, ["ddetr_minimal", "kernels"])
    (tmp_path / "kernels" / "msda_types.cuh").unlink()  # msda.cu includes it
    result = _run(tmp_path)
    assert result.returncode != 0
    assert "cannot find the kernel source msda.cu and msda_types.cuh" in result.stderr
