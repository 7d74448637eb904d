"""The cost of attention: FLOP counters (paper, Sec. 3 and 4.1), exponent fits, attention entropy, and
one layer's measured time and memory as the feature map grows."""
from __future__ import annotations
from __future__ import annotations
import math
from typing import Dict, List, Optional, Sequence, Tuple
import numpy as np
import torch
from .timing import median_times
from .memory import saved_tensor_bytes


# --------------------------------------------------------------------------------------
# Cost counters (FLOPs = 2 x multiply-adds; memory in bytes)
# --------------------------------------------------------------------------------------
def attention_flops(n_q: int, n_k: int, d_model: int) -> int:
    """FLOPs of one multi-head attention layer: O(N_q C^2 + N_k C^2 + N_q N_k C).

    Projections of queries (U), keys (V), values (W') and the output (W), then the
    ``N_q x N_k`` score matrix and the weighted sum of values (both ``N_q N_k C`` multiply-adds
    summed over heads). Encoder self-attention has N_q = N_k = HW: O(H^2 W^2 C). Decoder
    cross-attention has N_q = N objects, N_k = HW: O(HW C^2 + N HW C).
    """
    C = d_model
    projections = 2 * (2 * n_q * C * C) + 2 * (2 * n_k * C * C)
    scores_and_mix = 2 * (2 * n_q * n_k * C)
    return projections + scores_and_mix


def deformable_attention_flops(n_q: int, n_v: int, d_model: int, n_heads: int = 8,
                               n_levels: int = 1, n_points: int = 4) -> int:
    """FLOPs of one (multi-scale) deformable attention layer.

    The paper's count is O(2 N_q C^2 + min(HW C^2, N_q P C^2)) (+5 N_q P C for sampling):
    the value projection over the N_v positions, the offset/weight predictions (3MLK channels)
    and output projection per query, and for each of the M*L*P samples a bilinear read
    (4 neighbours) and a weighted accumulate of D = C / M channels.
    """
    C, M, L, P = d_model, n_heads, n_levels, n_points
    value_proj = 2 * n_v * C * C
    predict = 2 * n_q * C * (3 * M * L * P)
    output_proj = 2 * n_q * C * C
    sampling = n_q * L * P * C * (2 * 4 + 2)  # 4 bilinear multiply-adds + 1 weighted add, per channel
    return value_proj + predict + output_proj + sampling


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

    ``kind="vanilla"``: :class:`~ddetr_minimal.models.attention.MultiHeadAttention`;
    ``kind="deformable"``: single-scale :class:`~ddetr_minimal.models.deformable_attention.MSDeformAttn`
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
    from ..models.attention import MultiHeadAttention
    from ..models.deformable_attention import MSDeformAttn

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
