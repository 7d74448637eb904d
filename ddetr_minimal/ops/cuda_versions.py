"""Does the installed CuPy match the CUDA major version that torch was built for?

CuPy ships one wheel per CUDA major version (``cupy-cuda12x``, ``cupy-cuda13x``), and it
loads the CUDA libraries that are present -- in a torch environment, torch's. A CuPy built
for CUDA 12 next to a torch built for CUDA 13 loads libnvrtc 13, which it does not support.
pip cannot choose between the two (its environment markers cannot see torch's CUDA), so
the package has one extra per major version (``pip install "ddetr_minimal[cuda13]"``) and
this module names a mismatch at run time, with the command that fixes it::

    python -m ddetr_minimal.ops.cuda_versions   # prints the pip command for this machine
"""
from __future__ import annotations

import importlib.metadata
import sys
from typing import List, Optional, Tuple

import torch

KNOWN_MAJORS = (11, 12, 13, 14)
INSTALL_HINT = (
    "install the CuPy that matches torch's CUDA version: `pip install cupy-cuda13x` for a torch "
    "built for CUDA 13 (torch.version.cuda '13.x'), `pip install cupy-cuda12x` for CUDA 12; "
    "`python -m ddetr_minimal.ops.cuda_versions` prints the command for this machine"
)


def package_for(major: int) -> str:
    """The CuPy wheel built for CUDA ``major``: ``package_for(13) == "cupy-cuda13x"``."""
    return f"cupy-cuda{major}x"


def torch_cuda_major() -> Optional[int]:
    """The CUDA major version torch was built with (``torch.version.cuda``), None for CPU builds."""
    version = getattr(torch.version, "cuda", None)
    return int(str(version).split(".")[0]) if version else None


def installed_cupy_packages() -> List[str]:
    """The CuPy wheels installed (normally one), e.g. ``["cupy-cuda12x"]``."""
    found = []
    for major in KNOWN_MAJORS:
        try:
            importlib.metadata.version(package_for(major))
        except importlib.metadata.PackageNotFoundError:
            continue
        found.append(package_for(major))
    return found


def cupy_cuda_majors() -> List[Tuple[int, str]]:
    """(CUDA major, package) of every CuPy wheel installed."""
    return [(int(p[len("cupy-cuda"):-1]), p) for p in installed_cupy_packages()]


def pip_command(torch_major: int, installed: List[str]) -> str:
    """The command that replaces the installed CuPy wheels by the one for ``torch_major``."""
    wanted = package_for(torch_major)
    wrong = [p for p in installed if p != wanted]
    uninstall = f"pip uninstall -y {' '.join(wrong)} && " if wrong else ""
    return f"{uninstall}pip install {wanted}"


def mismatch() -> Optional[str]:
    """A sentence naming the mismatch and the pip command that fixes it, or None when CuPy
    matches torch (or when either side is unknown: a CPU-only torch, a CuPy built from source)."""
    torch_major = torch_cuda_major()
    majors = cupy_cuda_majors()
    if torch_major is None or not majors:
        return None
    if [m for m, _ in majors] == [torch_major]:
        return None
    names = ", ".join(p for _, p in majors)
    what = "two CuPy builds are installed" if len(majors) > 1 else "CuPy is built for another CUDA"
    return (
        f"{what} ({names}) but torch {torch.__version__} is built for CUDA {torch_major} "
        f"(torch.version.cuda = {torch.version.cuda!r}); fix it with `{pip_command(torch_major, [p for _, p in majors])}`"
    )


def fix_hint() -> str:
    """What to try when the kernel fails to compile, load or run."""
    problem = mismatch()
    if problem:
        return "Likely cause: " + problem
    return ("Check that CuPy matches torch's CUDA version and that this CUDA's NVRTC knows the GPU "
            "(a newer GPU needs a newer CUDA); " + INSTALL_HINT + ". backend='torch' runs anywhere.")


def main() -> int:
    torch_major = torch_cuda_major()
    if torch_major is None:
        print(f"torch {torch.__version__} is a CPU build: the CUDA kernel cannot run; backend='torch' does.")
        return 0
    problem = mismatch()
    installed = installed_cupy_packages()
    if problem:
        print(problem)
    elif installed:
        print(f"{', '.join(installed)} matches torch {torch.__version__} (CUDA {torch_major}).")
    print(pip_command(torch_major, installed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
