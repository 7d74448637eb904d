"""COCO box AP with pycocotools: turn detections into COCO results and run ``COCOeval``.

The metrics are the standard twelve numbers of ``COCOeval.summarize()``; we name the six the
papers report (``AP``, ``AP50``, ``AP75``, ``AP_S``, ``AP_M``, ``AP_L``) and the recalls.
Values are fractions in [0, 1] (multiply by 100 for the papers' convention); pycocotools
writes -1 for a size bucket without ground truth.
"""
from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import torch
from pycocotools.cocoeval import COCOeval

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
