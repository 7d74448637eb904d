"""Detections: boxes with labels and scores, ground truth with its small objects marked, the matching
cost matrix, and the matched pairs."""
from __future__ import annotations

from typing import Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.patches import Rectangle

from ..ops.checks import shape_str
from .common import COLUMN_INCHES, MIN_FONT_PT, ArrayLike, _axes, _numpy


# --------------------------------------------------------------------------------------
# Boxes
# --------------------------------------------------------------------------------------
def _checked_boxes(ax, boxes: ArrayLike, layout: str = "") -> torch.Tensor:
    """``boxes`` as a float (n, 4) tensor, after checking that ``ax`` is an Axes."""
    if not isinstance(ax, Axes):
        raise TypeError(f"ax must be a matplotlib Axes, got {type(ax).__name__}")
    b = torch.as_tensor(_numpy(boxes), dtype=torch.float32)
    if b.numel() == 0:
        b = b.reshape(0, 4)  # (0, 4)
    if b.dim() != 2 or b.shape[-1] != 4:
        raise ValueError(f"boxes must have shape (n, 4){layout}, got {shape_str(b)}")
    return b


def draw_boxes(ax: Axes, boxes: ArrayLike, labels: Optional[Sequence] = None,
               scores: Optional[ArrayLike] = None, box_format: str = "xyxy",
               class_names: Optional[Sequence[str]] = None, color=None,
               title: Optional[str] = None) -> Axes:
    """Draw boxes (n, 4) in image pixels on ``ax``, with optional labels and scores.

    ``box_format`` is any format :func:`torchvision.ops.box_convert` accepts ("xyxy",
    "xywh", "cxcywh"). Labels are class indices (named through ``class_names``) or strings;
    one colour per class unless ``color`` is given.
    """
    from torchvision.ops import box_convert

    b = _checked_boxes(ax, boxes)
    n = b.shape[0]
    for name, seq in (("labels", labels), ("scores", scores)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{name} must have one entry per box ({n}), got {len(seq)}")
    xyxy = box_convert(b, in_fmt=box_format, out_fmt="xyxy").numpy()  # (n, 4)
    palette = plt.cm.tab10.colors
    for i, (x0, y0, x1, y1) in enumerate(xyxy):
        label = None if labels is None else labels[i]
        if isinstance(label, (torch.Tensor, np.integer)):
            label = int(label)
        c = color if color is not None else palette[(label if isinstance(label, int) else i) % len(palette)]
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=c, linewidth=2))
        text = []
        if label is not None:
            text.append(class_names[label] if class_names is not None and isinstance(label, int) else str(label))
        if scores is not None:
            text.append(f"{float(scores[i]):.2f}")
        if text:
            ax.text(x0, y0, " ".join(text), fontsize="small", color="white", va="bottom", clip_on=True,
                    bbox=dict(facecolor=c, alpha=0.8, pad=1, edgecolor="none"))
    if title is not None:
        ax.set_title(title)
    return ax


def draw_ground_truth(ax: Axes, boxes: ArrayLike, small_area: float = 32 ** 2) -> Axes:
    """Annotated objects, boxes (n, 4) pixel (x0, y0, x1, y1), as dashed outlines: white, and red
    with a "small" tag for the objects whose box area is under ``small_area`` (COCO's small
    bucket, < 32^2 pixels). Returns ``ax``."""
    b = _checked_boxes(ax, boxes, " as pixel (x0, y0, x1, y1)")
    for x0, y0, x1, y1 in b.tolist():
        small = (x1 - x0) * (y1 - y0) < small_area
        c = "red" if small else "white"
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=c, linewidth=1.6 if small else 1.2,
                               linestyle="--"))
        if small:
            ax.text(x0, y1 + 1, "small", color="white", fontsize=MIN_FONT_PT, va="top", clip_on=True,
                    bbox=dict(facecolor="red", alpha=0.8, pad=1, edgecolor="none"))
    return ax


