"""Writing files atomically: recorded results (the small JSON files under data/ that the book
plots) and checkpoints."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union


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
