"""Where deformable attention looks: one bilinear sample, and a query's sampling points on an image,
all levels on one image or one panel per level, and the paper's appendix figure (queries by levels)."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ..ops.checks import check_positive_ints, shape_str
from ..ops.reference import bilinear_sample
from .common import COLUMN_INCHES, MIN_FONT_PT, _axes, _image_hwc, _numpy


# --------------------------------------------------------------------------------------
# One bilinear sample
# --------------------------------------------------------------------------------------
def bilinear_weight_map(loc_xy: Tuple[float, float], H: int, W: int) -> torch.Tensor:
    """The weight each pixel of an ``H x W`` map gets when the op samples the normalised point.

    Computed with the package's own sampler (:func:`ddetr_minimal.ops.reference.bilinear_sample`) on a
    one-hot value map: channel ``i`` is 1 at pixel ``i`` only, so the sampled channel ``i``
    is pixel ``i``'s bilinear weight. Returns (H, W); at most four entries are non-zero.
    """
    if len(loc_xy) != 2:
        raise ValueError(f"loc_xy must be a normalised point (x, y), got {loc_xy!r}")
    check_positive_ints(H=H, W=W)
    one_hot = torch.eye(H * W, dtype=torch.float64).view(1, H * W, 1, H * W)  # (N=1, HW, M=1, D=HW)
    loc = torch.tensor(loc_xy, dtype=torch.float64).view(1, 1, 1, 2)  # (N=1, Lq=1, M=1, 2)
    return bilinear_sample(one_hot, H, W, loc).view(H, W)  # (H, W)


def plot_bilinear_neighbours(loc_xy: Tuple[float, float], H: int, W: int,
                             ax: Optional[Axes] = None,
                             title: str = "Bilinear interpolation of one sample") -> Axes:
    """Draw the pixel grid, one sampling point and its four neighbours with their weights.

    Each neighbour's weight is the area of the rectangle opposite to it (shaded in its
    colour): the closer the point, the larger the opposite rectangle.
    """
    ax = _axes(ax, figsize=(5, 5))
    weights = bilinear_weight_map(loc_xy, H, W).numpy()  # (H, W)
    x = loc_xy[0] * W - 0.5  # continuous pixel coordinates (centres at integers)
    y = loc_xy[1] * H - 0.5
    for i in range(W + 1):
        ax.axvline(i - 0.5, color="lightgray", linewidth=0.8)
    for j in range(H + 1):
        ax.axhline(j - 0.5, color="lightgray", linewidth=0.8)
    gx, gy = np.meshgrid(np.arange(W), np.arange(H))
    ax.plot(gx.ravel(), gy.ravel(), ".", color="gray", markersize=4, label="pixel centres")
    x0, y0 = int(np.floor(x)), int(np.floor(y))
    colors = plt.cm.tab10(np.arange(4))
    for c, (dy, dx) in zip(colors, ((0, 0), (0, 1), (1, 0), (1, 1))):
        xi, yi = x0 + dx, y0 + dy
        inside = 0 <= xi < W and 0 <= yi < H
        w = weights[yi, xi] if inside else 0.0
        # the rectangle between the point and the opposite neighbour has area = this weight
        ox, oy = x0 + 1 - dx, y0 + 1 - dy
        ax.add_patch(Rectangle((min(x, ox), min(y, oy)), abs(ox - x), abs(oy - y), color=c, alpha=0.25))
        ax.plot([xi], [yi], "o", color=c, markersize=10)
        ax.annotate(f"w={w:.2f}" + ("" if inside else " (outside: 0)"), (xi, yi),
                    textcoords="offset points", xytext=(6, -14 if dy else 8), color=c, fontsize="small",
                    fontweight="bold")
    ax.plot([x], [y], "*", color="black", markersize=14, label=f"sample ({x:.2f}, {y:.2f})")
    ax.set_xlim(max(-0.5, x0 - 1.5), min(W - 0.5, x0 + 2.5))
    ax.set_ylim(min(H - 0.5, y0 + 2.5), max(-0.5, y0 - 1.5))
    ax.set_aspect("equal")
    ax.set_title(title)
    ax.set_xlabel("x (feature-map pixels)")
    ax.set_ylabel("y (feature-map pixels)")
    ax.legend(loc="lower left", fontsize="small")
    return ax


# --------------------------------------------------------------------------------------
# Sampling points
# --------------------------------------------------------------------------------------
def _check_locations(locations: torch.Tensor, weights: Optional[torch.Tensor]) -> None:
    if not isinstance(locations, torch.Tensor) or locations.dim() != 5 or locations.shape[-1] != 2:
        got = shape_str(locations) if isinstance(locations, torch.Tensor) else type(locations).__name__
        raise ValueError(f"locations must be a tensor of shape (Lq, M, L, P, 2), got {got}")
    if weights is not None and tuple(weights.shape) != tuple(locations.shape[:-1]):
        raise ValueError(
            f"weights must have shape {tuple(locations.shape[:-1])} (Lq, M, L, P) to match locations "
            f"{shape_str(locations)}, got {shape_str(weights)}"
        )


def plot_sampling_points(image, locations: torch.Tensor, weights: Optional[torch.Tensor] = None,
                         reference_points: Optional[torch.Tensor] = None, level: Optional[int] = None,
                         heads: Optional[Sequence[int]] = None, ax: Optional[Axes] = None,
                         title: str = "Sampling points") -> Axes:
    """Sampling points of some queries on an image, one colour per head.

    ``locations`` (Lq, M, L, P, 2) normalised (x, y), as returned by
    :meth:`MSDeformAttn.sampling` for one image; ``weights`` (Lq, M, L, P) scale the markers
    (area proportional to the weight); ``reference_points`` (Lq, 2) are drawn as crosses.
    ``level=None`` draws the points of every level, an integer only that level's.
    """
    _check_locations(locations, weights)
    ax = _axes(ax, figsize=(COLUMN_INCHES, COLUMN_INCHES))
    img = _image_hwc(image)
    Hi, Wi = img.shape[:2]
    ax.imshow(img, extent=(0, Wi, Hi, 0))
    Lq, M, L, P, _ = locations.shape
    heads = list(range(M)) if heads is None else list(heads)
    if any(not 0 <= m < M for m in heads):
        raise ValueError(f"heads must index the {M} heads of locations, got {heads}")
    levels = list(range(L)) if level is None else [level]
    if any(not 0 <= l < L for l in levels):
        raise ValueError(f"level must be in [0, {L}), got {level}")
    loc = _numpy(locations)
    w = None if weights is None else _numpy(weights)
    colors = plt.cm.hsv(np.linspace(0, 1, M, endpoint=False))
    for m in heads:
        pts = loc[:, m][:, levels].reshape(-1, 2)  # (Lq*L'*P, 2)
        size = 30.0 if w is None else 30.0 * len(levels) * P * w[:, m][:, levels].reshape(-1)  # (Lq*L'*P,)
        ax.scatter(pts[:, 0] * Wi, pts[:, 1] * Hi, s=size, color=colors[m], edgecolors="black",
                   linewidths=0.5, label=f"head {m}", zorder=3)
    if reference_points is not None:
        ref = _numpy(reference_points).reshape(-1, 2)  # (Lq, 2)
        ax.scatter(ref[:, 0] * Wi, ref[:, 1] * Hi, marker="P", s=120, color="white", edgecolors="black",
                   label="reference point", zorder=4)
    ax.set_xlim(0, Wi)
    ax.set_ylim(Hi, 0)
    ax.set_title(title)
    ax.set_xlabel("x (image pixels)")
    ax.set_ylabel("y (image pixels)")
    ax.legend(fontsize=MIN_FONT_PT, loc="upper right", ncol=2, framealpha=0.8)
    return ax


def plot_sampling_levels(image, locations: torch.Tensor, spatial_shapes: torch.Tensor,
                         weights: Optional[torch.Tensor] = None,
                         reference_points: Optional[torch.Tensor] = None, query: int = 0,
                         title: str = "Sampling points per level") -> Figure:
    """One panel per feature level: the image at that level's resolution, its pixel grid and
    the sampling points of one query (all heads) on that level. ``reference_points`` is
    (Lq, 2) or (Lq, L, 2), normalised (x, y).

    The same normalised offsets mean more image pixels on a coarser level: this is how a
    handful of points per level covers both fine detail and wide context.
    """
    _check_locations(locations, weights)
    Lq, M, L, P, _ = locations.shape
    if tuple(spatial_shapes.shape) != (L, 2):
        raise ValueError(f"spatial_shapes must have shape ({L}, 2) for L={L} levels, got {shape_str(spatial_shapes)}")
    if not 0 <= query < Lq:
        raise ValueError(f"query must be in [0, {Lq}), got {query}")
    img = torch.as_tensor(_image_hwc(image)).float()
    if img.dim() == 2:
        img = img[..., None].expand(-1, -1, 3)  # (H, W, 3)
    img = img[..., :3].permute(2, 0, 1)[None]  # (1, 3, H, W)
    Hi, Wi = img.shape[-2:]
    cols = 2 if L > 1 else 1  # a 2 x 2 grid for four levels: each panel large enough to read
    rows = -(-L // cols)
    fig, grid = plt.subplots(rows, cols, figsize=(COLUMN_INCHES, 3.3 * rows + 0.5), squeeze=False)
    axes = grid.reshape(1, -1)[:, :L]
    for spare in grid.reshape(-1)[L:]:
        spare.remove()
    colors = plt.cm.hsv(np.linspace(0, 1, M, endpoint=False))
    loc = _numpy(locations[query])  # (M, L, P, 2)
    w = None if weights is None else _numpy(weights[query])  # (M, L, P)
    for l, ax in enumerate(axes[0]):
        Hl, Wl = (int(v) for v in spatial_shapes[l])
        small = torch.nn.functional.adaptive_avg_pool2d(img, (Hl, Wl))[0].permute(1, 2, 0)  # (Hl, Wl, 3)
        ax.imshow(small.numpy(), extent=(0, Wi, Hi, 0), interpolation="nearest")
        for i in range(1, Wl):
            ax.axvline(i * Wi / Wl, color="white", linewidth=0.3, alpha=0.5)
        for j in range(1, Hl):
            ax.axhline(j * Hi / Hl, color="white", linewidth=0.3, alpha=0.5)
        for m in range(M):
            size = 30.0 if w is None else 30.0 * L * P * w[m, l]
            ax.scatter(loc[m, l, :, 0] * Wi, loc[m, l, :, 1] * Hi, s=size, color=colors[m],
                       edgecolors="black", linewidths=0.5, zorder=3, label=f"head {m}")
        if reference_points is not None:
            ref_all = _numpy(reference_points).reshape(Lq, -1, 2)  # (Lq, 1 or L, 2)
            ref = ref_all[query, l if ref_all.shape[1] > 1 else 0]  # (2,)
            ax.scatter([ref[0] * Wi], [ref[1] * Hi], marker="P", s=120, color="white", edgecolors="black",
                       zorder=4, label="reference point")
        ax.set_xlim(0, Wi)
        ax.set_ylim(Hi, 0)
        ax.set_title(f"level {l}: {Hl} x {Wl} pixels")
        ax.set_xlabel("x (image pixels)")
        ax.set_ylabel("y (image pixels)")
    axes[0, -1].legend(fontsize=MIN_FONT_PT, loc="upper right", framealpha=0.8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_sampling_grid(image, locations: torch.Tensor, weights: torch.Tensor, spatial_shapes: torch.Tensor,
                       reference_points: Optional[torch.Tensor] = None, boxes: Optional[torch.Tensor] = None,
                       row_labels: Optional[Sequence[str]] = None, title: str = "") -> Figure:
    """The appendix figure of the paper at any scale: one row per query, one column per level,
    each panel the image with that level's sampling points of every head, coloured by their
    attention weight (one colour scale for the figure, shown as a colour bar).

    ``locations`` (Q, M, L, P, 2) normalised (x, y) and ``weights`` (Q, M, L, P) of ``Q``
    queries; ``reference_points`` (Q, 2) or (Q, L, 2) normalised, drawn as green crosses;
    ``boxes`` (Q, 4) image-pixel (x0, y0, x1, y1), drawn around each row (a detection or an
    object); ``spatial_shapes`` (L, 2) names each column's map size.
    """
    _check_locations(locations, weights)
    Q, M, L, P, _ = locations.shape
    if tuple(spatial_shapes.shape) != (L, 2):
        raise ValueError(f"spatial_shapes must have shape ({L}, 2) for L={L} levels, got {shape_str(spatial_shapes)}")
    if row_labels is not None and len(row_labels) != Q:
        raise ValueError(f"row_labels must have one entry per query ({Q}), got {len(row_labels)}")
    if boxes is not None and tuple(boxes.shape) != (Q, 4):
        raise ValueError(f"boxes must have shape ({Q}, 4) as pixel (x0, y0, x1, y1), got {shape_str(boxes)}")
    img = _image_hwc(image)
    Hi, Wi = img.shape[:2]
    loc, w = _numpy(locations), _numpy(weights)
    ref = None if reference_points is None else _numpy(reference_points).reshape(Q, -1, 2)  # (Q, 1 or L, 2)
    side = (COLUMN_INCHES - 0.7) / L
    fig, axes = plt.subplots(Q, L, figsize=(COLUMN_INCHES, side * Q + 0.8), squeeze=False)
    norm = plt.Normalize(0.0, float(w.max()))
    for q in range(Q):
        for l in range(L):
            ax = axes[q, l]
            ax.imshow(img, extent=(0, Wi, Hi, 0))
            pts = loc[q, :, l].reshape(-1, 2)  # (M*P, 2)
            order = np.argsort(w[q, :, l].reshape(-1))  # heaviest points drawn last, on top
            ax.scatter(pts[order, 0] * Wi, pts[order, 1] * Hi, c=w[q, :, l].reshape(-1)[order], cmap="plasma",
                       norm=norm, s=16, edgecolors="white", linewidths=0.4, zorder=3)
            if ref is not None:
                r = ref[q, l if ref.shape[1] > 1 else 0]  # (2,)
                ax.scatter([r[0] * Wi], [r[1] * Hi], marker="+", s=90, color="lime", linewidths=2, zorder=4)
            if boxes is not None:
                x0, y0, x1, y1 = (float(v) for v in _numpy(boxes)[q])
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="lime", linewidth=1.2))
            ax.set_xlim(0, Wi)
            ax.set_ylim(Hi, 0)
            ax.set_xticks([])
            ax.set_yticks([])
            if q == 0:
                Hl, Wl = (int(v) for v in spatial_shapes[l])
                ax.set_title(f"level {l} ({Hl} x {Wl})", fontsize=MIN_FONT_PT + 1)
            if l == 0 and row_labels is not None:
                ax.set_ylabel(row_labels[q], fontsize=MIN_FONT_PT + 1)
    fig.subplots_adjust(left=0.06, right=0.88, top=0.9 if title else 0.95, bottom=0.03, wspace=0.05, hspace=0.08)
    cax = fig.add_axes([0.9, 0.1, 0.02, 0.75])
    bar = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="plasma"), cax=cax)
    bar.set_label("attention weight", fontsize=MIN_FONT_PT + 1)
    bar.ax.tick_params(labelsize=MIN_FONT_PT)
    if title:
        fig.suptitle(title)
    return fig
