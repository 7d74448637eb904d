"""Measuring what the chapters compare: time, memory, fitted exponents and attention entropy.

* :func:`median_time` -- seconds of one call (wall clock or CPU time), the median of a few
  repeats; :func:`median_times` measures several calls in turn.
* :func:`saved_tensor_bytes` -- bytes a forward pass keeps for its backward pass: the memory
  that training has to hold, measured on any device (no allocator statistics needed).
* :func:`fit_exponent` -- the ``p`` of ``y = c * x**p``, by least squares on ``log y``.
* :func:`attention_entropy` -- how spread out an attention distribution is, in nats.
* :func:`attention_cost` -- time and memory of one attention layer as the map grows, for
  vanilla multi-head attention and for single-scale deformable attention.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch


CLOCKS = ("wall", "cpu")


def _synchronize(args) -> None:
    if any(isinstance(a, torch.Tensor) and a.is_cuda for a in args):
        torch.cuda.synchronize()


def _check_timing_args(repeats, warmup, min_seconds, clock) -> Callable[[], float]:
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative integer, got {warmup!r}")
    if not isinstance(min_seconds, (int, float)) or not min_seconds >= 0:
        raise ValueError(f"min_seconds must be a non-negative number, got {min_seconds!r}")
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    return time.perf_counter if clock == "wall" else time.process_time


def _seconds_per_call(fn: Callable, args, number: int, now: Callable[[], float]) -> float:
    """Run ``fn(*args)`` ``number`` times back to back; return the seconds per call."""
    _synchronize(args)
    start = now()
    for _ in range(number):
        fn(*args)
    _synchronize(args)
    return (now() - start) / number


def _calls_per_measurement(fn: Callable, args, warmup: int, min_seconds: float,
                           now: Callable[[], float]) -> int:
    """Warm up, then find how many calls last at least ``min_seconds`` (like timeit's autorange)."""
    for _ in range(warmup):
        fn(*args)
    number = 1
    while number < 1_000_000:
        elapsed = _seconds_per_call(fn, args, number, now) * number
        if elapsed >= min_seconds:
            break
        number *= 2 if elapsed <= 0 else max(2, min(10, math.ceil(1.2 * min_seconds / elapsed)))
    return number


def median_time(fn: Callable, *args, repeats: int = 5, warmup: int = 1,
                min_seconds: float = 0.01, clock: str = "wall") -> float:
    """Median seconds of one ``fn(*args)`` call over ``repeats`` measurements.

    After ``warmup`` calls, each measurement times a batch of calls lasting at least
    ``min_seconds`` and divides by the batch size, so that very fast calls are not lost in
    clock and scheduler noise.

    ``clock="wall"`` reads :func:`time.perf_counter`; CUDA work is synchronised before the
    clock is read, so GPU timings are honest too. ``clock="cpu"`` reads
    :func:`time.process_time`, the CPU time of this process only: on a busy machine it does
    not count the time other programs hold the cores, so growth curves stay cleaner.
    """
    now = _check_timing_args(repeats, warmup, min_seconds, clock)
    number = _calls_per_measurement(fn, args, warmup, min_seconds, now)
    return statistics.median(_seconds_per_call(fn, args, number, now) for _ in range(repeats))


def median_times(calls: Sequence[Tuple[Callable, tuple]], repeats: int = 5, warmup: int = 1,
                 min_seconds: float = 0.01, clock: str = "wall") -> List[float]:
    """:func:`median_time` of several calls ``(fn, args)``, measured in turn within each repeat.

    Interleaving the calls spreads any burst of load from other programs over all of them
    instead of inflating one, which keeps the growth of a cost curve honest.
    """
    now = _check_timing_args(repeats, warmup, min_seconds, clock)
    numbers = [_calls_per_measurement(fn, args, warmup, min_seconds, now) for fn, args in calls]
    times: List[List[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for i, ((fn, args), number) in enumerate(zip(calls, numbers)):
            times[i].append(_seconds_per_call(fn, args, number, now))
    return [statistics.median(t) for t in times]


def saved_tensor_bytes(fn: Callable, *args) -> int:
    """Bytes of the distinct tensors autograd saves for the backward pass while ``fn(*args)`` runs.

    This is the activation memory training must keep per layer. Tensors that share storage are
    counted once. Run it with grad enabled and at least one input (or parameter) requiring grad.
    """
    storages: Dict[Tuple[str, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[(str(t.device), s.data_ptr())] = s.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return int(sum(storages.values()))


def fit_exponent(x: Sequence[float], y: Sequence[float]) -> Tuple[float, float]:
    """Fit ``y = c * x**p`` by least squares on ``log y = log c + p log x``; return ``(p, c)``.

    A slope of 2 on a log-log plot is quadratic growth, 1 is linear.
    """
    x_arr = np.asarray(x, dtype=float)
    y_arr = np.asarray(y, dtype=float)
    if x_arr.ndim != 1 or x_arr.shape != y_arr.shape:
        raise ValueError(
            f"x and y must be 1-D sequences of equal length, got shapes {x_arr.shape} and {y_arr.shape}"
        )
    if x_arr.size < 2:
        raise ValueError(f"fit_exponent needs at least 2 points, got {x_arr.size}")
    if (x_arr <= 0).any() or (y_arr <= 0).any():
        raise ValueError("x and y must be positive to fit a power law on a log-log scale, "
                         f"got min(x)={x_arr.min()} and min(y)={y_arr.min()}")
    if np.unique(x_arr).size < 2:
        raise ValueError(f"x must hold at least 2 distinct values, got {x_arr.tolist()}")
    p, log_c = np.polyfit(np.log(x_arr), np.log(y_arr), 1)
    return float(p), float(math.exp(log_c))


def attention_entropy(attn: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy (nats) of attention distributions along ``dim``: ``-sum a log a``.

    A uniform distribution over ``n`` keys has the maximum, ``log n``; attention on one key has 0.
    ``attn`` must be non-negative and sum to 1 along ``dim``.
    """
    if not isinstance(attn, torch.Tensor):
        raise TypeError(f"attn must be a torch.Tensor, got {type(attn).__name__}")
    if not attn.is_floating_point():
        raise TypeError(f"attn must be a floating-point tensor, got dtype {attn.dtype}")
    if (attn < 0).any():
        raise ValueError(f"attn must be non-negative, got a minimum of {attn.min().item():.3g}")
    sums = attn.sum(dim)
    if not torch.allclose(sums, torch.ones_like(sums), atol=1e-3):
        raise ValueError(
            f"attn must sum to 1 along dim={dim}, got sums between {sums.min().item():.4g} "
            f"and {sums.max().item():.4g}"
        )
    return -(attn * attn.clamp_min(1e-30).log()).sum(dim)


# --------------------------------------------------------------------------------------
# The cost of one attention layer as the feature map grows
# --------------------------------------------------------------------------------------
ATTENTION_KINDS = ("vanilla", "deformable")


def grid_reference_points(H: int, W: int) -> torch.Tensor:
    """Normalised (x, y) pixel centres of an H x W map, row by row: (H*W, 2)."""
    ys, xs = torch.meshgrid((torch.arange(H) + 0.5) / H, (torch.arange(W) + 0.5) / W, indexing="ij")
    return torch.stack([xs, ys], -1).reshape(H * W, 2)  # (H*W, 2)


def attention_cost(kind: str, sides: Sequence[int], n_queries: Optional[int] = None,
                   d_model: int = 32, n_heads: int = 4, n_points: int = 4, repeats: int = 5,
                   seed: int = 0, threads: Optional[int] = 1) -> Dict[str, List[float]]:
    """Time and memory of one attention layer over square ``side x side`` feature maps.

    ``kind="vanilla"``: :class:`~ddetr_minimal.attention.MultiHeadAttention`;
    ``kind="deformable"``: single-scale :class:`~ddetr_minimal.deformable_attention.MSDeformAttn`
    (torch backend). ``n_queries=None`` is encoder self-attention (one query per pixel,
    ``N_q = HW``); an integer is decoder cross-attention with that many object queries.

    Returns ``{"hw": [...], "seconds": [...], "bytes": [...]}``: the number of pixels, the median
    forward time (no grad; CPU time of this process, each call measured in turn with the
    others, see :func:`median_times`) and the bytes saved for backward (:func:`saved_tensor_bytes`).

    ``threads`` sets PyTorch's CPU threads during the measurement (restored afterwards); the
    default of one thread makes the growth reflect the arithmetic rather than how busy the other
    cores are. ``None`` leaves the setting alone (CPU time then adds up over the threads).
    """
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"kind must be one of {ATTENTION_KINDS}, got {kind!r}")
    if len(sides) == 0 or any(not isinstance(s, int) or s <= 0 for s in sides):
        raise ValueError(f"sides must be a non-empty sequence of positive integers, got {list(sides)!r}")
    if n_queries is not None and (not isinstance(n_queries, int) or n_queries <= 0):
        raise ValueError(f"n_queries must be None (self-attention) or a positive integer, got {n_queries!r}")
    if threads is not None and (not isinstance(threads, int) or threads <= 0):
        raise ValueError(f"threads must be None or a positive integer, got {threads!r}")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _attention_cost(kind, sides, n_queries, d_model, n_heads, n_points, repeats, seed)
    finally:
        torch.set_num_threads(previous_threads)


def _attention_cost(kind, sides, n_queries, d_model, n_heads, n_points, repeats, seed):
    from .attention import MultiHeadAttention
    from .deformable_attention import MSDeformAttn

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if kind == "vanilla":
        layer = MultiHeadAttention(d_model, n_heads)
    else:
        layer = MSDeformAttn(d_model, n_levels=1, n_heads=n_heads, n_points=n_points, backend="torch")
    result: Dict[str, List[float]] = {"hw": [], "seconds": [], "bytes": []}
    calls = []
    for side in sides:
        HW = side * side
        x = torch.randn(1, HW, d_model, generator=g)  # (1, HW, C) the flattened feature map
        Lq = HW if n_queries is None else n_queries
        query = x if n_queries is None else torch.randn(1, Lq, d_model, generator=g)  # (1, Lq, C)
        if kind == "vanilla":
            args = (query, x, x)
        else:
            shapes = torch.tensor([[side, side]])  # (1, 2)
            start = torch.zeros(1, dtype=torch.long)  # (1,)
            if n_queries is None:
                ref = grid_reference_points(side, side)  # (HW, 2) every pixel is a query
            else:
                ref = torch.rand(Lq, 2, generator=g)  # (Lq, 2)
            ref = ref.view(1, Lq, 1, 2)  # (1, Lq, L=1, 2)
            args = (query, ref, x, shapes, start)
        calls.append((layer, args))
        result["hw"].append(HW)
        result["bytes"].append(saved_tensor_bytes(layer, *args))
    with torch.no_grad():
        result["seconds"] = median_times(calls, repeats=repeats, min_seconds=0.05, clock="cpu")
    return result
