"""How the book shows that a by-hand version equals the package's: it asserts it.

:func:`check_close` returns the largest absolute difference (for the prose) and raises when it
is over the stated tolerance, so a broken package fails the book's build instead of printing a
sentence that says the two agree.
"""
from __future__ import annotations

import math
from typing import Union

import torch

Number = Union[float, int]


def max_difference(a, b) -> float:
    """Largest absolute elementwise difference of two tensors (or numbers) of the same shape."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.shape != b.shape:
        raise ValueError(f"cannot compare shapes {tuple(a.shape)} and {tuple(b.shape)}; expected equal shapes")
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def check_close(what: str, ours, package, atol: Number, rtol: Number = 0.0) -> float:
    """Assert ``|ours - package| <= atol + rtol * |package|`` everywhere; return the largest difference.

    ``what`` names the comparison in the error, e.g. ``"Eq. (1) by hand vs MultiHeadAttention"``.
    """
    if not (isinstance(atol, (int, float)) and atol >= 0 and isinstance(rtol, (int, float)) and rtol >= 0):
        raise ValueError(f"atol and rtol must be non-negative numbers, got atol={atol!r}, rtol={rtol!r}")
    diff = max_difference(ours, package)
    a, b = torch.as_tensor(ours).double(), torch.as_tensor(package).double()
    bound = atol + rtol * b.abs()
    if math.isnan(diff) or bool(((a - b).abs() > bound).any()):
        raise AssertionError(f"{what}: largest difference {diff:.3e} exceeds the tolerance "
                             f"(atol={atol:g}, rtol={rtol:g})")
    return diff
