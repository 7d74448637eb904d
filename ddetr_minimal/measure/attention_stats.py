"""How focused a trained detector's attention is, and how much of it falls on its object.

The seed notes explain DETR's slow convergence by its cross-attention: almost uniform over the
whole map at initialisation, sparse and on the objects by the end of training. Two numbers
measure that claim for one query matched to one ground-truth object:

* **normalised entropy** -- the entropy of the query's attention distribution divided by the
  log of the number of entries it spreads over (:func:`normalised_entropy`): 1 for uniform
  attention, 0 for all of it on one entry. DETR's decoder spreads over the ``H * W`` positions
  of the stride-32 map; Deformable DETR's over the ``L * P`` sampling points of a head;
* **mass in the box** -- the share of the attention inside the matched object's box. For
  DETR's map, each position counts with the fraction of its cell that lies in the box
  (:func:`map_mass_in_box`); for Deformable DETR, the attention weights of the sampling points
  that fall inside the box are summed (:func:`points_mass_in_box`). The box's share of the
  image (:func:`box_share`) is what uniform attention over the image would put there.

:func:`attention_statistics` computes both for every matched query of a batch of images, for
either model; :func:`over_checkpoints` does it for a list of trained checkpoints. Queries are
matched to objects with the training's Hungarian matcher, as the loss pairs them.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from torchvision.ops import box_convert

from ..ops.checks import check_positive_ints, shape_str
from .cost import attention_entropy

Tensor = torch.Tensor


# --------------------------------------------------------------------------------------
# The two measures
# --------------------------------------------------------------------------------------
def normalised_entropy(weights: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """Entropy of each distribution along the last dim of ``weights``, divided by ``log n``.

    ``n`` is the number of entries (``weights.shape[-1]``), or, with ``valid`` (a bool tensor
    broadcastable to ``weights``, True where an entry may hold attention, e.g. not padding), the
    number of valid entries of each distribution. Uniform weights give 1, one-hot weights 0.
    Returns ``weights.shape[:-1]``.
    """
    if not isinstance(weights, Tensor) or weights.dim() < 1:
        got = shape_str(weights) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(f"weights must be a tensor (..., n) of distributions along the last dim, got {got}")
    if valid is None:
        n = torch.full(weights.shape[:-1], float(weights.shape[-1]), dtype=weights.dtype, device=weights.device)
    else:
        if valid.dtype != torch.bool:
            raise ValueError(f"valid must be a bool tensor, got dtype {valid.dtype}")
        n = valid.expand_as(weights).sum(-1).to(weights.dtype)  # (...,)
        if (weights.masked_select(~valid.expand_as(weights)) > 1e-6).any():
            raise ValueError("weights put attention on entries that valid marks as invalid")
    if (n < 2).any():
        raise ValueError(f"every distribution needs at least 2 entries to normalise its entropy, got as few as "
                         f"{int(n.min().item())} (weights {shape_str(weights)})")
    return attention_entropy(weights, dim=-1) / n.log()


def _check_boxes(boxes: Tensor, name: str = "boxes") -> None:
    if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
        got = shape_str(boxes) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(f"{name} must be a tensor (B, 4) of normalised (x0, y0, x1, y1), got {got}")


def cell_box_overlap(boxes: Tensor, shape: Sequence[int]) -> Tensor:
    """The fraction of each cell of an ``H x W`` grid over the unit square that lies inside
    each box. ``boxes`` (B, 4) normalised (x0, y0, x1, y1). Returns (B, H*W), row by row."""
    _check_boxes(boxes)
    H, W = (int(v) for v in shape)
    if H <= 0 or W <= 0:
        raise ValueError(f"shape must be (H, W) with positive sides, got {tuple(shape)!r}")
    edges_x = torch.arange(W + 1, dtype=boxes.dtype, device=boxes.device) / W  # (W+1,)
    edges_y = torch.arange(H + 1, dtype=boxes.dtype, device=boxes.device) / H  # (H+1,)
    # the overlap of [a, b] with each cell [e_i, e_{i+1}], as a fraction of the cell's side
    ox = (torch.minimum(edges_x[None, 1:], boxes[:, 2:3]) - torch.maximum(edges_x[None, :-1], boxes[:, 0:1]))
    oy = (torch.minimum(edges_y[None, 1:], boxes[:, 3:4]) - torch.maximum(edges_y[None, :-1], boxes[:, 1:2]))
    ox = ox.clamp_min(0) * W  # (B, W)
    oy = oy.clamp_min(0) * H  # (B, H)
    return (oy[:, :, None] * ox[:, None, :]).reshape(len(boxes), H * W)  # (B, H*W)


def map_mass_in_box(weights: Tensor, boxes: Tensor, shape: Sequence[int]) -> Tensor:
    """Attention ``weights`` (B, ..., H*W) over the positions of an ``H x W`` map: the share
    inside each of the ``B`` boxes (B, 4) normalised (x0, y0, x1, y1), each position counted with
    the fraction of its cell inside the box. Returns (B, ...)."""
    _check_boxes(boxes)
    H, W = (int(v) for v in shape)
    if weights.dim() < 2 or weights.shape[0] != boxes.shape[0] or weights.shape[-1] != H * W:
        raise ValueError(f"weights must have shape ({boxes.shape[0]}, ..., {H * W}) for {boxes.shape[0]} boxes "
                         f"and an {H} x {W} map, got {shape_str(weights)}")
    overlap = cell_box_overlap(boxes.to(weights.dtype), (H, W))  # (B, H*W)
    overlap = overlap.view(len(boxes), *([1] * (weights.dim() - 2)), H * W)  # (B, 1..., H*W)
    return (weights * overlap).sum(-1)


def points_mass_in_box(locations: Tensor, weights: Tensor, boxes: Tensor) -> Tensor:
    """Sampling points ``locations`` (B, ..., K, 2) normalised (x, y) with attention ``weights``
    (B, ..., K): the summed weight of the points inside each of the ``B`` boxes (B, 4)
    normalised (x0, y0, x1, y1). Returns (B, ...); 1 when every point lies in its box."""
    _check_boxes(boxes)
    if (locations.dim() < 3 or locations.shape[-1] != 2 or tuple(locations.shape[:-1]) != tuple(weights.shape)
            or locations.shape[0] != boxes.shape[0]):
        raise ValueError(f"locations must be ({boxes.shape[0]}, ..., K, 2) and weights ({boxes.shape[0]}, ..., K) "
                         f"for {boxes.shape[0]} boxes, got {shape_str(locations)} and {shape_str(weights)}")
    b = boxes.view(len(boxes), *([1] * (locations.dim() - 2)), 4).to(locations.dtype)  # (B, 1..., 4)
    x, y = locations[..., 0], locations[..., 1]  # (B, ..., K) each
    inside = (x >= b[..., 0]) & (x <= b[..., 2]) & (y >= b[..., 1]) & (y <= b[..., 3])  # (B, ..., K)
    return (weights * inside).sum(-1)


def level_shares(weights: Tensor) -> Tensor:
    """Attention ``weights`` (..., M, L, P) of multi-scale deformable attention: the share each
    level gets, summed over its P points and averaged over the M heads. Returns (..., L)."""
    if not isinstance(weights, Tensor) or weights.dim() < 3:
        got = shape_str(weights) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(f"weights must be a tensor (..., M, L, P), got {got}")
    return weights.sum(-1).mean(-2)


def pixel_distance(a: Tensor, b: Tensor, image_hw: Sequence[int]) -> Tensor:
    """Distances in image pixels between normalised points ``a`` and ``b`` (..., 2) as (x, y),
    broadcast against each other, on an image of ``image_hw`` (h, w) pixels. Returns (...)."""
    if a.shape[-1] != 2 or b.shape[-1] != 2:
        raise ValueError(f"a and b must end in (x, y) pairs, got {shape_str(a)} and {shape_str(b)}")
    h, w = (float(v) for v in image_hw)
    return ((a - b) * torch.tensor([w, h], dtype=a.dtype, device=a.device)).norm(dim=-1)


def box_share(boxes: Tensor) -> Tensor:
    """The share of the unit square each box (B, 4) normalised (x0, y0, x1, y1) covers: the mass
    that attention spread uniformly over the image would put inside it. Returns (B,)."""
    _check_boxes(boxes)
    b = boxes.clamp(0, 1)
    return (b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)


# --------------------------------------------------------------------------------------
# Matched queries of a trained model
# --------------------------------------------------------------------------------------
def _targets_on_padded(targets, padded_hw) -> List[Tensor]:
    """Each target's boxes (n, 4) as normalised (x0, y0, x1, y1) of the padded batch."""
    H, W = padded_hw
    out = []
    for t in targets:
        h, w = (float(v) for v in t["size"])
        scale = torch.tensor([w / W, h / H, w / W, h / H])
        out.append(box_convert(t["boxes"].float(), "cxcywh", "xyxy") * scale)  # (n, 4)
    return out


