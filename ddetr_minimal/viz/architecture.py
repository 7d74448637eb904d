"""The architecture diagram of Deformable DETR, drawn from a model and one forward pass.

:func:`trace_architecture` runs the model once with forward hooks on its stages (backbone, input
projections, encoder, decoder, heads) and records what each one outputs and how many parameters
it has; :func:`plot_architecture` draws those stages as a block diagram. Nothing in the figure is
typed in: change the model and the diagram changes with it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
from torch import nn

from .common import COLUMN_INCHES


@dataclass
class Stage:
    """One block of the diagram."""

    name: str  # what the stage is, e.g. "Deformable encoder"
    module: str  # the package's class that implements it
    outputs: List[tuple]  # shapes of what it hands on
    parameters: int  # trainable and frozen parameters
    detail: str = ""  # one line on what it does


def _shapes(out) -> List[tuple]:
    if isinstance(out, torch.Tensor):
        return [tuple(out.shape)]
    if isinstance(out, (list, tuple)):
        return [s for o in out for s in _shapes(o)]
    if hasattr(out, "states"):  # the decoder's (states, references) or the transformer's output
        return [tuple(out.states.shape)]
    return []


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())


def trace_architecture(model: nn.Module, images: torch.Tensor, mask: Optional[torch.Tensor] = None) -> List[Stage]:
    """The stages of a :class:`~ddetr_minimal.models.deformable_detr.DeformableDETR`, in data order."""
    if not all(hasattr(model, a) for a in ("backbone", "input_proj", "transformer", "class_embed", "bbox_embed")):
        raise TypeError(f"model must be a DeformableDETR (backbone, input_proj, transformer, heads), "
                        f"got {type(model).__name__}")
    tr = model.transformer
    hooked = [
        ("Backbone", model.backbone, "strides 8, 16, 32"),
        ("Input projections", model.input_proj, f"1x1 conv + GroupNorm to d_model; {tr.n_levels} levels"),
        ("Deformable encoder", tr.encoder,
         f"{len(tr.encoder.layers)} layers: multi-scale deformable self-attention + FFN"),
        ("Deformable decoder", tr.decoder,
         f"{len(tr.decoder.layers)} layers: self-attention, deformable cross-attention, FFN"),
    ]
    seen = {}
    handles = [m.register_forward_hook(lambda mod, inp, out, key=name: seen.__setitem__(key, out))
               for name, m, _ in hooked]
    try:
        with torch.no_grad():
            out = model(images, mask)
    finally:
        for h in handles:
            h.remove()
    stages = [Stage("Images", "", [tuple(images.shape)], 0, "(N, 3, H, W) and a padding mask")]
    for name, module, detail in hooked:
        outputs = _shapes(seen[name][0] if name in ("Backbone", "Input projections") else seen[name])  # maps, not masks
        if name == "Deformable decoder":
            outputs = [tuple(seen[name][0].shape)]  # (decoder layers, N, Lq, C)
        stages.append(Stage(name, type(module).__name__, outputs, _count(module), detail))
    heads = nn.ModuleList([*model.class_embed, *model.bbox_embed])
    stages.append(Stage("Class and box heads", "Linear, MLP", [tuple(out["pred_logits"].shape),
                                                              tuple(out["pred_boxes"].shape)],
                        _count(heads) + (_count(model.query_embed) if hasattr(model, "query_embed") else 0),
                        "boxes relative to each query's reference point; sigmoid class scores"))
    return stages


def _fmt(shapes: Sequence[tuple], limit: int = 4) -> str:
    text = ", ".join("(" + ", ".join(map(str, s)) + ")" for s in shapes[:limit])
    return text + (f" +{len(shapes) - limit}" if len(shapes) > limit else "")


def plot_architecture(stages: Sequence[Stage], title: str = "Deformable DETR, as built by build_model") -> Figure:
    """A top-to-bottom block diagram: one box per stage with its class, parameters and output shapes."""
    if not stages:
        raise ValueError("stages must not be empty; get them from trace_architecture(model, images)")
    fig, ax = plt.subplots(figsize=(COLUMN_INCHES, 1.15 * len(stages) + 0.4))
    ax.set_xlim(0, 10)
    ax.set_ylim(-len(stages) + 0.3, 1.0)
    ax.axis("off")
    for i, s in enumerate(stages):
        y = -i
        ax.add_patch(FancyBboxPatch((0.3, y - 0.32), 9.4, 0.78, boxstyle="round,pad=0.02",
                                    facecolor="#e8f0fb" if i else "#f3f3f3", edgecolor="#2a4d8f"))
        head = s.name + (f"  ({s.module})" if s.module else "")
        if s.parameters:
            head += f"  {s.parameters / 1e6:.2f}M parameters" if s.parameters >= 1e5 else f"  {s.parameters:,} parameters"
        ax.text(0.5, y + 0.2, head, fontsize=10, fontweight="bold", va="center")
        ax.text(0.5, y - 0.02, s.detail, fontsize=9, va="center")
        ax.text(0.5, y - 0.22, "out: " + _fmt(s.outputs), fontsize=9, va="center", family="monospace")
        if i:
            ax.add_patch(FancyArrowPatch((5, y + 0.7), (5, y + 0.48), arrowstyle="-|>", mutation_scale=12,
                                         color="#2a4d8f"))
    ax.set_title(title, fontsize=11)
    fig.tight_layout()
    return fig
