"""COCO box AP with pycocotools: turn detections into COCO results and run ``COCOeval``.

The metrics are the standard twelve numbers of ``COCOeval.summarize()``; we name the six the
papers report (``AP``, ``AP50``, ``AP75``, ``AP_S``, ``AP_M``, ``AP_L``) and the recalls.
Values are fractions in [0, 1] (multiply by 100 for the papers' convention); pycocotools
writes -1 for a size bucket without ground truth. :func:`recall_by_size` counts the objects
found per size bucket at one IoU and a fixed number of detections per image.
"""
from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import torch
from pycocotools.cocoeval import COCOeval

from ..ops.checks import check_positive_ints
from .synthetic import SIZE_BUCKETS, size_bucket  # noqa: F401  (COCO's buckets, used with recall_by_size)

METRIC_NAMES = ("AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L", "AR1", "AR10", "AR100", "AR_S", "AR_M", "AR_L")


def to_coco_results(image_ids, detections, label_to_cat_id) -> list[dict]:
    """COCO result dicts from per-image detections.

    ``detections[i]`` holds ``scores (n,)``, ``labels (n,)`` (contiguous) and ``boxes (n, 4)``
    pixel ``xyxy`` in the original image of ``image_ids[i]``; ``label_to_cat_id`` maps a
    contiguous label back to its COCO category id.
    """
    if len(image_ids) != len(detections):
        raise ValueError(f"image_ids has {len(image_ids)} entries but detections has {len(detections)}")
    results = []
    for image_id, det in zip(image_ids, detections):
        boxes = torch.as_tensor(det["boxes"], dtype=torch.float64).reshape(-1, 4)  # (n, 4) xyxy
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)  # (n, 4) xywh
        for score, label, box in zip(det["scores"].tolist(), det["labels"].tolist(), xywh.tolist()):
            results.append({"image_id": int(image_id), "category_id": int(label_to_cat_id[int(label)]),
                            "bbox": [round(v, 3) for v in box], "score": float(score)})
    return results


def coco_box_metrics(coco_gt, results: list[dict], image_ids=None) -> dict:
    """Run pycocotools' box evaluation of ``results`` against ``coco_gt`` (a ``COCO`` object)
    on ``image_ids`` (default: all ground-truth images); return ``{name: value}`` for
    :data:`METRIC_NAMES`. With no detections at all every AP and AR is 0."""
    ids = sorted(coco_gt.getImgIds() if image_ids is None else {int(i) for i in image_ids})
    if not results:
        return {name: 0.0 for name in METRIC_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.imgIds = ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = np.asarray(ev.stats, dtype=float)
    return {name: float(v) for name, v in zip(METRIC_NAMES, stats)}


def format_metrics(metrics: dict) -> str:
    """One line with the six AP numbers, in percent."""
    return "  ".join(f"{k} {100 * metrics[k]:.1f}" for k in METRIC_NAMES[:6] if k in metrics)


def pixel_ground_truth(targets) -> list[dict]:
    """The dataset's targets (boxes normalised (cx, cy, w, h)) as ``{"labels", "boxes"}`` with
    boxes in pixel xyxy of each original image (``orig_size``), as detections are."""
    from torchvision.ops import box_convert

    out = []
    for t in targets:
        h, w = (float(v) for v in t["orig_size"])
        boxes = box_convert(t["boxes"].double(), "cxcywh", "xyxy") * torch.tensor([w, h, w, h], dtype=torch.float64)
        out.append({"labels": t["labels"], "boxes": boxes})  # (n,), (n, 4)
    return out


def recall_by_size(detections, ground_truth, iou: float = 0.5, top_k: int = 10) -> dict:
    """The share of ground-truth objects found, per COCO size bucket.

    ``detections[i]`` holds ``scores``, ``labels`` and ``boxes`` (n, 4) pixel xyxy of image
    ``i``; ``ground_truth[i]`` holds ``labels`` and ``boxes`` (m, 4) pixel xyxy. Only the
    ``top_k`` highest-scoring detections of an image count. As in COCO's evaluation, detections
    are taken best first and each claims the unclaimed object of its class with which it has the
    highest IoU, if that IoU is at least ``iou``. Returns ``{bucket: {"found", "total",
    "recall"}}`` (recall None for an empty bucket), buckets by the box area ``w * h``.
    """
    from torchvision.ops import box_iou

    if len(detections) != len(ground_truth):
        raise ValueError(f"detections has {len(detections)} images but ground_truth has {len(ground_truth)}")
    if not 0.0 < iou <= 1.0:
        raise ValueError(f"iou must be in (0, 1], got {iou!r}")
    check_positive_ints(top_k=top_k)
    counts = {b: {"found": 0, "total": 0} for b in SIZE_BUCKETS}
    for det, gt in zip(detections, ground_truth):
        gt_boxes = torch.as_tensor(gt["boxes"], dtype=torch.float64).reshape(-1, 4)  # (m, 4)
        gt_labels = torch.as_tensor(gt["labels"]).reshape(-1)  # (m,)
        order = torch.as_tensor(det["scores"]).argsort(descending=True)[:top_k]
        boxes = torch.as_tensor(det["boxes"], dtype=torch.float64).reshape(-1, 4)[order]  # (k, 4)
        labels = torch.as_tensor(det["labels"]).reshape(-1)[order]  # (k,)
        found = torch.zeros(len(gt_boxes), dtype=torch.bool)
        if len(gt_boxes) and len(boxes):
            overlaps = box_iou(boxes, gt_boxes)  # (k, m)
            for d in range(len(boxes)):
                cand = (~found) & (gt_labels == labels[d]) & (overlaps[d] >= iou)  # (m,)
                if cand.any():
                    found[int(torch.where(cand, overlaps[d], -1.0).argmax())] = True
        areas = (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])  # (m,)
        for a, f in zip(areas.tolist(), found.tolist()):
            counts[size_bucket(a)]["total"] += 1
            counts[size_bucket(a)]["found"] += int(f)
    return {b: {**c, "recall": c["found"] / c["total"] if c["total"] else None} for b, c in counts.items()}
