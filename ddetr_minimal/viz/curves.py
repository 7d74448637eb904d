"""Curves and bars: cost against map size on log-log axes with fitted exponents, training and metric
curves, bar charts."""
from __future__ import annotations

from typing import Mapping, Optional, Tuple

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes

from ..measure.cost import fit_exponent
from .common import COLUMN_INCHES, ArrayLike, _axes, _numpy, _xy_pair


def plot_cost_curves(series: Mapping[str, Tuple[ArrayLike, ArrayLike]], ax: Optional[Axes] = None,
                     expected: Optional[Mapping[str, float]] = None, fit_last: Optional[int] = None,
                     title: str = "Cost against feature-map size",
                     xlabel: str = "pixels in the feature map, H*W",
                     ylabel: str = "forward time (s)") -> Axes:
    """Measured cost against ``H*W`` on log-log axes, each series with its fitted exponent.

    ``series`` maps a label to ``(hw, values)``. ``expected`` maps labels to the exponent the
    formula predicts, shown beside the fitted one. ``fit_last`` fits only the largest sizes
    (where the leading term of the formula dominates); ``None`` fits all points. The fitted
    power laws are drawn dashed over the fitted range.
    """
    if not isinstance(series, Mapping) or len(series) == 0:
        raise ValueError("series must be a non-empty mapping label -> (hw, values)")
    ax = _axes(ax, figsize=(COLUMN_INCHES, 4.5))
    expected = expected or {}
    for label, pair in series.items():
        x, y = _xy_pair("series", label, pair, "hw", "values")
        xs, ys = (x, y) if fit_last is None else (x[-fit_last:], y[-fit_last:])
        p, c = fit_exponent(xs, ys)
        text = f"{label}: fitted exponent {p:.2f}"
        if label in expected:
            text += f" (formula: {expected[label]:g})"
        line, = ax.loglog(x, y, "o-", label=text)
        grid = np.geomspace(xs.min(), xs.max(), 50)
        ax.loglog(grid, c * grid ** p, "--", color=line.get_color(), alpha=0.6, linewidth=2)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    return ax


def plot_curves(x: ArrayLike, series: Mapping[str, ArrayLike], ax: Optional[Axes] = None,
                title: str = "", xlabel: str = "step", ylabel: str = "value",
                logy: bool = False, hlines: Optional[Mapping[str, float]] = None) -> Axes:
    """Curves sharing one x axis (training step, size, ...), one per entry of ``series``.

    ``hlines`` draws labelled horizontal reference lines (a bound, a target).
    """
    ax = _axes(ax)
    x_arr = _numpy(x)
    for label, y in series.items():
        y_arr = _numpy(y)
        if y_arr.shape != x_arr.shape:
            raise ValueError(f"series[{label!r}] has shape {y_arr.shape}, expected {x_arr.shape} like x")
        ax.plot(x_arr, y_arr, label=label)
    for label, value in (hlines or {}).items():
        ax.axhline(value, linestyle=":", color="gray")
        ax.annotate(label, (x_arr.min(), value), textcoords="offset points", xytext=(2, 3),
                    fontsize="small", color="gray")
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(fontsize="small")
    return ax


def plot_metric_curves(runs: Mapping[str, Tuple[ArrayLike, ArrayLike]], ax: Optional[Axes] = None,
                       title: str = "", xlabel: str = "epoch", ylabel: str = "AP (%)",
                       marker: str = "o") -> Axes:
    """One curve per run, each with its own x values: ``runs`` maps a label to ``(x, y)``
    (e.g. the epochs a model was evaluated at and its AP)."""
    if not isinstance(runs, Mapping) or len(runs) == 0:
        raise ValueError("runs must be a non-empty mapping label -> (x, y)")
    ax = _axes(ax, figsize=(COLUMN_INCHES, 4))
    for label, pair in runs.items():
        x, y = _xy_pair("runs", label, pair, "x", "y")
        ax.plot(x, y, marker=marker, markersize=3, label=label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return ax


def plot_bars(values: Mapping[str, float], ax: Optional[Axes] = None, title: str = "",
              ylabel: str = "value", fmt: str = "{:.2f}", horizontal: bool = False) -> Axes:
    """One labelled bar per entry of ``values``, each annotated with its value (``fmt``)."""
    if not isinstance(values, Mapping) or len(values) == 0:
        raise ValueError("values must be a non-empty mapping label -> number")
    ax = _axes(ax)
    labels = list(values)
    v = [float(values[k]) for k in labels]
    colors = plt.cm.viridis(np.linspace(0.2, 0.8, len(labels)))
    if horizontal:
        bars = ax.barh(range(len(labels)), v, color=colors)
        ax.set_yticks(range(len(labels)), labels)
        ax.invert_yaxis()
        for bar, x in zip(bars, v):
            ax.annotate(fmt.format(x), (x, bar.get_y() + bar.get_height() / 2), va="center",
                        xytext=(3, 0), textcoords="offset points", fontsize="small")
        ax.set_xlabel(ylabel)
        ax.set_xlim(0, max(v) * 1.2 if max(v) > 0 else 1)
    else:
        bars = ax.bar(range(len(labels)), v, color=colors)
        ax.set_xticks(range(len(labels)), labels)
        for bar, y in zip(bars, v):
            ax.annotate(fmt.format(y), (bar.get_x() + bar.get_width() / 2, y), ha="center", va="bottom",
                        fontsize="small")
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, max(v) * 1.2 if max(v) > 0 else 1)
    ax.set_title(title)
    return ax
