"""The plots the chapters show. Every function draws on an Axes (or a new Figure) and returns it.

* :func:`sample_photo` -- the photograph the chapters draw on, as a ``(3, H, W)`` tensor.
* :func:`plot_cost_curves` -- measured cost against ``H*W`` on log-log axes, with fitted exponents.
* :func:`plot_curves` -- plain curves against a step or size (training curves and the like).
* :func:`plot_attention_map` -- one query's attention over an ``H x W`` map.
* :func:`plot_entropy_bars` -- entropies of attention maps next to the uniform maximum.
* :func:`bilinear_weight_map`, :func:`plot_bilinear_neighbours` -- one bilinear sample.
* :func:`plot_sampling_points` -- deformable sampling points of some queries and heads on an image.
* :func:`plot_sampling_levels` -- the same per feature level, on each level's pixel grid.
* :func:`draw_boxes` -- boxes with labels and scores on an Axes (detections, ground truth).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence, Tuple, Union

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .measure import fit_exponent
from .msda import _shape, bilinear_sample

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence[float]]


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _axes(ax: Optional[Axes], figsize=(5, 4)) -> Axes:
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    elif not isinstance(ax, Axes):
        raise TypeError(f"ax must be a matplotlib Axes or None, got {type(ax).__name__}")
    return ax


def _image_hwc(image) -> np.ndarray:
    """An image as an (H, W, 3) or (H, W) float array in [0, 1] for imshow.

    Accepts a (3, H, W) or (H, W) tensor, an (H, W, 3) or (H, W) array, or a PIL image.
    """
    if isinstance(image, torch.Tensor):
        if image.dim() == 3 and image.shape[0] in (1, 3):
            image = image.permute(1, 2, 0)  # (H, W, 3)
        elif image.dim() != 2:
            raise ValueError(f"image tensor must have shape (3, H, W), (1, H, W) or (H, W), got {_shape(image)}")
    arr = np.asarray(_numpy(image))
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
        raise ValueError(f"image must be (H, W), (H, W, 3) or (3, H, W), got shape {arr.shape}")
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    return arr


def sample_photo(size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Matplotlib's sample photograph of Grace Hopper as a float tensor (3, H, W) in [0, 1].

    ``size=(H, W)`` resizes it (antialiased); ``None`` keeps the original 600 x 512.
    """
    from matplotlib import cbook
    from PIL import Image

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        img = Image.open(f).convert("RGB")
        if size is not None:
            if len(size) != 2 or any(not isinstance(s, int) or s <= 0 for s in size):
                raise ValueError(f"size must be (H, W) with positive integers, got {size!r}")
            img = img.resize((size[1], size[0]), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # (3, H, W)


# --------------------------------------------------------------------------------------
# Cost and generic curves
# --------------------------------------------------------------------------------------
def _xy_pair(argument: str, label, pair, x_name: str, y_name: str):
    """Check that ``argument[label]`` is a pair of equal-length 1-D sequences; return them as floats."""
    if len(pair) != 2:
        raise ValueError(f"{argument}[{label!r}] must be a pair ({x_name}, {y_name}), got {len(pair)} items")
    x, y = (_numpy(v).astype(float) for v in pair)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"{argument}[{label!r}] needs {x_name} and {y_name} of equal 1-D shape, "
                         f"got {x.shape} and {y.shape}")
    return x, y


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
    ax = _axes(ax, figsize=(6, 4.5))
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


