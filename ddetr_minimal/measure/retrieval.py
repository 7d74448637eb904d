"""Chapter 1's retrieval task: one attention layer must fetch the content at the pixel a query asks for.

Every pixel of a ``side x side`` map holds a random content vector; each pixel also has a fixed
random position code. A query carries only the position code of its target pixel and must return
that pixel's content (mean squared error). Two attention kinds learn it from the same batches:

* ``"vanilla"`` -- :class:`~ddetr_minimal.models.attention.MultiHeadAttention` (one head): keys are
  content plus position code, values the content; attention starts spread over all ``HW`` keys.
* ``"deformable"`` -- :class:`~ddetr_minimal.models.deformable_attention.MSDeformAttn` (one level,
  one head, ``n_points`` points) reading the content map. Its reference point is the target's
  pixel centre moved by a fixed ``displacement`` (pixels, the same for every query): a detector's
  reference point lands near its object, not on it. With the paper's initialisation the points sit
  1 .. P pixels to the right of the reference; a displacement within one pixel of one of them is
  within reach of the bilinear gradient, one farther away is not.

Both use the same data: a seeded generator draws the position codes and every batch, and the
layer is initialised under its own seed, so a run reproduces and leaves the global RNG alone.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import List, NamedTuple, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..models.attention import MultiHeadAttention
from ..models.deformable_attention import MSDeformAttn
from ..ops.checks import check_positive_ints
from ..ops.msda import ms_deform_attn
from .cost import attention_entropy

ATTENTION_KINDS = ("vanilla", "deformable")
# target = reference + DISPLACEMENT (pixels): half a pixel from the 2nd and 3rd initial points
DISPLACEMENT = (2.5, 0.5)


class RetrievalBatch(NamedTuple):
    """One batch of the task (N maps, Lq queries each, C channels)."""

    query: torch.Tensor  # (N, Lq, C): the position code of each query's target
    key: torch.Tensor  # (N, HW, C): (content + position code) / sqrt(2)
    value: torch.Tensor  # (N, HW, C): the content
    wanted: torch.Tensor  # (N, Lq, C): the content at each target
    target: torch.Tensor  # (N, Lq) int64: the target pixel, row-major
    reference: torch.Tensor  # (N, Lq, 1, 2): normalised (x, y) reference point, one level


@dataclass
class RetrievalRun:
    """One training run: the layer before and after, and a value per training step."""

    kind: str
    side: int
    displacement: Tuple[float, float]
    initial: nn.Module
    trained: nn.Module
    pos: torch.Tensor  # (HW, C)
    loss: List[float] = field(default_factory=list)
    entropy: List[float] = field(default_factory=list)  # vanilla only: mean entropy over HW keys


def _check_kind(kind) -> None:
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"kind must be one of {ATTENTION_KINDS}, got {kind!r}")


def _check_displacement(displacement) -> Tuple[float, float]:
    try:
        dx, dy = (float(v) for v in displacement)
    except (TypeError, ValueError):
        raise ValueError(f"displacement must be two numbers (dx, dy) in pixels, got {displacement!r}") from None
    if not (math.isfinite(dx) and math.isfinite(dy)):
        raise ValueError(f"displacement must be finite, got {displacement!r}")
    return dx, dy


def position_codes(side: int, d_model: int, generator: torch.Generator) -> torch.Tensor:
    """One fixed random code per pixel of a ``side x side`` map: (side*side, d_model)."""
    check_positive_ints(side=side, d_model=d_model)
    return torch.randn(side * side, d_model, generator=generator)  # (HW, C)


def retrieval_batch(pos: torch.Tensor, side: int, batch: int = 16, n_queries: int = 16,
                    displacement: Sequence[float] = DISPLACEMENT,
                    generator: torch.Generator | None = None) -> RetrievalBatch:
    """Random maps and queries that each ask for the content at one pixel.

    pos: (side*side, C) position codes. The reference point is each target's pixel centre minus
    ``displacement`` (dx, dy) in pixels, so the target sits at reference + displacement.
    """
    if not isinstance(pos, torch.Tensor) or pos.dim() != 2:
        raise ValueError(f"pos must be a (side*side, C) tensor, got {getattr(pos, 'shape', pos)!r}")
    check_positive_ints(side=side)
    if pos.shape[0] != side * side:
        raise ValueError(f"pos has {pos.shape[0]} rows, expected side*side = {side * side} for side={side}")
    check_positive_ints(batch=batch, n_queries=n_queries)
    dx, dy = _check_displacement(displacement)
    HW, C = pos.shape
    content = torch.randn(batch, HW, C, generator=generator)  # (N, HW, C)
    target = torch.randint(0, HW, (batch, n_queries), generator=generator)  # (N, Lq)
    query = pos[target]  # (N, Lq, C)
    key = (content + pos) / math.sqrt(2)  # (N, HW, C)
    wanted = torch.gather(content, 1, target[..., None].expand(-1, -1, C))  # (N, Lq, C)
    centre = torch.stack([target % side, target // side], -1).to(pos.dtype) + 0.5  # (N, Lq, 2) pixels
    shift = torch.tensor([dx, dy], dtype=pos.dtype)  # (2,)
    reference = ((centre - shift) / side)[:, :, None, :]  # (N, Lq, 1, 2) normalised (x, y)
    return RetrievalBatch(query, key, content, wanted, target, reference)


def _shapes(side: int) -> Tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([[side, side]]), torch.tensor([0])  # (L=1, 2), (L=1,)


def build_layer(kind: str, d_model: int = 32, n_points: int = 4) -> nn.Module:
    """The single-head attention layer of ``kind``."""
    _check_kind(kind)
    check_positive_ints(d_model=d_model, n_points=n_points)
    if kind == "vanilla":
        return MultiHeadAttention(d_model, n_heads=1)
    return MSDeformAttn(d_model, n_levels=1, n_heads=1, n_points=n_points, backend="torch")


def forward(layer: nn.Module, batch: RetrievalBatch, side: int) -> Tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's output (N, Lq, C), and for vanilla its attention (N, 1, Lq, HW), else None."""
    if isinstance(layer, MultiHeadAttention):
        return layer(batch.query, batch.key, batch.value)
    shapes, starts = _shapes(side)
    return layer(batch.query, batch.reference, batch.value, shapes, starts), None


