"""From network outputs to detections in pixels (COCO result lists: :mod:`ddetr_minimal.datasets.coco_eval`).

Sigmoid models (Deformable DETR, DETR+) score every (query, class) pair independently, so a
query may contribute several detections with different classes: the ``k`` best pairs over
all ``Lq x num_classes`` pairs are kept (k = 100, COCO's maximum per image). Softmax models (DETR) give one
detection per query: its most likely real class.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn
from torchvision.ops import box_convert

from .matcher import check_predictions
from ..ops.checks import shape_str


class PostProcess(nn.Module):
    """Convert outputs to ``[{"scores": (k,), "labels": (k,), "boxes": (k, 4)}, ...]``.

    Args:
        num_select: detections kept per image for sigmoid models (top-k over queries x classes).
        focal: sigmoid outputs (True) or softmax with a trailing no-object class (False).

    Boxes are absolute ``(x1, y1, x2, y2)`` pixels of the size given in ``target_sizes``;
    use the original image size for COCO evaluation.
    """

    def __init__(self, num_select: int = 100, focal: bool = True):
        super().__init__()
        if not isinstance(num_select, int) or num_select <= 0:
            raise ValueError(f"num_select must be a positive integer, got {num_select!r}")
        self.num_select, self.focal = num_select, focal

    @torch.no_grad()
    def forward(self, outputs: Dict[str, torch.Tensor], target_sizes: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
        """outputs: ``pred_logits`` (N, Lq, num_classes[+1]), ``pred_boxes`` (N, Lq, 4); target_sizes (N, 2) as (h, w)."""
        N, Lq = check_predictions(outputs)
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        target_sizes = torch.as_tensor(target_sizes, device=boxes.device)
        if target_sizes.dim() != 2 or tuple(target_sizes.shape) != (N, 2):
            raise ValueError(f"target_sizes must have shape ({N}, 2) holding (h, w) per image, got {shape_str(target_sizes)}")
        if self.focal:
            num_classes = logits.shape[-1]
            prob = logits.sigmoid().flatten(1)  # (N, Lq*num_classes)
            scores, idx = prob.topk(min(self.num_select, Lq * num_classes), dim=1)  # (N, k)
            query, labels = idx // num_classes, idx % num_classes  # (N, k) each
            boxes = torch.gather(boxes, 1, query[..., None].expand(-1, -1, 4))  # (N, k, 4)
        else:
            scores, labels = logits.softmax(-1)[..., :-1].max(-1)  # (N, Lq): best real class per query
        xyxy = box_convert(boxes, "cxcywh", "xyxy")  # (N, k, 4) normalised
        h, w = target_sizes.to(xyxy.dtype).unbind(1)  # (N,) each
        xyxy = xyxy * torch.stack([w, h, w, h], 1)[:, None, :]  # (N, k, 4) pixels
        return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, xyxy)]
