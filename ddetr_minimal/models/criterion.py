"""The set-prediction loss: match, then classify every query and regress the matched boxes.

After Hungarian matching (:mod:`ddetr_minimal.models.matcher`) each image's objects sit on
distinct queries; every other query is trained to predict "no object". Three losses:

* ``loss_ce``  -- classification over *all* queries: sigmoid focal loss (alpha 0.25,
  gamma 2) against one-hot targets with an all-zero row for "no object" (Deformable DETR,
  DETR+), or softmax cross-entropy with the "no object" class weighted by 0.1 (DETR);
* ``loss_bbox`` -- L1 distance between matched boxes (normalised cx, cy, w, h);
* ``loss_giou`` -- 1 - GIoU of matched boxes.

The focal, L1 and GIoU losses are summed and divided by the number of objects in the batch,
averaged over processes when training is distributed (at least 1). The same losses are
applied to every earlier decoder layer (suffix ``_0``, ``_1``, ...) and, in two-stage, to the
encoder proposals with every object relabelled class 0 (suffix ``_enc``).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss

from .matcher import HungarianMatcher, check_predictions, check_targets

LOSSES = ("loss_ce", "loss_bbox", "loss_giou")


def num_boxes_across_processes(targets: Sequence[Dict[str, torch.Tensor]], device: torch.device) -> float:
    """Objects per process, averaged over all processes when torch.distributed is initialised,
    clamped at 1 (a batch of empty images must not divide by zero)."""
    n = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
        n = n / dist.get_world_size()
    return n.clamp(min=1).item()


class SetCriterion(nn.Module):
    """Losses of DETR-style detectors.

    Args:
        num_classes: object classes (without "no object").
        matcher: a :class:`HungarianMatcher`.
        loss_weights: weights of ``loss_ce``, ``loss_bbox``, ``loss_giou``
            (default 2, 5, 2 for focal; 1, 5, 2 for cross-entropy, as in DETR).
        focal: sigmoid focal loss (True) or softmax cross-entropy with a no-object class.
        eos_coef: cross-entropy weight of the no-object class.
        focal_alpha, focal_gamma: focal-loss parameters.
        aux_layers: number of earlier decoder layers whose outputs are also supervised.
        two_stage: also supervise the encoder proposals.

    ``weight_dict`` holds the weight of every loss the criterion returns;
    :meth:`total_loss` sums them.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, loss_weights: Optional[Dict[str, float]] = None,
                 focal: bool = True, eos_coef: float = 0.1, focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                 aux_layers: int = 5, two_stage: bool = False):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes <= 0:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes, self.matcher, self.focal = num_classes, matcher, focal
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        base = dict(loss_weights or ({"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0} if focal
                                     else {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}))
        if sorted(base) != sorted(LOSSES):
            raise ValueError(f"loss_weights must have exactly the keys {LOSSES}, got {sorted(base)}")
        suffixes = [""] + [f"_{i}" for i in range(aux_layers)] + (["_enc"] if two_stage else [])
        self.weight_dict = {k + s: base[k] for s in suffixes for k in LOSSES}
        if not focal:
            empty_weight = torch.ones(num_classes + 1)
            empty_weight[-1] = eos_coef
            self.register_buffer("empty_weight", empty_weight)

    # ----------------------------------------------------------------------------------
    def loss_labels(self, logits: torch.Tensor, targets, indices, num_boxes: float) -> torch.Tensor:
        """Classification loss over all queries; logits (N, Lq, num_classes) focal or (N, Lq, num_classes + 1) softmax."""
        N, Lq, _ = logits.shape
        num_classes = self.num_classes
        target_classes = torch.full((N, Lq), num_classes, dtype=torch.int64, device=logits.device)  # num_classes = no object
        for b, (src, tgt) in enumerate(indices):
            target_classes[b, src.to(logits.device)] = targets[b]["labels"].to(logits.device)[tgt]
        if self.focal:
            onehot = F.one_hot(target_classes, num_classes + 1)[..., :num_classes].to(logits.dtype)  # (N, Lq, num_classes): no object = all zeros
            loss = sigmoid_focal_loss(logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum")
            return loss / num_boxes
        per_class = logits.transpose(1, 2)  # (N, num_classes + 1, Lq): classes on dim 1, as cross_entropy wants
        return F.cross_entropy(per_class, target_classes, weight=self.empty_weight.to(logits.dtype))

    def loss_boxes(self, boxes: torch.Tensor, targets, indices, num_boxes: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """L1 and GIoU losses of the matched boxes, each summed and divided by ``num_boxes``."""
        src = torch.cat([boxes[b, s.to(boxes.device)] for b, (s, _) in enumerate(indices)])  # (M, 4)
        tgt = torch.cat([targets[b]["boxes"].to(boxes.device)[t] for b, (_, t) in enumerate(indices)]).to(src.dtype)  # (M, 4)
        loss_bbox = F.l1_loss(src, tgt, reduction="sum") / num_boxes
        loss_giou = generalized_box_iou_loss(box_convert(src, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy"),
                                             reduction="sum") / num_boxes
        return loss_bbox, loss_giou

    def losses_of(self, outputs: Dict[str, torch.Tensor], targets, num_boxes: float) -> Dict[str, torch.Tensor]:
        """Match one set of predictions and return its three losses."""
        indices = self.matcher(outputs, targets)
        loss_bbox, loss_giou = self.loss_boxes(outputs["pred_boxes"], targets, indices, num_boxes)
        return {"loss_ce": self.loss_labels(outputs["pred_logits"], targets, indices, num_boxes),
                "loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def forward(self, outputs: Dict[str, object], targets: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """outputs: the model's dict; targets: one dict per image (``labels``, ``boxes``).
        Returns every individual loss (see :attr:`weight_dict` for their names)."""
        N, _ = check_predictions(outputs)
        expected = self.num_classes if self.focal else self.num_classes + 1
        if outputs["pred_logits"].shape[-1] != expected:
            kind = "focal (num_classes logits)" if self.focal else "cross-entropy (num_classes + 1 logits, last = no object)"
            raise ValueError(f"pred_logits has {outputs['pred_logits'].shape[-1]} classes but the criterion uses "
                             f"{kind} with num_classes={self.num_classes}: expected {expected}")
        check_targets(targets, N, self.num_classes)
        num_boxes = num_boxes_across_processes(targets, outputs["pred_logits"].device)
        losses = self.losses_of(outputs, targets, num_boxes)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update({f"{k}_{i}": v for k, v in self.losses_of(aux, targets, num_boxes).items()})
        if "enc_outputs" in outputs:
            # proposals are class-agnostic: every object is class 0
            binary = [dict(t, labels=torch.zeros_like(t["labels"])) for t in targets]
            losses.update({f"{k}_enc": v for k, v in self.losses_of(outputs["enc_outputs"], binary, num_boxes).items()})
        return losses

    def total_loss(self, losses: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Weighted sum of the losses; raises if a loss has no weight in :attr:`weight_dict`."""
        unknown = [k for k in losses if k not in self.weight_dict]
        if unknown:
            raise ValueError(f"losses {unknown} have no weight in weight_dict (keys: {sorted(self.weight_dict)}); "
                             "build the criterion with matching aux_layers / two_stage")
        return sum(self.weight_dict[k] * v for k, v in losses.items())
