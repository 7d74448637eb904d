"""Curves and bars: cost against map size on log-log axes with fitted exponents, training and metric
curves, mean +- sd bands over seeds, bar charts."""
from __future__ import annotations

from typing import Mapping, Optional, Sequence, Tuple

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


def seed_band(curves: Sequence[Sequence[Mapping]], key: str = "AP", scale: float = 100.0) -> dict:
    """Mean and sample standard deviation over seeds of metric ``key`` at every epoch that all
    ``curves`` (one per seed: per-epoch records ``{"epoch", key, ...}``) evaluated.

    Returns ``{"epoch", "mean", "sd", "n"}`` (arrays, ``scale`` times the values: percent by
    default); ``sd`` divides by ``n - 1`` and is 0 for a single seed."""
    if isinstance(curves, (str, Mapping)) or len(curves) == 0:
        raise ValueError(f"curves must be a non-empty list of per-epoch curves, one per seed; got {type(curves).__name__}")
    per_seed = []
    for i, curve in enumerate(curves):
        rows = {int(r["epoch"]): float(r[key]) for r in curve if key in r}
        if not rows:
            raise ValueError(f"curves[{i}] has no epoch with {key!r}; its keys are "
                             f"{sorted({k for r in curve for k in r})}")
        per_seed.append(rows)
    epochs = sorted(set.intersection(*(set(r) for r in per_seed)))
    if not epochs:
        raise ValueError(f"the {len(curves)} curves share no evaluated epoch for {key!r}")
    values = scale * np.array([[rows[e] for e in epochs] for rows in per_seed])  # (seeds, epochs)
    sd = values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(len(epochs))
    return {"epoch": np.array(epochs), "mean": values.mean(axis=0), "sd": sd, "n": len(values)}


def plot_seed_bands(bands: Mapping[str, dict], ax: Optional[Axes] = None, title: str = "",
                    xlabel: str = "epoch (log scale)", ylabel: str = "AP (%)", logx: bool = True,
                    lr_drops: Optional[Mapping[str, float]] = None,
                    hlines: Optional[Mapping[str, float]] = None, legend: Optional[str] = "best") -> Axes:
    """Each entry of ``bands`` (label -> :func:`seed_band`) as its mean line with a shaded
    mean +- sd band (a plain line for one seed), the label followed by its number of seeds.
    ``lr_drops`` (label -> epoch) marks a model's learning-rate drop with a dashed vertical line in
    its colour; ``hlines`` draws labelled horizontal reference lines (thresholds). ``legend`` is
    the legend's ``loc`` (None: no legend, e.g. when another panel shows it)."""
    if not isinstance(bands, Mapping) or len(bands) == 0:
        raise ValueError("bands must be a non-empty mapping label -> seed_band(...)")
    unknown = sorted(set(lr_drops or {}) - set(bands))
    if unknown:
        raise ValueError(f"lr_drops names {unknown}, which are not in bands {sorted(bands)}")
    ax = _axes(ax, figsize=(COLUMN_INCHES, 4))
    for label, band in bands.items():
        if not isinstance(band, Mapping):
            raise ValueError(f"bands[{label!r}] must be a seed_band(...) dict, got {type(band).__name__}")
        missing = {"epoch", "mean", "sd", "n"} - set(band)
        if missing:
            raise ValueError(f"bands[{label!r}] must be a seed_band(...) dict; it lacks {sorted(missing)}")
        x, mean, sd = (_numpy(band[k]) for k in ("epoch", "mean", "sd"))
        if not x.shape == mean.shape == sd.shape:
            raise ValueError(f"bands[{label!r}]: epoch, mean and sd have shapes {x.shape}, {mean.shape}, {sd.shape}")
        n = band["n"]
        line, = ax.plot(x, mean, marker="o", markersize=2.5,
                        label=f"{label} ({n} seed{'s' if n != 1 else ''}{', mean ± sd' if n > 1 else ''})")
        if n > 1:
            ax.fill_between(x, mean - sd, mean + sd, color=line.get_color(), alpha=0.25, linewidth=0)
        if lr_drops and label in lr_drops:
            ax.axvline(lr_drops[label], color=line.get_color(), linestyle="--", linewidth=1)
    for label, value in (hlines or {}).items():
        ax.axhline(value, linestyle=":", color="gray", linewidth=1)
        ax.annotate(label, (0.005, value), xycoords=("axes fraction", "data"), textcoords="offset points",
                    xytext=(2, 2), fontsize="small", color="gray")
    if logx:
        ax.set_xscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    if legend is not None:
        ax.legend(fontsize="small", loc=legend)
    return ax


def plot_grouped_bars(values: Mapping[str, Mapping[str, float]], ax: Optional[Axes] = None, title: str = "",
                      ylabel: str = "value", fmt: str = "{:.2f}") -> Axes:
    """Bars grouped by category: ``values`` maps a series (e.g. a model) to ``{category: value}``,
    every series over the same categories; each bar is annotated with its value (``fmt``)."""
    if not isinstance(values, Mapping) or len(values) == 0:
        raise ValueError("values must be a non-empty mapping series -> {category: value}")
    series = list(values)
    categories = list(values[series[0]])
    for s in series:
        if list(values[s]) != categories:
            raise ValueError(f"every series must have the categories {categories}, {s!r} has {list(values[s])}")
    ax = _axes(ax)
    width = 0.8 / len(series)
    colors = plt.cm.viridis(np.linspace(0.2, 0.8, len(series)))
    top = 0.0
    for i, s in enumerate(series):
        xs = np.arange(len(categories)) + (i - (len(series) - 1) / 2) * width
        v = [float(values[s][c]) for c in categories]
        top = max(top, *v)
        ax.bar(xs, v, width, color=colors[i], label=s)
        for x, y in zip(xs, v):
            ax.annotate(fmt.format(y), (x, y), ha="center", va="bottom", fontsize="small")
    ax.set_xticks(range(len(categories)), categories)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, top * 1.2 if top > 0 else 1)
    ax.legend(fontsize="small")
    ax.set_title(title)
    return ax