def is_focal(model: nn.Module) -> bool:
    """Whether ``model`` scores classes with sigmoids (Deformable DETR, DETR+) or a softmax."""
    return bool(getattr(model, "focal", True))


def _stats_of_batch(model, images, mask, targets, matcher, layer):
    from ..models.detr import DETR
    from ..models.inference import decoder_sampling, detr_cross_attention

    detr = isinstance(model, DETR)
    seen = (detr_cross_attention if detr else decoder_sampling)(model, images, mask, layer)
    out = seen["outputs"]
    pairs = matcher({"pred_logits": out["pred_logits"], "pred_boxes": out["pred_boxes"]},
                    [{"labels": t["labels"], "boxes": t["boxes"]} for t in targets])
    boxes = _targets_on_padded(targets, images.shape[-2:])
    rows = {"entropy": [], "mass_in_box": [], "box_share": [], "area": []}
    for b, (q, g) in enumerate(pairs):
        if len(q) == 0:
            continue
        box = boxes[b][g]  # (n, 4) normalised xyxy on the padded batch
        if detr:
            w = seen["weights"][b][:, q].transpose(0, 1)  # (n, M, S)
            valid = ~seen["padding_mask"][b]  # (S,)
            rows["entropy"].append(normalised_entropy(w, valid).mean(-1))  # (n,)
            rows["mass_in_box"].append(map_mass_in_box(w, box, seen["spatial_shape"]).mean(-1))
        else:
            loc = seen["locations"][b, q].flatten(2, 3)  # (n, M, L*P, 2)
            w = seen["weights"][b, q].flatten(2)  # (n, M, L*P)
            rows["entropy"].append(normalised_entropy(w).mean(-1))
            rows["mass_in_box"].append(points_mass_in_box(loc, w, box).mean(-1))
            # the same points with equal weights: how much of the mass their places alone explain
            rows.setdefault("points_in_box", []).append(points_mass_in_box(loc, torch.full_like(w, 1 / w.shape[-1]),
                                                                           box).mean(-1))
            rows.setdefault("level_share", []).append(level_shares(seen["weights"][b, q]))  # (n, L)
        rows["box_share"].append(box_share(box))
        h, w_px = (float(v) for v in targets[b]["orig_size"])
        wh = targets[b]["boxes"][g][:, 2:].float() * torch.tensor([w_px, h])  # (n, 2) pixels of the original image
        rows["area"].append(wh.prod(-1))  # (n,)
    return rows