def pixel_weights(layer: nn.Module, batch: RetrievalBatch, side: int) -> torch.Tensor:
    """How much weight each query puts on each pixel: (N, Lq, HW).

    Vanilla: its attention weights. Deformable: the attention weights of its points spread by
    bilinear interpolation, read by running the op on a one-hot value map (channel i is 1 at
    pixel i only); points outside the map read zeros, so a row may sum to less than one.
    """
    with torch.no_grad():
        if isinstance(layer, MultiHeadAttention):
            return forward(layer, batch, side)[1][:, 0]  # (N, Lq, HW)
        shapes, starts = _shapes(side)
        locations, weights = layer.sampling(batch.query, batch.reference, shapes)  # (N, Lq, 1, 1, P, 2)
        N, HW = batch.value.shape[:2]
        one_hot = torch.eye(HW).expand(N, HW, HW)[:, :, None, :]  # (N, HW, M=1, D=HW)
        return ms_deform_attn(one_hot, shapes, starts, locations, weights, backend="torch")  # (N, Lq, HW)


def train_retrieval(side: int, kind: str = "vanilla", steps: int = 300, d_model: int = 32,
                    lr: float = 1e-2, seed: int = 0, batch: int = 16, n_queries: int = 16,
                    displacement: Sequence[float] = DISPLACEMENT, n_points: int = 4) -> RetrievalRun:
    """Train one single-head layer of ``kind`` on the task with Adam; seeded and reproducible.

    ``seed`` fixes the position codes and the batches (the same for both kinds) and the layer's
    initialisation. ``displacement`` only matters for ``"deformable"``.
    """
    _check_kind(kind)
    check_positive_ints(side=side, steps=steps, d_model=d_model)
    if not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    displacement = _check_displacement(displacement)
    data = torch.Generator().manual_seed(seed)
    pos = position_codes(side, d_model, data)  # (HW, C)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer = build_layer(kind, d_model, n_points)
    run = RetrievalRun(kind, side, displacement, copy.deepcopy(layer), layer, pos)
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    for _ in range(steps):
        b = retrieval_batch(pos, side, batch, n_queries, displacement, generator=data)
        out, attn = forward(layer, b, side)
        loss = F.mse_loss(out, b.wanted)
        opt.zero_grad()
        loss.backward()
        opt.step()
        run.loss.append(loss.item())
        if attn is not None:
            run.entropy.append(attention_entropy(attn.detach()).mean().item())
    return run


def running_mean(values: Sequence[float], window: int) -> torch.Tensor:
    """Entry ``i`` is the mean of values ``i .. i + window - 1``: (len(values) - window + 1,)."""
    check_positive_ints(window=window)
    v = torch.as_tensor(list(values), dtype=torch.float64)  # (steps,)
    if v.numel() < window:
        return v[:0]
    return v.unfold(0, window, 1).mean(-1)  # (steps - window + 1,)


def steps_to_threshold(values: Sequence[float], threshold: float, window: int = 1) -> int:
    """The first step at which the mean of the last ``window`` values is below ``threshold``;
    ``len(values)`` when it never is."""
    if not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    mean = running_mean(values, window)  # entry i ends at step i + window - 1
    below = (mean < threshold).nonzero()
    return int(below[0]) + window - 1 if len(below) else len(values)
