"""Attention distributions: one query's attention over an H x W map, entropies against the
uniform maximum, and a deformable query's points over the pixels they read."""
from __future__ import annotations

from typing import Mapping, Optional, Tuple

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes

from .common import ArrayLike, _axes, _image_hwc, _numpy


# --------------------------------------------------------------------------------------
# Attention maps and their entropy
# --------------------------------------------------------------------------------------
def plot_attention_map(weights: ArrayLike, shape: Tuple[int, int], ax: Optional[Axes] = None,
                       image=None, query_xy: Optional[Tuple[float, float]] = None,
                       title: str = "Attention of one query", colorbar: bool = True) -> Axes:
    """One query's attention weights over an ``H x W`` map, optionally over an image.

    ``weights`` has ``H*W`` entries (row-major). ``query_xy`` marks the query's own position
    in pixels of the map. With ``image`` the map is stretched over the photograph.
    """
    ax = _axes(ax)
    H, W = shape
    w = _numpy(weights).astype(float)
    if w.size != H * W:
        raise ValueError(f"weights has {w.size} entries, expected H*W = {H}*{W} = {H * W} for shape {shape}")
    w = w.reshape(H, W)  # (H, W)
    extent = (-0.5, W - 0.5, H - 0.5, -0.5)
    if image is not None:
        ax.imshow(_image_hwc(image), extent=extent, interpolation="bilinear")
        im = ax.imshow(w, extent=extent, cmap="magma", alpha=0.6, interpolation="nearest")
    else:
        im = ax.imshow(w, extent=extent, cmap="magma", interpolation="nearest")
    if query_xy is not None:
        ax.plot([query_xy[0]], [query_xy[1]], marker="+", color="cyan", markersize=14, mew=2,
                linestyle="none", label="query")
        ax.legend(loc="upper right", fontsize="small")
    if colorbar:
        ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="attention weight")
    ax.set_title(title)
    ax.set_xlabel("x (feature-map pixels)")
    ax.set_ylabel("y (feature-map pixels)")
    return ax


def plot_entropy_bars(entropies: Mapping[str, float], ax: Optional[Axes] = None,
                      max_entropy: Optional[float] = None,
                      title: str = "Entropy of the attention maps",
                      ylabel: str = "entropy (nats)") -> Axes:
    """Bars of attention entropies, with the uniform-attention maximum ``log(N_k)`` as a line."""
    if not isinstance(entropies, Mapping) or len(entropies) == 0:
        raise ValueError("entropies must be a non-empty mapping label -> entropy")
    ax = _axes(ax)
    labels = list(entropies)
    values = [float(entropies[k]) for k in labels]
    bars = ax.bar(range(len(labels)), values, color=plt.cm.viridis(np.linspace(0.2, 0.8, len(labels))))
    ax.set_xticks(range(len(labels)), labels)
    for bar, v in zip(bars, values):
        ax.annotate(f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom",
                    fontsize="small")
    if max_entropy is not None:
        ax.axhline(max_entropy, linestyle="--", color="gray", label=f"uniform: {max_entropy:.2f}")
        ax.legend(fontsize="small", loc="upper right")
        ax.set_ylim(0, max_entropy * 1.2)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.set_xlabel("attention map")
    return ax


def plot_deformable_map(weights: ArrayLike, shape: Tuple[int, int], locations: ArrayLike,
                        point_weights: ArrayLike, reference_xy: Tuple[float, float],
                        target_xy: Optional[Tuple[float, float]] = None, ax: Optional[Axes] = None,
                        title: str = "Deformable attention of one query") -> Axes:
    """One deformable query over an ``H x W`` map: the weight each pixel gets (``H*W`` entries,
    row-major), its sampling points as circles of area proportional to their weights, its
    reference point (x) and, optionally, the pixel it should read (+, "target pixel").

    ``locations`` (P, 2) are normalised (x, y), ``point_weights`` (P,) their attention weights;
    ``reference_xy`` is normalised too, ``target_xy`` in pixels of the map.
    """
    H, W = shape
    loc = _numpy(locations).astype(float).reshape(-1, 2)  # (P, 2)
    pw = _numpy(point_weights).astype(float).reshape(-1)  # (P,)
    if len(pw) != len(loc):
        raise ValueError(f"point_weights has {len(pw)} entries, expected one per location ({len(loc)})")
    if len(reference_xy) != 2:
        raise ValueError(f"reference_xy must be a normalised point (x, y), got {reference_xy!r}")
    ax = plot_attention_map(weights, shape, ax=ax, query_xy=target_xy, title=title)
    px, py = loc[:, 0] * W - 0.5, loc[:, 1] * H - 0.5  # pixel coordinates, centres at integers
    ax.scatter(px, py, s=20 + 200 * pw / max(pw.max(), 1e-12), facecolors="none", edgecolors="lime",
               linewidths=1.5, label="sampling points")
    ax.plot([reference_xy[0] * W - 0.5], [reference_xy[1] * H - 0.5], marker="x", color="white",
            markersize=9, mew=2, linestyle="none", label="reference point")
    for line in ax.get_lines():
        if line.get_label() == "query":
            line.set_label("target pixel")  # plot_attention_map's + marks what the query asks for
    ax.set_xlim(-0.5, W - 0.5)
    ax.set_ylim(H - 0.5, -0.5)
    # the legend goes in the corner diagonally opposite the reference point, clear of the points
    below = "lower" if reference_xy[1] < 0.5 else "upper"
    side = "right" if reference_xy[0] < 0.5 else "left"
    ax.legend(loc=f"{below} {side}", fontsize="small")
    return ax
