"""Timing: the median wall-clock or CPU time of a call, and of several calls measured in turn so that
a busy machine slows them alike."""
from __future__ import annotations
import math
import statistics
import time
from typing import Callable, List, Sequence, Tuple
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
