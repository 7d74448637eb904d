"""The training and evaluation loops (one epoch each), shared by ``train`` and ``evaluate``.

Both work on one process or under ``torch.distributed`` (each rank sees its shard of the
data; losses are averaged over ranks, detections gathered on every rank before pycocotools
scores them). ``amp=True`` runs the model under CUDA autocast (float16) with a gradient
scaler; the losses are always computed in float32.
"""
from __future__ import annotations

import math
import sys
from collections import defaultdict

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..datasets.coco_eval import coco_box_metrics, to_coco_results


def is_dist() -> bool:
    """True inside an initialised ``torch.distributed`` process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_dist() else 0


def targets_to(targets: list, device) -> list:
    """Move every tensor of every target dict to ``device``."""
    return [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]


def _to_float(obj):
    """Cast every floating tensor in a nested dict/list of model outputs to float32."""
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _to_float(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_float(v) for v in obj)
    return obj


def _reduce_mean(values: dict, count: int, device) -> dict:
    """Average running sums over all samples seen by all ranks."""
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys] + [float(count)], dtype=torch.float64, device=device)  # (num_classes + 1,)
    if is_dist():
        dist.all_reduce(t)
    return {k: float(t[i] / max(t[-1].item(), 1.0)) for i, k in enumerate(keys)}


def _progress(iterable, desc: str, enabled: bool):
    interactive = sys.stderr.isatty()
    return tqdm(iterable, desc=desc, disable=not enabled or rank() != 0, leave=False,
                mininterval=0.5 if interactive else 30.0, dynamic_ncols=True)


def train_one_epoch(model, criterion, loader, optimizer, device, epoch: int, clip_max_norm: float = 0.0,
                    scaler=None, amp: bool = False, progress: bool = True) -> dict:
    """Train for one pass over ``loader``; return the mean of every loss (unweighted) and of
    the weighted total ``loss`` over the epoch's images."""
    model.train()
    criterion.train()
    sums, count = defaultdict(float), 0
    bar = _progress(loader, f"epoch {epoch}", progress)
    for images, mask, targets in bar:
        images, mask, targets = images.to(device), mask.to(device), targets_to(targets, device)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
            outputs = model(images, mask)
        loss_dict = criterion(_to_float(outputs), targets)
        loss = criterion.total_loss(loss_dict)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch}; losses: "
                                     f"{ {k: v.item() for k, v in loss_dict.items()} }")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if clip_max_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_max_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        n = images.shape[0]
        count += n
        sums["loss"] += loss.item() * n
        for k, v in loss_dict.items():
            sums[k] += v.item() * n
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return _reduce_mean(sums, count, device)


@torch.no_grad()
def evaluate(model, criterion, postprocessor, loader, dataset, device, amp: bool = False,
             progress: bool = True) -> dict:
    """Run the model over ``loader`` and score it with pycocotools against ``dataset``'s
    ground truth. Returns the COCO metrics plus ``val_loss`` (the weighted total, when a
    ``criterion`` is given)."""
    model.eval()
    if criterion is not None:
        criterion.eval()
    results, sums, count = [], defaultdict(float), 0
    for images, mask, targets in _progress(loader, "eval", progress):
        images, mask, targets = images.to(device), mask.to(device), targets_to(targets, device)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
            outputs = model(images, mask)
        outputs = _to_float(outputs)
        if criterion is not None:
            loss = criterion.total_loss(criterion(outputs, targets))
            sums["val_loss"] += loss.item() * images.shape[0]
            count += images.shape[0]
        sizes = torch.stack([t["orig_size"] for t in targets])  # (N, 2) as (h, w)
        detections = postprocessor(outputs, sizes)
        detections = [{k: v.cpu() for k, v in d.items()} for d in detections]
        results += to_coco_results([t["image_id"] for t in targets], detections, dataset.cat_ids)
    if is_dist():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    # a distributed sampler repeats images to even out shards: keep each image's results once
    seen, unique = set(), []
    for r in results:
        key = (r["image_id"], r["category_id"], tuple(r["bbox"]), r["score"])
        if key not in seen:
            seen.add(key)
            unique.append(r)
    metrics = coco_box_metrics(dataset.coco_gt(), unique, dataset.image_ids())
    if criterion is not None:
        metrics.update(_reduce_mean(sums, count, device))
    return metrics