@torch.no_grad()
def attention_statistics(model: nn.Module, images: Tensor, mask: Tensor, targets: Sequence[dict],
                         layer: int = -1, batch_size: int = 50) -> Dict[str, Tensor]:
    """Normalised entropy and mass in the box of every query that the Hungarian matcher pairs
    with a ground-truth object, for decoder layer ``layer`` of a DETR (its cross-attention over
    the stride-32 map) or a Deformable DETR (its cross-attention's sampling points).

    ``images`` (N, 3, H, W), ``mask`` (N, H, W) and ``targets`` as the toy dataset and
    :func:`~ddetr_minimal.datasets.coco.collate_fn` give them. Returns one entry per matched
    query, each averaged over the heads: ``entropy``, ``mass_in_box``, ``box_share`` (uniform
    attention's mass in the same box) and ``area`` (the object's box area in pixels), all (Q,);
    for Deformable DETR also ``points_in_box`` (Q,), the share of its sampling points inside the box
    (the mass in the box with equal weights), and ``level_share`` (Q, L), the weight each level gets
    (:func:`level_shares`).
    """
    from ..models.matcher import HungarianMatcher

    if images.dim() != 4 or len(targets) != images.shape[0]:
        raise ValueError(f"images must be (N, 3, H, W) with one target each, got {shape_str(images)} and "
                         f"{len(targets)} targets")
    check_positive_ints(batch_size=batch_size)
    focal = is_focal(model)
    matcher = HungarianMatcher(2.0 if focal else 1.0, 5.0, 2.0, focal=focal)
    rows: Dict[str, list] = {"entropy": [], "mass_in_box": [], "box_share": [], "area": []}
    for i in range(0, images.shape[0], batch_size):
        part = _stats_of_batch(model, images[i:i + batch_size], mask[i:i + batch_size],
                               targets[i:i + batch_size], matcher, layer)
        for k in part:
            rows.setdefault(k, [])
            rows[k] += part[k]
    return {k: torch.cat(v) if v else torch.zeros(0) for k, v in rows.items()}


def summarize(stats: Dict[str, Tensor]) -> Dict[str, float]:
    """Means over the matched queries of :func:`attention_statistics`, and ``mass_over_uniform``:
    the mean mass in the box divided by the mean mass uniform attention would put there."""
    if stats["entropy"].numel() == 0:
        raise ValueError("stats hold no matched query (no image with objects?)")
    means = {k: float(v.float().mean()) for k, v in stats.items() if k not in ("area", "level_share")}
    means["mass_over_uniform"] = means["mass_in_box"] / means["box_share"]
    means["queries"] = int(stats["entropy"].numel())
    return means


def over_checkpoints(names: Sequence[str], images: Tensor, mask: Tensor, targets: Sequence[dict],
                     layer: int = -1, root=None, with_stats: bool = False) -> List[Dict[str, object]]:
    """:func:`summarize` of :func:`attention_statistics` for each trained checkpoint of ``names``
    (:func:`~ddetr_minimal.training.checkpoints.load_trained`), with its run, epoch and the
    fraction of its schedule (``epoch / of_epochs``); ``with_stats`` also keeps each one's
    per-query ``stats``."""
    from ..training.checkpoints import DEFAULT_DIR, load_trained

    rows = []
    for name in names:
        model, _, info = load_trained(name, DEFAULT_DIR if root is None else root)
        stats = attention_statistics(model, images, mask, targets, layer)
        epochs = info.get("of_epochs") or 0
        rows.append({"name": name, "group": info.get("group"), "epoch": info.get("epoch"), "of_epochs": epochs,
                     "fraction": info["epoch"] / epochs if epochs else math.nan, **summarize(stats),
                     **({"stats": stats} if with_stats else {})})
    return rows
