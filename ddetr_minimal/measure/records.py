"""Records: where a result came from (provenance), and writing results and checkpoints atomically.

Every recorded result under ``data/`` carries :func:`provenance` -- the command, the commit, the
machine and the date that produced it -- so the book can say where each number comes from.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence, Union


def git_commit(cwd=None) -> str | None:
    """``git rev-parse HEAD`` (with ``-dirty`` when the tree has changes), or None without git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine() -> dict:
    """A short description of the computer a result was measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def provenance(command: Sequence[str], cwd=None) -> dict:
    """``{"command", "commit", "machine", "date"}`` for a record; ``command`` is the argv as run,
    e.g. ``["python", "-m", "ddetr_minimal", "benchmark", "--repeats", "3"]``."""
    return {
        "command": shlex.join(list(command)),
        "commit": git_commit(cwd),
        "machine": machine(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def write_json(path: Union[str, Path], obj: dict) -> None:
    """Write ``obj`` as JSON to ``path`` atomically: to ``path.tmp`` first, then ``os.replace``.

    A crash mid-write never leaves a half-written result behind. Callers decide beforehand
    whether overwriting an existing file is allowed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def save_atomic(obj, path: Union[str, Path]) -> None:
    """``torch.save`` to ``path.tmp``, flush it to disk, then ``os.replace`` it onto ``path``."""
    import torch

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# where the book's recorded results live online (used when the repository is not checked out, as in Colab)
RESULTS_URL = "https://raw.githubusercontent.com/ddetr-minimal/deformable-detr-book/main/data/results/"


def load_result(name: str, start: Union[str, Path, None] = None, online: Optional[bool] = None) -> Optional[dict]:
    """A recorded result ``data/results/<name>``, or None while it is not recorded.

    Looks in ``start`` (default: the working directory) and its parents, so a chapter finds the
    repository's results from ``book/``. ``online`` (default: only in Colab, where the package is
    installed without the repository's data) also tries :data:`RESULTS_URL`.
    """
    here = Path.cwd() if start is None else Path(start)
    for folder in (here, *here.parents):
        path = folder / "data" / "results" / name
        if path.is_file():
            return json.loads(path.read_text())
    if online is None:
        online = "google.colab" in sys.modules
    if online:
        import urllib.request

        try:
            with urllib.request.urlopen(RESULTS_URL + name, timeout=20) as response:
                return json.loads(response.read())
        except (OSError, ValueError):
            return None
    return None