# --------------------------------------------------------------------------------------
# One bilinear sample
# --------------------------------------------------------------------------------------
def bilinear_weight_map(loc_xy: Tuple[float, float], H: int, W: int) -> torch.Tensor:
    """The weight each pixel of an ``H x W`` map gets when the op samples the normalised point.

    Computed with the package's own sampler (:func:`ddetr_minimal.msda.bilinear_sample`) on a
    one-hot value map: channel ``i`` is 1 at pixel ``i`` only, so the sampled channel ``i``
    is pixel ``i``'s bilinear weight. Returns (H, W); at most four entries are non-zero.
    """
    if len(loc_xy) != 2:
        raise ValueError(f"loc_xy must be a normalised point (x, y), got {loc_xy!r}")
    for name, v in (("H", H), ("W", W)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
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
        got = _shape(locations) if isinstance(locations, torch.Tensor) else type(locations).__name__
        raise ValueError(f"locations must be a tensor of shape (Lq, M, L, K, 2), got {got}")
    if weights is not None and tuple(weights.shape) != tuple(locations.shape[:-1]):
        raise ValueError(
            f"weights must have shape {tuple(locations.shape[:-1])} (Lq, M, L, K) to match locations "
            f"{_shape(locations)}, got {_shape(weights)}"
        )


def plot_sampling_points(image, locations: torch.Tensor, weights: Optional[torch.Tensor] = None,
                         reference_points: Optional[torch.Tensor] = None, level: Optional[int] = None,
                         heads: Optional[Sequence[int]] = None, ax: Optional[Axes] = None,
                         title: str = "Sampling points") -> Axes:
    """Sampling points of some queries on an image, one colour per head.

    ``locations`` (Lq, M, L, K, 2) normalised (x, y), as returned by
    :meth:`MSDeformAttn.sampling` for one image; ``weights`` (Lq, M, L, K) scale the markers
    (area proportional to the weight); ``reference_points`` (Lq, 2) are drawn as crosses.
    ``level=None`` draws the points of every level, an integer only that level's.
    """
    _check_locations(locations, weights)
    ax = _axes(ax, figsize=(6, 6))
    img = _image_hwc(image)
    Hi, Wi = img.shape[:2]
    ax.imshow(img, extent=(0, Wi, Hi, 0))
    Lq, M, L, K, _ = locations.shape
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
        pts = loc[:, m][:, levels].reshape(-1, 2)  # (Lq*L'*K, 2)
        size = 30.0 if w is None else 30.0 * len(levels) * K * w[:, m][:, levels].reshape(-1)  # (Lq*L'*K,)
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
    ax.legend(fontsize="x-small", loc="upper right", ncol=2, framealpha=0.8)
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
    Lq, M, L, K, _ = locations.shape
    if tuple(spatial_shapes.shape) != (L, 2):
        raise ValueError(f"spatial_shapes must have shape ({L}, 2) for L={L} levels, got {_shape(spatial_shapes)}")
    if not 0 <= query < Lq:
        raise ValueError(f"query must be in [0, {Lq}), got {query}")
    img = torch.as_tensor(_image_hwc(image)).float()
    if img.dim() == 2:
        img = img[..., None].expand(-1, -1, 3)  # (H, W, 3)
    img = img[..., :3].permute(2, 0, 1)[None]  # (1, 3, H, W)
    Hi, Wi = img.shape[-2:]
    fig, axes = plt.subplots(1, L, figsize=(4 * L, 4.4), squeeze=False)
    colors = plt.cm.hsv(np.linspace(0, 1, M, endpoint=False))
    loc = _numpy(locations[query])  # (M, L, K, 2)
    w = None if weights is None else _numpy(weights[query])  # (M, L, K)
    for l, ax in enumerate(axes[0]):
        Hl, Wl = (int(v) for v in spatial_shapes[l])
        small = torch.nn.functional.adaptive_avg_pool2d(img, (Hl, Wl))[0].permute(1, 2, 0)  # (Hl, Wl, 3)
        ax.imshow(small.numpy(), extent=(0, Wi, Hi, 0), interpolation="nearest")
        for i in range(1, Wl):
            ax.axvline(i * Wi / Wl, color="white", linewidth=0.3, alpha=0.5)
        for j in range(1, Hl):
            ax.axhline(j * Hi / Hl, color="white", linewidth=0.3, alpha=0.5)
        for m in range(M):
            size = 30.0 if w is None else 30.0 * L * K * w[m, l]
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
    axes[0, -1].legend(fontsize="x-small", loc="upper right", framealpha=0.8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------
# Boxes
# --------------------------------------------------------------------------------------
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

    if not isinstance(ax, Axes):
        raise TypeError(f"ax must be a matplotlib Axes, got {type(ax).__name__}")
    b = torch.as_tensor(_numpy(boxes), dtype=torch.float32)
    if b.numel() == 0:
        b = b.reshape(0, 4)  # (0, 4)
    if b.dim() != 2 or b.shape[-1] != 4:
        raise ValueError(f"boxes must have shape (n, 4), got {_shape(b)}")
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
            ax.text(x0, y0, " ".join(text), fontsize="small", color="white", va="bottom",
                    bbox=dict(facecolor=c, alpha=0.8, pad=1, edgecolor="none"))
    if title is not None:
        ax.set_title(title)
    return ax


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
    for name, v in (("n_queries", n_queries), ("n_heads", n_heads), ("head_dim", head_dim),
                    ("warp_size", warp_size)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    rows, D = n_queries * n_heads, head_dim
    thread = np.arange(rows * D).reshape(rows, D)  # (Lq*M, D): forward thread index i
    forward_warp = thread // warp_size  # (Lq*M, D)
    backward_warp = np.repeat(np.arange(rows)[:, None], D, axis=1)  # (Lq*M, D)
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.35 * rows + 2.2), squeeze=False)
    cmap = plt.cm.tab20
    labels = [f"q{q} m{m}" for q in range(n_queries) for m in range(n_heads)]
    for ax, warps, title in ((axes[0, 0], forward_warp, "forward: one thread per output"),
                             (axes[0, 1], backward_warp, "backward: one warp per (query, head)")):
        ax.imshow(warps % 20, cmap=cmap, vmin=0, vmax=19, aspect="auto", interpolation="nearest",
                  extent=(-0.5, D - 0.5, rows - 0.5, -0.5))
        flat = warps.ravel()  # (Lq*M*D,) in the order of the forward thread index
        for f in np.r_[0, np.flatnonzero(np.diff(flat)) + 1]:  # first output of every warp
            r, d = divmod(int(f), D)
            ax.text(d + 0.2, r, f"warp {flat[f]}", ha="left", va="center", fontsize="x-small")
        ax.set_yticks(range(rows), labels, fontsize="x-small")
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
    """Bars of the rows written by ``python -m ddetr_minimal.bench_kernel``.

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
    fig, axes = plt.subplots(2, len(scales), figsize=(5.5 * len(scales), 7.5), squeeze=False)
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
                                fontsize="x-small")
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


# --------------------------------------------------------------------------------------
# Matching, result curves and bars
# --------------------------------------------------------------------------------------
def plot_cost_matrix(cost: ArrayLike, rows: Optional[ArrayLike] = None, cols: Optional[ArrayLike] = None,
                     ax: Optional[Axes] = None, title: str = "Matching cost",
                     row_labels: Optional[Sequence[str]] = None, col_labels: Optional[Sequence[str]] = None,
                     cmap: str = "viridis") -> Axes:
    """A (Q, n) cost matrix as a heatmap with its value in every cell; the matched cells
    ``(rows[k], cols[k])`` (as returned by the matcher) are outlined in red."""
    c = _numpy(cost).astype(float)
    if c.ndim != 2:
        raise ValueError(f"cost must be a 2-d matrix (Q, n), got shape {c.shape}")
    Q, n = c.shape
    for name, labels, size in (("row_labels", row_labels, Q), ("col_labels", col_labels, n)):
        if labels is not None and len(labels) != size:
            raise ValueError(f"{name} must have {size} entries to match cost {c.shape}, got {len(labels)}")
    r = [] if rows is None else [int(v) for v in _numpy(rows).reshape(-1)]
    k = [] if cols is None else [int(v) for v in _numpy(cols).reshape(-1)]
    if len(r) != len(k):
        raise ValueError(f"rows and cols must have the same length, got {len(r)} and {len(k)}")
    ax = _axes(ax, figsize=(0.9 * n + 2, 0.45 * Q + 1.5))
    im = ax.imshow(c, cmap=cmap, aspect="auto")
    mid = (np.nanmax(c) + np.nanmin(c)) / 2
    for i in range(Q):
        for j in range(n):
            ax.text(j, i, f"{c[i, j]:.2f}", ha="center", va="center", fontsize="x-small",
                    color="white" if c[i, j] < mid else "black")
    for i, j in zip(r, k):
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
    ax.set_xticks(range(n), col_labels if col_labels is not None else [str(j) for j in range(n)])
    ax.set_yticks(range(Q), row_labels if row_labels is not None else [str(i) for i in range(Q)])
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
    pred_xyxy = box_convert(pred, box_format, "xyxy").numpy()  # (Q, 4)
    partner = dict(zip(pi, gi))
    for j, (x0, y0, x1, y1) in enumerate(gt_xyxy):
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=palette[j % 10], linewidth=2.5))
        if gt_names is not None:
            ax.text(x0, y0 - 2, gt_names[j], color="white", fontsize="small", va="bottom",
                    bbox=dict(facecolor=palette[j % 10], alpha=0.8, pad=1, edgecolor="none"))
    for i, (x0, y0, x1, y1) in enumerate(pred_xyxy):
        c = palette[partner[i] % 10] if i in partner else "lightgray"
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=c, linewidth=1.5, linestyle="--"))
        if pred_names is not None:
            ax.text(x1, y1, pred_names[i], color=c, fontsize="small", ha="right", va="top", fontweight="bold",
                    bbox=dict(facecolor="white", alpha=0.7, pad=0.5, edgecolor="none"))
    for i, j in zip(pi, gi):
        p, g = pred_xyxy[i], gt_xyxy[j]
        ax.plot([(p[0] + p[2]) / 2, (g[0] + g[2]) / 2], [(p[1] + p[3]) / 2, (g[1] + g[3]) / 2], "-o",
                color=palette[j % 10], markersize=3, linewidth=1.5)
    ax.plot([], [], "-", color="gray", label="object (solid), matched prediction (dashed, same colour)")
    ax.plot([], [], "--", color="lightgray", label="unmatched prediction: no object")
    ax.legend(fontsize="x-small", loc="lower right", framealpha=0.8)
    ax.set_xlabel("x (image pixels)")
    ax.set_ylabel("y (image pixels)")
    if title is not None:
        ax.set_title(title)
    return ax


def plot_metric_curves(runs: Mapping[str, Tuple[ArrayLike, ArrayLike]], ax: Optional[Axes] = None,
                       title: str = "", xlabel: str = "epoch", ylabel: str = "AP (%)",
                       marker: str = "o") -> Axes:
    """One curve per run, each with its own x values: ``runs`` maps a label to ``(x, y)``
    (e.g. the epochs a model was evaluated at and its AP)."""
    if not isinstance(runs, Mapping) or len(runs) == 0:
        raise ValueError("runs must be a non-empty mapping label -> (x, y)")
    ax = _axes(ax, figsize=(6, 4))
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


def show_table(header, rows) -> None:
    """Display ``rows`` under ``header`` as an HTML table in a notebook; cells may use `code`
    and **bold** as in Markdown (everything else is escaped)."""
    import html
    import re

    from IPython.display import HTML, display

    def cell(value):
        text = html.escape(str(value))
        text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
        return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)

    head = "".join(f"<th>{cell(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    display(HTML(f'<table class="table"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'))
