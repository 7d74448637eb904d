"""Hungarian matching between predictions and ground-truth objects (DETR, Sec. 3.1).

Every image has ``Lq`` predictions and ``n <= Lq`` objects. The matcher builds a ``Lq x n``
cost matrix and picks the one-to-one assignment of minimum total cost with
:func:`scipy.optimize.linear_sum_assignment`. The cost of pairing prediction ``i`` with
object ``j`` is a weighted sum of three terms::

    cost = w_class * C_class(i, j) + w_L1 * ||b_i - b_j||_1 + w_giou * (-GIoU(b_i, b_j))

``C_class`` is ``-p_i(c_j)`` for softmax models (DETR) and, for sigmoid/focal models
(Deformable DETR), the difference between the focal loss of calling class ``c_j`` positive
and of calling it negative::

    C_class = alpha (1 - p)^gamma (-log p) - (1 - alpha) p^gamma (-log(1 - p)),   p = sigmoid(logit_i[c_j])

The paper's weights are 2, 5, 2 (DETR's own: 1, 5, 2). Predictions left unmatched are
trained to be "no object".
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou

from ..ops.checks import shape_str


def check_targets(targets, batch_size: int, num_classes: int) -> None:
    """Raise a clear error unless ``targets`` is a list of ``batch_size`` dicts with
    ``labels`` (n,) int64 in [0, num_classes) and ``boxes`` (n, 4) float."""
    if not isinstance(targets, (list, tuple)) or len(targets) != batch_size:
        got = f"{type(targets).__name__} of length {len(targets)}" if isinstance(targets, (list, tuple)) else type(targets).__name__
        raise ValueError(f"targets must be a list of {batch_size} dicts (one per image), got {got}")
    for b, t in enumerate(targets):
        if not isinstance(t, dict) or "labels" not in t or "boxes" not in t:
            raise ValueError(f"targets[{b}] must be a dict with 'labels' and 'boxes', got {t if not isinstance(t, dict) else sorted(t)}")
        labels, boxes = t["labels"], t["boxes"]
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.dtype != torch.int64:
            got = f"dtype {labels.dtype} and shape {shape_str(labels)}" if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"targets[{b}]['labels'] must be an int64 tensor of shape (n,), got {got}")
        n = labels.shape[0]
        if not isinstance(boxes, torch.Tensor) or tuple(boxes.shape) != (n, 4) or not boxes.is_floating_point():
            got = f"dtype {boxes.dtype} and shape {shape_str(boxes)}" if isinstance(boxes, torch.Tensor) else type(boxes).__name__
            raise ValueError(f"targets[{b}]['boxes'] must be a float tensor of shape ({n}, 4) as normalised "
                             f"(cx, cy, w, h), got {got}")
        if n and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"targets[{b}]['labels'] must lie in [0, {num_classes}), got values "
                             f"from {labels.min().item()} to {labels.max().item()}")


def check_predictions(outputs: Dict[str, torch.Tensor]) -> Tuple[int, int]:
    """Check ``pred_logits`` (N, Lq, num_classes) and ``pred_boxes`` (N, Lq, 4); return (N, Lq)."""
    if not isinstance(outputs, dict) or "pred_logits" not in outputs or "pred_boxes" not in outputs:
        raise ValueError("outputs must be a dict with 'pred_logits' (N, Lq, num_classes) and 'pred_boxes' (N, Lq, 4)")
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    if logits.dim() != 3 or boxes.dim() != 3 or boxes.shape[-1] != 4 or logits.shape[:2] != boxes.shape[:2]:
        raise ValueError(f"pred_logits must have shape (N, Lq, num_classes) and pred_boxes (N, Lq, 4) with the same N, Lq; "
                         f"got {shape_str(logits)} and {shape_str(boxes)}")
    return logits.shape[0], logits.shape[1]


class HungarianMatcher(nn.Module):
    """Optimal one-to-one assignment of predictions to targets, image by image.

    Args:
        cost_class, cost_bbox, cost_giou: weights of the three cost terms.
        focal: sigmoid/focal class cost (Deformable DETR); False for softmax (DETR).
        focal_alpha, focal_gamma: the focal-loss parameters used in the class cost.
    """

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0, focal: bool = True,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("at least one of cost_class, cost_bbox, cost_giou must be non-zero")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.focal, self.focal_alpha, self.focal_gamma = focal, focal_alpha, focal_gamma

    def class_cost(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """logits (Lq, num_classes) or (Lq, num_classes + 1), labels (n,) -> (Lq, n)."""
        if self.focal:
            p = logits.sigmoid()  # (Lq, num_classes)
            a, g, eps = self.focal_alpha, self.focal_gamma, 1e-8
            pos = a * (1 - p) ** g * -(p + eps).log()  # (Lq, num_classes): focal loss if labelled positive
            neg = (1 - a) * p ** g * -(1 - p + eps).log()  # (Lq, num_classes): focal loss if labelled negative
            return pos[:, labels] - neg[:, labels]  # (Lq, n)
        return -logits.softmax(-1)[:, labels]  # (Lq, n)

    def cost_matrix(self, logits: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
                    target_boxes: torch.Tensor) -> torch.Tensor:
        """The (Lq, n) matching cost of one image: logits (Lq, num_classes[+1]), boxes (Lq, 4), labels (n,),
        target_boxes (n, 4), boxes as normalised (cx, cy, w, h)."""
        c_class = self.class_cost(logits, labels)  # (Lq, n)
        c_bbox = torch.cdist(boxes, target_boxes.to(boxes.dtype), p=1)  # (Lq, n)
        c_giou = -generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"),
                                      box_convert(target_boxes.to(boxes.dtype), "cxcywh", "xyxy"))  # (Lq, n)
        return self.cost_class * c_class + self.cost_bbox * c_bbox + self.cost_giou * c_giou

    @torch.no_grad()
    def forward(self, outputs: Dict[str, torch.Tensor], targets: Sequence[Dict[str, torch.Tensor]]
                ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Match every image; returns one (pred_indices, target_indices) int64 pair per image,
        both of length min(Lq, n): prediction ``pred_indices[k]`` is paired with object
        ``target_indices[k]``. Images without objects give two empty tensors."""
        N, Lq = check_predictions(outputs)
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        num_classes = logits.shape[-1] if self.focal else logits.shape[-1] - 1
        check_targets(targets, N, num_classes)
        indices = []
        for b, t in enumerate(targets):
            labels, target_boxes = t["labels"].to(logits.device), t["boxes"].to(logits.device)
            if labels.numel() == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            cost = self.cost_matrix(logits[b].float(), boxes[b].float(), labels, target_boxes.float())  # (Lq, n)
            why = [f"{name} holds NaN/inf" for name, t in (("pred_logits", logits[b]), ("pred_boxes", boxes[b]),
                                                             (f"targets[{b}]['boxes']", target_boxes))
                   if not torch.isfinite(t).all()]
            bad = (~torch.isfinite(cost)).sum().item()
            if why or bad:
                raise ValueError(
                    f"cannot match image {b}: {'; '.join(why) or 'degenerate (zero-area) boxes make GIoU undefined'} "
                    f"({bad} of the {cost.numel()} matching costs, shape {shape_str(cost)}, are not finite). "
                    "Non-finite predictions usually mean training diverged (lower the learning rate, clip gradients)."
                )
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices
