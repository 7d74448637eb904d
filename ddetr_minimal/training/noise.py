"""How much of an AP difference is evaluation noise: the spread of COCO AP over random halves of
the validation images.

The AP of a trained model on ``n`` validation images is itself an estimate: another ``n`` images
drawn the same way give another number. Drawing half of the images without replacement many
times, the standard deviation of the AP over those halves approximates (for a fraction ``f``
of the images, times ``sqrt(f / (1 - f))``, which is 1 for halves) the standard error of the AP
on all ``n`` images. The repeated convergence experiment compares it with the spread between
seeds: when the seeds differ by more, the validation split is large enough.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..datasets.coco_eval import coco_box_metrics, to_coco_results
from .protocol import AP_KEYS, mean_sd


@torch.no_grad()
def coco_results(model, postprocessor, loader, dataset, device="cpu") -> list[dict]:
    """The model's detections on every image of ``loader`` as COCO result dicts."""
    model.eval()
    results = []
    for images, mask, targets in loader:
        outputs = model(images.to(device), mask.to(device))
        sizes = torch.stack([t["orig_size"] for t in targets])  # (N, 2) as (h, w)
        detections = [{k: v.cpu() for k, v in d.items()} for d in postprocessor(outputs, sizes.to(device))]
        results += to_coco_results([t["image_id"] for t in targets], detections, dataset.cat_ids)
    return results


def subset_spread(coco_gt, results: list[dict], image_ids, repeats: int = 20, fraction: float = 0.5,
                  seed: int = 0) -> dict:
    """``{metric: {"mean", "sd", ...}}`` of the AP metrics over ``repeats`` random subsets of
    ``fraction`` of ``image_ids``, plus ``standard_error`` (the sd scaled to all the images)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    if not isinstance(repeats, int) or repeats < 2:
        raise ValueError(f"repeats must be an integer >= 2, got {repeats!r}")
    ids = np.array(sorted(int(i) for i in image_ids))
    k = max(1, round(fraction * len(ids)))
    rng = np.random.default_rng(seed)
    rows = [coco_box_metrics(coco_gt, results, rng.choice(ids, size=k, replace=False).tolist()) for _ in range(repeats)]
    out = {key: mean_sd(r[key] for r in rows) for key in AP_KEYS}
    scale = math.sqrt(fraction / (1.0 - fraction))
    return {**out, "standard_error": {key: out[key]["sd"] * scale for key in AP_KEYS},
            "fraction": fraction, "repeats": repeats, "num_images": len(ids)}
