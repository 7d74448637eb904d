"""Input checks of the op: shapes, dtypes and devices against each other, then the level table.

Two kinds of check, with different costs:

* :func:`check_inputs` looks only at tensor metadata (rank, sizes, dtype, device). It costs
  no device round trip and ``torch.compile`` traces it without a graph break.
* :func:`level_table` reads the *values* of ``spatial_shapes`` and ``level_start_index``
  (positive sizes, ``sum(H_l * W_l) == S``, starts that are the cumulative sum). On a CUDA
  tensor reading values is a blocking GPU-to-CPU copy, so the answer is cached per tensor
  object and version: the model builds its level table once per forward and hands the same
  two tensors to every layer, so the copy happens once per forward, not once per call.

Notation as in :mod:`ddetr_minimal.ops.msda`.
"""
from __future__ import annotations

import threading
import weakref
from typing import Dict, List, NamedTuple, Tuple

import torch

# value dtypes whose locations and weights may be float32 (see msda.sampling_dtype)
SIXTEEN_BIT = (torch.float16, torch.bfloat16)


def shape_str(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _check_rank(name: str, t, rank: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(
            f"{name} must have {rank} dimensions {layout}, got {t.dim()} with shape {shape_str(t)}"
        )


def _check_dim(name: str, t: torch.Tensor, dim: int, expected: int, what: str, layout: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(
            f"{name} has shape {shape_str(t)} {layout}, but its dimension {dim} ({what}) is "
            f"{t.shape[dim]}; expected {expected}"
        )


def _check_dtypes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> None:
    for name, t in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if t.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must be an integer tensor (torch.int64), got dtype {t.dtype}")
    if not value.is_floating_point():
        raise TypeError(f"value must be a floating-point tensor, got dtype {value.dtype}")
    # locations and weights share value's dtype, or are float32 under 16-bit values
    allowed = (value.dtype, torch.float32) if value.dtype in SIXTEEN_BIT else (value.dtype,)
    expected = " or ".join(str(d) for d in allowed)
    for name, t in (("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        if t.dtype not in allowed:
            raise TypeError(
                f"{name} has dtype {t.dtype} but value has dtype {value.dtype}; expected {expected} "
                "(locations and weights share value's dtype, or are float32 when value is 16-bit)"
            )
    if attention_weights.dtype != sampling_locations.dtype:
        raise TypeError(
            f"attention_weights has dtype {attention_weights.dtype} but sampling_locations has dtype "
            f"{sampling_locations.dtype}; expected one dtype for both"
        )


def check_inputs(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> None:
    """Validate the op's five tensors' metadata against each other; raise ``ValueError``/``TypeError``.

    Every message names the argument, the shape or dtype it got and what was expected.
    Nothing is broadcast silently. Reads no tensor values (see :func:`level_table`).
    """
    V, SS, LSI = "(N, S, M, D)", "(L, 2)", "(L,)"
    LOC, AW = "(N, Lq, M, L, P, 2)", "(N, Lq, M, L, P)"
    _check_rank("value", value, 4, V)
    _check_rank("spatial_shapes", spatial_shapes, 2, SS)
    _check_rank("level_start_index", level_start_index, 1, LSI)
    _check_rank("sampling_locations", sampling_locations, 6, LOC)
    _check_rank("attention_weights", attention_weights, 5, AW)
    _check_dtypes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    for name, t in (
        ("spatial_shapes", spatial_shapes),
        ("level_start_index", level_start_index),
        ("sampling_locations", sampling_locations),
        ("attention_weights", attention_weights),
    ):
        if t.device != value.device:
            raise ValueError(
                f"{name} is on device {t.device} but value is on device {value.device}; "
                "all inputs must be on one device"
            )

    N, S, M, D = value.shape
    L = spatial_shapes.shape[0]
    if spatial_shapes.shape[1] != 2:
        raise ValueError(
            f"spatial_shapes must have shape (L, 2) holding (H_l, W_l), got {shape_str(spatial_shapes)}"
        )
    if L == 0:
        raise ValueError("spatial_shapes must describe at least one level, got shape (0, 2)")
    _check_dim("level_start_index", level_start_index, 0, L, "levels L", LSI)

    Lq = sampling_locations.shape[1]
    _check_dim("sampling_locations", sampling_locations, 0, N, "batch N, from value", LOC)
    _check_dim("sampling_locations", sampling_locations, 2, M, "heads M, from value", LOC)
    _check_dim("sampling_locations", sampling_locations, 3, L, "levels L, from spatial_shapes", LOC)
    _check_dim("sampling_locations", sampling_locations, 5, 2, "(x, y)", LOC)
    P = sampling_locations.shape[4]
    expected_aw = (N, Lq, M, L, P)
    if tuple(attention_weights.shape) != expected_aw:
        raise ValueError(
            f"attention_weights has shape {shape_str(attention_weights)} {AW}, expected "
            f"{expected_aw} to match value {shape_str(value)} and sampling_locations "
            f"{shape_str(sampling_locations)}"
        )


# --------------------------------------------------------------------------------------
# The level table: values of spatial_shapes and level_start_index, read once per tensor
# --------------------------------------------------------------------------------------
class LevelTable(NamedTuple):
    """The levels as Python ints, and as CPU tensors for code that wants tensors."""

    shapes: Tuple[Tuple[int, int], ...]  # (H_l, W_l) per level
    starts: Tuple[int, ...]  # offset of level l inside S
    cpu_shapes: torch.Tensor  # (L, 2) int64 on the CPU
    cpu_starts: torch.Tensor  # (L,) int64 on the CPU

    @property
    def S(self) -> int:
        return sum(h * w for h, w in self.shapes)


_TABLES: Dict[Tuple[int, int], tuple] = {}  # (id, id) -> (weakref, weakref, versions, table)
_TABLES_LOCK = threading.Lock()


def _read_table(spatial_shapes: torch.Tensor, level_start_index: torch.Tensor) -> LevelTable:
    L = spatial_shapes.shape[0]
    both = torch.cat((spatial_shapes.detach().reshape(-1).long(), level_start_index.detach().long()))  # (3L,)
    both = both.to("cpu", copy=True)  # one device-to-host copy for both; a copy, so no input is kept alive
    cpu_shapes, cpu_starts = both[: 2 * L].view(L, 2), both[2 * L:]  # (L, 2), (L,)
    shapes: List[List[int]] = cpu_shapes.tolist()
    if any(h <= 0 or w <= 0 for h, w in shapes):
        raise ValueError(f"spatial_shapes must hold positive (H_l, W_l), got {shapes}")
    sizes = [h * w for h, w in shapes]
    starts = [0]
    for s in sizes[:-1]:
        starts.append(starts[-1] + s)
    given = cpu_starts.tolist()
    if given != starts:
        raise ValueError(
            f"level_start_index is {given}, but spatial_shapes {shapes} give the level starts "
            f"{starts} (the exclusive cumulative sum of H*W)"
        )
    return LevelTable(tuple((h, w) for h, w in shapes), tuple(starts), cpu_shapes, cpu_starts)


def _version(t: torch.Tensor) -> int:
    """The version counter (bumped by in-place edits). Tensors made under ``torch.inference_mode``
    have none; they cannot be edited outside it, so their table is cached by identity alone."""
    return -1 if t.is_inference() else t._version


def level_table(spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, S: int) -> LevelTable:
    """Check the values of the level table against each other and against ``S``; return them.

    Cached per (tensor object, version counter): an in-place edit of either tensor bumps its
    version and is read again; a new tensor with the same values is read once more. Raises
    ``ValueError`` naming the argument, the values given and the values expected.
    """
    key = (id(spatial_shapes), id(level_start_index))
    versions = (_version(spatial_shapes), _version(level_start_index))
    with _TABLES_LOCK:
        hit = _TABLES.get(key)
    if hit is not None and hit[0]() is spatial_shapes and hit[1]() is level_start_index and hit[2] == versions:
        table = hit[3]
    else:
        table = _read_table(spatial_shapes, level_start_index)
        with _TABLES_LOCK:
            for k in [k for k, v in _TABLES.items() if v[0]() is None or v[1]() is None]:
                del _TABLES[k]  # forget tables of tensors that are gone
            _TABLES[key] = (weakref.ref(spatial_shapes), weakref.ref(level_start_index), versions, table)
    if table.S != S:
        shapes = [list(s) for s in table.shapes]
        raise ValueError(
            f"value has S={S} positions (dimension 1 of value), but spatial_shapes {shapes} "
            f"sum to sum(H*W)={table.S}; expected them to be equal"
        )
    return table


def level_start_index_from_shapes(spatial_shapes: torch.Tensor) -> torch.Tensor:
    """Offsets of each level inside the flattened ``S`` axis: ``[0, H0*W0, H0*W0+H1*W1, ...]``."""
    sizes = spatial_shapes.prod(1)  # (L,)
    return torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))  # (L,)


def check_positive_ints(**named) -> None:
    """Raise a ValueError naming the first argument that is not a positive integer (a bool is not one)."""
    for name, v in named.items():
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
