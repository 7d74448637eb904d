"""Multi-scale deformable attention: the op, its input checks and its backends.  (split from msda.py; docstring to be written)"""
from __future__ import annotations
import torch


# --------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------
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


def check_inputs(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> None:
    """Validate the op's five tensors against each other; raise ``ValueError``/``TypeError``.

    Every message names the argument, the shape or value it got and what was expected.
    Nothing is broadcast silently.
    """
    V, SS, LSI = "(N, S, M, D)", "(L, 2)", "(L,)"
    LOC, AW = "(N, Lq, M, L, P, 2)", "(N, Lq, M, L, P)"
    _check_rank("value", value, 4, V)
    _check_rank("spatial_shapes", spatial_shapes, 2, SS)
    _check_rank("level_start_index", level_start_index, 1, LSI)
    _check_rank("sampling_locations", sampling_locations, 6, LOC)
    _check_rank("attention_weights", attention_weights, 5, AW)

    # dtypes: float data, integer shapes, one float dtype for all three float tensors
    for name, t in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if t.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must be an integer tensor (torch.int64), got dtype {t.dtype}")
    if not value.is_floating_point():
        raise TypeError(f"value must be a floating-point tensor, got dtype {value.dtype}")
    for name, t in (("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        if t.dtype != value.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but value has dtype {value.dtype}; "
                "all floating-point inputs must share one dtype"
            )
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

    Nq = sampling_locations.shape[1]
    _check_dim("sampling_locations", sampling_locations, 0, N, "batch N, from value", LOC)
    _check_dim("sampling_locations", sampling_locations, 2, M, "heads M, from value", LOC)
    _check_dim("sampling_locations", sampling_locations, 3, L, "levels L, from spatial_shapes", LOC)
    _check_dim("sampling_locations", sampling_locations, 5, 2, "(x, y)", LOC)
    P = sampling_locations.shape[4]
    expected_aw = (N, Nq, M, L, P)
    if tuple(attention_weights.shape) != expected_aw:
        raise ValueError(
            f"attention_weights has shape {shape_str(attention_weights)} {AW}, expected "
            f"{expected_aw} to match value {shape_str(value)} and sampling_locations "
            f"{shape_str(sampling_locations)}"
        )

    shapes = spatial_shapes.tolist()
    if any(h <= 0 or w <= 0 for h, w in shapes):
        raise ValueError(f"spatial_shapes must hold positive (H_l, W_l), got {shapes}")
    sizes = [h * w for h, w in shapes]
    if sum(sizes) != S:
        raise ValueError(
            f"value has S={S} positions (shape {shape_str(value)}), but spatial_shapes {shapes} "
            f"sum to sum(H*W)={sum(sizes)}; expected them to be equal"
        )
    starts = [0]
    for s in sizes[:-1]:
        starts.append(starts[-1] + s)
    given = level_start_index.tolist()
    if given != starts:
        raise ValueError(
            f"level_start_index is {given}, but spatial_shapes {shapes} give the level starts "
            f"{starts} (the exclusive cumulative sum of H*W)"
        )


def level_start_index_from_shapes(spatial_shapes: torch.Tensor) -> torch.Tensor:
    """Offsets of each level inside the flattened ``S`` axis: ``[0, H0*W0, H0*W0+H1*W1, ...]``."""
    sizes = spatial_shapes.prod(1)  # (L,)
    return torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))  # (L,)
