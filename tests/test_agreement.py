import math

import pytest
import torch

from ddetr_minimal.measure.agreement import check_close, max_difference


def test_check_close_returns_the_largest_difference():
    a = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert check_close("x", a, a + torch.tensor([0.0, 1e-7, -2e-7], dtype=torch.float64), atol=1e-6) == pytest.approx(2e-7, rel=1e-3)


def test_check_close_raises_over_the_tolerance_and_names_the_comparison():
    with pytest.raises(AssertionError, match="Eq. 1 by hand.*1.000e-03"):
        check_close("Eq. 1 by hand", torch.zeros(3), torch.tensor([0.0, 1e-3, 0.0]), atol=1e-4)


def test_check_close_uses_the_relative_tolerance():
    big = torch.tensor([1000.0])
    assert check_close("rel", big, big + 0.05, atol=0.0, rtol=1e-4) == pytest.approx(0.05, rel=1e-3)
    with pytest.raises(AssertionError):
        check_close("rel", big, big + 0.5, atol=0.0, rtol=1e-4)


def test_nan_never_passes():
    with pytest.raises(AssertionError):
        check_close("nan", torch.tensor([math.nan]), torch.tensor([0.0]), atol=1.0)


def test_shape_mismatch_and_bad_tolerance_are_errors():
    with pytest.raises(ValueError, match=r"shapes \(2,\) and \(3,\)"):
        max_difference(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="atol"):
        check_close("x", torch.zeros(1), torch.zeros(1), atol=-1)
