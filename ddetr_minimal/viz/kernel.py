"""The CUDA kernel's thread layout (who owns which output) and its recorded benchmark against the
torch backend."""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from ..ops.checks import check_positive_ints
from .common import COLUMN_INCHES, MIN_FONT_PT


# --------------------------------------------------------------------------------------
# The CUDA kernel: who computes what, and the recorded benchmark
# --------------------------------------------------------------------------------------
def plot_thread_ownership(n_queries: int, n_heads: int, head_dim: int, warp_size: int = 32) -> Figure:
    """Which warp of the kernels in ``kernels/msda.cu`` computes each output, for one image.

    Rows are the (query, head) pairs, columns the channels ``d`` of a head. Left, the
    forward kernel: thread ``i = (q * M + m) * D + d`` owns one output, so a warp covers
    ``warp_size`` consecutive outputs. Right, the backward kernel: warp ``q * M + m`` owns
    a whole row; lane ``k`` takes channels ``k, k + warp_size, ...``.
    """
    check_positive_ints(n_queries=n_queries, n_heads=n_heads, head_dim=head_dim, warp_size=warp_size)
    rows, D = n_queries * n_heads, head_dim
    thread = np.arange(rows * D).reshape(rows, D)  # (Lq*M, D): forward thread index i
    forward_warp = thread // warp_size  # (Lq*M, D)
    backward_warp = np.repeat(np.arange(rows)[:, None], D, axis=1)  # (Lq*M, D)
    fig, axes = plt.subplots(2, 1, figsize=(COLUMN_INCHES, 2 * (0.3 * rows + 1.3)), squeeze=False)
    axes = axes.T  # (1, 2): forward, backward, one above the other
    cmap = plt.cm.tab20
    labels = [f"q{q} m{m}" for q in range(n_queries) for m in range(n_heads)]
    for ax, warps, title in ((axes[0, 0], forward_warp, "forward: one thread per output"),
                             (axes[0, 1], backward_warp, "backward: one warp per (query, head)")):
        ax.imshow(warps % 20, cmap=cmap, vmin=0, vmax=19, aspect="auto", interpolation="nearest",
                  extent=(-0.5, D - 0.5, rows - 0.5, -0.5))
        flat = warps.ravel()  # (Lq*M*D,) in the order of the forward thread index
        for f in np.r_[0, np.flatnonzero(np.diff(flat)) + 1]:  # first output of every warp
            r, d = divmod(int(f), D)
            ax.text(d + 0.2, r, f"warp {flat[f]}", ha="left", va="center", fontsize=MIN_FONT_PT)
        ax.set_yticks(range(rows), labels, fontsize=MIN_FONT_PT)
        ax.set_xlabel("channel d of the head")
        ax.set_ylabel("(query, head)")
        ax.set_title(title)
    for boundary in range(warp_size, D, warp_size):  # lane k takes d = k, k + 32, ...
        axes[0, 1].axvline(boundary - 0.5, color="black", linewidth=1, linestyle="--")
    if D > warp_size:
        axes[0, 1].set_xlabel(f"channel d of the head (dashed: lane k goes on with d = k + {warp_size})")
    fig.suptitle(f"Which warp computes what: {n_queries} queries, {n_heads} heads, D = {D} channels")
    fig.tight_layout()
    return fig


BENCH_KEYS = ("scale", "dtype", "backend", "forward_ms", "forward_backward_ms", "forward_peak_mib",
              "forward_backward_peak_mib")


def plot_kernel_benchmark(results: Sequence[Mapping[str, object]], title: str = "CUDA kernel against torch") -> Figure:
    """Bars of the rows written by ``python -m ddetr_minimal bench-kernel``.

    ``results`` is the file's ``"results"`` list: one row per (scale, dtype, backend) with
    the forward and forward+backward medians in milliseconds and the peak allocator memory
    in MiB. Columns of the figure are the workloads (encoder, decoder), the top row is time
    and the bottom row memory; in each panel, bars of the same colour are one backend.
    """
    if not isinstance(results, Sequence) or len(results) == 0:
        raise ValueError("results must be a non-empty list of benchmark rows")
    for i, row in enumerate(results):
        missing = [k for k in BENCH_KEYS if k not in row]
        if missing:
            raise ValueError(f"results[{i}] lacks the keys {missing}; expected every row to have {list(BENCH_KEYS)}")
    scales = list(dict.fromkeys(str(r["scale"]) for r in results))
    dtypes = list(dict.fromkeys(str(r["dtype"]) for r in results))
    backends = list(dict.fromkeys(str(r["backend"]) for r in results))
    names = {"cupy": "CUDA kernel (cupy)", "torch": "torch (grid_sample)"}
    metrics = (("time", ("forward_ms", "forward_backward_ms"), "median time (ms)"),
               ("peak memory", ("forward_peak_mib", "forward_backward_peak_mib"), "peak allocated (MiB)"))
    fig, axes = plt.subplots(2 * len(scales), 1, figsize=(COLUMN_INCHES, 3.2 * 2 * len(scales)), squeeze=False)
    axes = axes.reshape(len(scales), 2).T  # (time, memory) x scales, stacked in one column
    groups = [(dt, key) for dt in dtypes for key in (0, 1)]  # (dtype, forward / forward+backward)
    width = 0.8 / len(backends)
    colors = plt.cm.tab10.colors
    for col, scale in enumerate(scales):
        rows = {(str(r["dtype"]), str(r["backend"])): r for r in results if str(r["scale"]) == scale}
        queries = next((r.get("queries") for r in results if str(r["scale"]) == scale), None)
        for row_i, (what, keys, ylabel) in enumerate(metrics):
            ax = axes[row_i, col]
            for b_i, backend in enumerate(backends):
                xs, ys = [], []
                for g_i, (dt, k) in enumerate(groups):
                    r = rows.get((dt, backend))
                    if r is not None:
                        xs.append(g_i + (b_i - (len(backends) - 1) / 2) * width)
                        ys.append(float(r[keys[k]]))
                bars = ax.bar(xs, ys, width, color=colors[b_i % 10], label=names.get(backend, backend))
                for bar, y in zip(bars, ys):
                    ax.annotate(f"{y:.3g}", (bar.get_x() + bar.get_width() / 2, y), ha="center", va="bottom",
                                fontsize=MIN_FONT_PT)
            ax.margins(y=0.12)  # room for the value labels
            ax.set_xticks(range(len(groups)), [f"{dt}\n{'forward' if k == 0 else 'fwd + bwd'}"
                                               for dt, k in groups], fontsize="small")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{scale}" + (f" ({queries} queries)" if queries else "") + f": {what}")
            ax.grid(True, axis="y", alpha=0.3)
            ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    return fig
