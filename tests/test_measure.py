"""Measurement helpers: timers, saved-tensor memory, attention entropy, cost curves."""
import math
import time

import pytest
import torch

from ddetr_minimal.measure.cost import attention_cost, attention_entropy
from ddetr_minimal.measure.timing import median_time, median_times
from ddetr_minimal.measure.memory import saved_tensor_bytes


def test_median_time_wall_clock_counts_sleep_and_cpu_clock_does_not():
    nap = lambda: time.sleep(0.003)  # noqa: E731
    wall = median_time(nap, repeats=3, warmup=0, min_seconds=0.0, clock="wall")
    cpu = median_time(nap, repeats=3, warmup=0, min_seconds=0.0, clock="cpu")
    assert wall >= 0.003
    assert cpu < 0.001  # sleeping uses no CPU time


def test_median_time_is_per_call_when_batching_fast_calls():
    calls = []
    t = median_time(lambda: calls.append(1), repeats=3, warmup=2, min_seconds=0.005)
    assert len(calls) > 5  # fast calls were batched to last at least min_seconds
    assert t < 0.001  # but the result is the time of one call


def test_median_times_measures_each_call():
    slow, fast = (lambda: time.sleep(0.004)), (lambda: None)
    t_slow, t_fast = median_times([(slow, ()), (fast, ())], repeats=3, min_seconds=0.0)
    assert t_slow >= 0.004 > t_fast


@pytest.mark.parametrize("kwargs,match", [
    (dict(repeats=0), "repeats"), (dict(warmup=-1), "warmup"),
    (dict(min_seconds=-1.0), "min_seconds"), (dict(clock="gpu"), "clock"),
])
def test_median_time_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        median_time(lambda: None, **kwargs)


def test_saved_tensor_bytes_counts_shared_storage_once():
    x = torch.randn(30, 40, requires_grad=True)
    # exp saves its output y; sin saves its input y again: one 30 x 40 float32 tensor in all
    assert saved_tensor_bytes(lambda t: t.exp().sin(), x) == 30 * 40 * 4


def test_saved_tensor_bytes_sees_the_quadratic_attention_matrix():
    def attend(x):
        return torch.softmax(x @ x.T, dim=-1)  # matmul saves x (twice, one storage); softmax its output

    for n in (16, 64):
        x = torch.randn(n, 8, requires_grad=True)
        assert saved_tensor_bytes(attend, x) == n * 8 * 4 + n * n * 4


def test_saved_tensor_bytes_without_grad_is_zero():
    assert saved_tensor_bytes(lambda t: t.exp(), torch.randn(5)) == 0


def test_attention_entropy_bounds():
    n = 50
    uniform = torch.full((3, n), 1.0 / n)
    assert torch.allclose(attention_entropy(uniform), torch.full((3,), math.log(n)))
    one_hot = torch.zeros(2, n)
    one_hot[:, 7] = 1.0
    assert torch.allclose(attention_entropy(one_hot), torch.zeros(2))
    two = torch.tensor([[0.5, 0.5, 0.0]])
    assert attention_entropy(two).item() == pytest.approx(math.log(2))
    # along another dimension
    assert attention_entropy(uniform.T, dim=0).shape == (3,)


def test_attention_entropy_rejects_non_distributions():
    with pytest.raises(ValueError, match="sum to 1"):
        attention_entropy(torch.full((2, 4), 0.5))
    with pytest.raises(ValueError, match="non-negative"):
        attention_entropy(torch.tensor([1.5, -0.5]))
    with pytest.raises(TypeError, match="floating"):
        attention_entropy(torch.tensor([1, 0]))


def test_attention_cost_vanilla_memory_grows_faster_than_deformable():
    sides = [4, 8]  # 16 and 64 pixels: four times more
    kw = dict(d_model=8, n_heads=2, n_points=2, repeats=1)
    vanilla = attention_cost("vanilla", sides, **kw)
    deform = attention_cost("deformable", sides, **kw)
    for res in (vanilla, deform):
        assert res["hw"] == [16, 64]
        assert len(res["seconds"]) == 2 and all(s > 0 for s in res["seconds"])
    # the attention matrices alone (M * HW^2 float32) grow 16-fold; the deformable layer stays linear
    assert vanilla["bytes"][1] - vanilla["bytes"][0] >= 2 * (64 ** 2 - 16 ** 2) * 4
    assert deform["bytes"][1] / deform["bytes"][0] < 4.5


def test_attention_cost_cross_attention_and_thread_setting_restored():
    before = torch.get_num_threads()
    res = attention_cost("deformable", [4], n_queries=3, d_model=8, n_heads=2, repeats=1, threads=1)
    assert res["hw"] == [16]
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="sparse", sides=[4]), "kind"),
    (dict(kind="vanilla", sides=[]), "sides"),
    (dict(kind="vanilla", sides=[4], n_queries=0), "n_queries"),
    (dict(kind="vanilla", sides=[4], threads=0), "threads"),
])
def test_attention_cost_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        attention_cost(**kwargs)
