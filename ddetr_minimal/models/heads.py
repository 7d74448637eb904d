"""Prediction heads and the one rule that ties a box to its reference point.

* :class:`MLP` -- the 3-layer box head of DETR (also the two-stage proposal head);
* :func:`focal_bias_prior` -- the class bias that starts every class at probability 0.01;
* :func:`inverse_sigmoid` -- logit, clamped so that 0 and 1 stay finite;
* :func:`box_from_reference` -- a box predicted *relative to* a reference point or box, in
  inverse-sigmoid space (paper, Appendix A.2), used by the detector's outputs and by iterative
  refinement alike;
* :func:`predictions` -- the dict every detector returns: last layer, plus the earlier layers.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

FOCAL_PRIOR = 0.01  # initial foreground probability of every class (RetinaNet's prior)
# initial width and height logit of boxes around a 2-d reference: sigmoid(-2) ~ 0.12 of the image
INITIAL_SIZE_LOGIT = -2.0


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU in between (the 3-layer box head of DETR)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


def focal_bias_prior(prior: float = FOCAL_PRIOR) -> float:
    """Bias b with sigmoid(b) = prior: -log((1 - prior) / prior) (about -4.6 for 0.01)."""
    return -math.log((1 - prior) / prior)


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """log(x / (1 - x)), clamped so that 0 and 1 stay finite."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def box_from_reference(delta: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The box ``(cx, cy, w, h)`` that the head output ``delta`` (..., 4) predicts around ``reference``.

    A 2-d reference (..., 2) is a point: the head moves the centre and predicts the size outright,
    ``sigmoid(delta + [inverse_sigmoid(ref_xy), 0, 0])``. A 4-d reference (..., 4) is a box
    (refinement, two-stage): the head refines all four, ``sigmoid(delta + inverse_sigmoid(ref))``.
    """
    if reference.shape[-1] == 4:
        return (delta + inverse_sigmoid(reference)).sigmoid()  # (..., 4)
    if reference.shape[-1] != 2:
        raise ValueError(f"reference must end in 2 (a point) or 4 (a box), got shape {tuple(reference.shape)}")
    centre = (delta[..., :2] + inverse_sigmoid(reference)).sigmoid()  # (..., 2)
    return torch.cat([centre, delta[..., 2:].sigmoid()], -1)  # (..., 4)


def predictions(logits: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor], aux_loss: bool) -> Dict[str, object]:
    """``{"pred_logits", "pred_boxes"}`` of the last decoder layer, and with ``aux_loss`` the
    earlier layers' as ``aux_outputs`` (a list of such dicts, first layer first)."""
    out: Dict[str, object] = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
    if aux_loss:
        aux: List[Dict[str, torch.Tensor]] = [
            {"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])
        ]
        out["aux_outputs"] = aux
    return out
