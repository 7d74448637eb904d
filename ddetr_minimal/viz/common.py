"""What the plotting modules share: the sample photograph, tables, and small array and Axes helpers."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes

from ..ops.checks import shape_str

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence[float]]

# The book's text column is about 684 pixels wide in a 1280-pixel window. A figure at most this
# many inches wide, drawn at 100 dots per inch, is shown at its own size; a font of MIN_FONT_PT
# points is then 7 * 100 / 72 = 9.7 pixels high, the smallest text the book allows.
COLUMN_INCHES = 6.8
DPI = 100
MIN_FONT_PT = 7.0
BOOK_STYLE = {
    "figure.dpi": DPI, "savefig.dpi": DPI, "figure.figsize": (COLUMN_INCHES, 4.2),
    "font.size": 10, "axes.titlesize": 10.5, "axes.labelsize": 10, "xtick.labelsize": 9,
    "ytick.labelsize": 9, "legend.fontsize": 8.5, "figure.titlesize": 11,
}


def use_book_style() -> None:
    """Set matplotlib's defaults to the book's: figures as wide as the text column, legible fonts."""
    plt.rcParams.update(BOOK_STYLE)


def glue(name: str, value, display: bool = True):
    """Hand ``value`` to the book's prose under ``name`` (myst-nb's ``glue``) when the chapter is
    built into the book; elsewhere (Colab, a plain Jupyter) just return it."""
    try:
        from myst_nb import glue as myst_glue
    except ImportError:
        return value
    return myst_glue(name, value, display=display)


def legibility_problems(fig, column_inches: float = COLUMN_INCHES, min_font_pt: float = MIN_FONT_PT):
    """What would be hard to read once ``fig`` is shown in the book's column: a figure wider than
    the column (it gets scaled down, and its text with it) and text smaller than ``min_font_pt``."""
    problems = []
    width = fig.get_figwidth()
    if width > column_inches + 1e-6:
        problems.append(f"figure is {width:.2f} in wide; the column holds {column_inches} in")
    scale = min(1.0, column_inches / width)  # how much the page shrinks it
    for text in fig.findobj(lambda a: hasattr(a, "get_fontsize") and hasattr(a, "get_text")):
        if text.get_text().strip() and text.get_visible() and text.get_fontsize() * scale < min_font_pt - 1e-6:
            problems.append(f"text {text.get_text()[:30]!r} is {text.get_fontsize() * scale:.1f} pt as shown; "
                            f"the least is {min_font_pt} pt")
    return problems


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
            raise ValueError(f"image tensor must have shape (3, H, W), (1, H, W) or (H, W), got {shape_str(image)}")
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