# --------------------------------------------------------------------------------------
# Matching, result curves and bars
# --------------------------------------------------------------------------------------
def plot_cost_matrix(cost: ArrayLike, rows: Optional[ArrayLike] = None, cols: Optional[ArrayLike] = None,
                     ax: Optional[Axes] = None, title: str = "Matching cost",
                     row_labels: Optional[Sequence[str]] = None, col_labels: Optional[Sequence[str]] = None,
                     cmap: str = "viridis") -> Axes:
    """A (Lq, n) cost matrix as a heatmap with its value in every cell; the matched cells
    ``(rows[k], cols[k])`` (as returned by the matcher) are outlined in red."""
    c = _numpy(cost).astype(float)
    if c.ndim != 2:
        raise ValueError(f"cost must be a 2-d matrix (Lq, n), got shape {c.shape}")
    Lq, n = c.shape
    for name, labels, size in (("row_labels", row_labels, Lq), ("col_labels", col_labels, n)):
        if labels is not None and len(labels) != size:
            raise ValueError(f"{name} must have {size} entries to match cost {c.shape}, got {len(labels)}")
    r = [] if rows is None else [int(v) for v in _numpy(rows).reshape(-1)]
    k = [] if cols is None else [int(v) for v in _numpy(cols).reshape(-1)]
    if len(r) != len(k):
        raise ValueError(f"rows and cols must have the same length, got {len(r)} and {len(k)}")
    ax = _axes(ax, figsize=(min(COLUMN_INCHES, 0.9 * n + 2), 0.45 * Lq + 1.5))
    im = ax.imshow(c, cmap=cmap, aspect="auto")
    mid = (np.nanmax(c) + np.nanmin(c)) / 2
    for i in range(Lq):
        for j in range(n):
            ax.text(j, i, f"{c[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if c[i, j] < mid else "black")
    for i, j in zip(r, k):
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
    ax.set_xticks(range(n), col_labels if col_labels is not None else [str(j) for j in range(n)])
    ax.set_yticks(range(Lq), row_labels if row_labels is not None else [str(i) for i in range(Lq)])
    ax.set_xlabel("ground-truth object")
    ax.set_ylabel("prediction")
    ax.set_title(title)
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="cost")
    return ax


def plot_matching(ax: Axes, gt_boxes: ArrayLike, pred_boxes: ArrayLike, pred_idx: ArrayLike, gt_idx: ArrayLike,
                  box_format: str = "xyxy", gt_names: Optional[Sequence[str]] = None,
                  pred_names: Optional[Sequence[str]] = None, title: Optional[str] = None) -> Axes:
    """Objects as solid boxes, predictions as dashed ones, and a line from each matched
    prediction's centre to its object's. Boxes are (n, 4) in image pixels of ``box_format``;
    ``pred_idx[k]`` is matched to ``gt_idx[k]``. Draw the image on ``ax`` first."""
    from torchvision.ops import box_convert

    if not isinstance(ax, Axes):
        raise TypeError(f"ax must be a matplotlib Axes, got {type(ax).__name__}")
    gt = torch.as_tensor(_numpy(gt_boxes), dtype=torch.float32).reshape(-1, 4)
    pred = torch.as_tensor(_numpy(pred_boxes), dtype=torch.float32).reshape(-1, 4)
    pi = [int(v) for v in _numpy(pred_idx).reshape(-1)]
    gi = [int(v) for v in _numpy(gt_idx).reshape(-1)]
    if len(pi) != len(gi):
        raise ValueError(f"pred_idx and gt_idx must have the same length, got {len(pi)} and {len(gi)}")
    if any(not 0 <= i < len(pred) for i in pi) or any(not 0 <= j < len(gt) for j in gi):
        raise ValueError(f"indices out of range: pred_idx {pi} for {len(pred)} predictions, "
                         f"gt_idx {gi} for {len(gt)} objects")
    palette = plt.cm.tab10.colors
    gt_xyxy = box_convert(gt, box_format, "xyxy").numpy()  # (n, 4)
    pred_xyxy = box_convert(pred, box_format, "xyxy").numpy()  # (Lq, 4)
    partner = dict(zip(pi, gi))
    for j, (x0, y0, x1, y1) in enumerate(gt_xyxy):
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=palette[j % 10], linewidth=2.5))
        if gt_names is not None:
            ax.text(x0, y0 - 2, gt_names[j], color="white", fontsize="small", va="bottom", clip_on=True,
                    bbox=dict(facecolor=palette[j % 10], alpha=0.8, pad=1, edgecolor="none"))
    for i, (x0, y0, x1, y1) in enumerate(pred_xyxy):
        c = palette[partner[i] % 10] if i in partner else "dimgray"  # unmatched: dark enough to read on white
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=c, linewidth=1.5, linestyle="--"))
        if pred_names is not None:
            ax.text(x1, y1, pred_names[i], color=c, fontsize="small", ha="right", va="top", fontweight="bold",
                    bbox=dict(facecolor="white", alpha=0.7, pad=0.5, edgecolor="none"))
    for i, j in zip(pi, gi):
        p, g = pred_xyxy[i], gt_xyxy[j]
        ax.plot([(p[0] + p[2]) / 2, (g[0] + g[2]) / 2], [(p[1] + p[3]) / 2, (g[1] + g[3]) / 2], "-o",
                color=palette[j % 10], markersize=3, linewidth=1.5)
    ax.plot([], [], "-", color="gray", label="object (solid), matched prediction (dashed, same colour)")
    ax.plot([], [], "--", color="dimgray", label="unmatched prediction: no object")
    ax.legend(fontsize=MIN_FONT_PT + 1, loc="lower right", framealpha=0.8)
    ax.set_xlabel("x (image pixels)")
    ax.set_ylabel("y (image pixels)")
    if title is not None:
        ax.set_title(title)
    return ax
