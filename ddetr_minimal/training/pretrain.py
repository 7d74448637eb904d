"""Pretrain the small CNN backbone: which shape lies under each feature cell?

The paper's detectors start from a ResNet-50 pretrained on ImageNet classification; only the
transformer starts from random weights. The toy experiments cannot download such weights, so
this module makes the toy analogue: it trains :class:`~ddetr_minimal.models.backbone.SmallBackbone`
to label every cell of its three maps (strides 8, 16 and 32) with the class of the object box
covering the cell's centre, or background, through one 1x1 convolution per level, so all
three maps the detectors read are trained. At each level the cells of objects wider than that map's
receptive field (31, 79, 175 px at strides 8, 16, 32) are ignored: inside a large object a
stride-8 cell sees only uniform colour, and asking it for the shape drowned the small objects'
signal (26 % cell accuracy at stride 8 when every object was labelled everywhere). (Image-level labels alone, "which shapes does the
image contain", left this backbone at chance after several epochs; the per-cell labels teach
it in minutes.) It trains on a toy dataset of its own, generated with another seed, so the
detectors' validation images are never seen.

Command line::

    python -m ddetr_minimal pretrain --data data/toy_pretrain --out data/runs/backbone.pth --epochs 12

and then ``python -m ddetr_minimal train ... --backbone-weights data/runs/backbone.pth``.

The file holds ``{"backbone": state_dict, "channels": [...], "class_names": [...],
"history": [per-epoch loss and validation accuracy]}``, written atomically.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..models.backbone import SmallBackbone
from ..datasets.coco import build_dataset, collate_fn
from ..datasets.synthetic import SIZE_BUCKETS, size_bucket
from ..measure.records import save_atomic


class CellClassifier(nn.Module):
    """A backbone plus a 1x1 convolution per level that labels every feature cell with the class
    of the object covering it, or background (class ``num_classes``).
    Returns a list of (N, num_classes + 1, H_l, W_l) logits, one per level."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleList(nn.Conv2d(c, num_classes + 1, 1) for c in backbone.num_channels)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        features, _ = self.backbone(images, mask)
        return [head(f) for f, head in zip(features, self.heads)]


# receptive field (pixels) of the small CNN's maps at strides 8, 16, 32: 3x3 convolutions,
# two per stage, the first of each with stride 2 (see SmallBackbone)
RECEPTIVE_FIELDS = (31, 79, 175)


def cell_targets(targets: list[dict], mask: torch.Tensor, shape: tuple[int, int], num_classes: int,
                 max_side: float | None = None, return_buckets: bool = False):
    """(N, h, w) int64 labels of the cells of a ``shape`` map: the class of the smallest box that
    contains the cell's centre, ``num_classes`` for background, -100 (ignored) on padding.

    ``max_side`` (pixels): the cells of a box whose longer side exceeds it are ignored (-100)
    unless a smaller box covers them -- a map whose receptive field is narrower than an object
    sees only a patch of uniform colour there and cannot tell its shape. With
    ``return_buckets`` also returns (N, h, w) int64: the size bucket (0 small, 1 medium,
    2 large) of the box that labels each cell, -1 elsewhere."""
    N, (h, w) = len(targets), shape
    H, W = mask.shape[-2:]
    out = torch.full((N, h, w), num_classes, dtype=torch.long)
    buckets = torch.full((N, h, w), -1, dtype=torch.long)
    ys = (torch.arange(h) + 0.5) * H / h  # cell centres in padded-image pixels
    xs = (torch.arange(w) + 0.5) * W / w
    for i, t in enumerate(targets):
        ih, iw = (int(v) for v in t["size"])  # the image before padding
        boxes = t["boxes"] * torch.tensor([iw, ih, iw, ih], dtype=t["boxes"].dtype)  # (n, 4) cx, cy, w, h pixels
        for j in (boxes[:, 2] * boxes[:, 3]).argsort(descending=True):  # small boxes drawn last, on top
            cx, cy, bw, bh = boxes[j].tolist()
            inside_y = (ys >= cy - bh / 2) & (ys < cy + bh / 2)
            inside_x = (xs >= cx - bw / 2) & (xs < cx + bw / 2)
            cells = inside_y[:, None] & inside_x[None, :]  # (h, w)
            too_large = max_side is not None and max(bw, bh) > max_side
            out[i][cells] = -100 if too_large else int(t["labels"][j])
            buckets[i][cells] = -1 if too_large else SIZE_BUCKETS.index(size_bucket(bw * bh))
        pad = (ys >= ih)[:, None] | (xs >= iw)[None, :]
        out[i][pad] = -100
        buckets[i][pad] = -1
    return (out, buckets) if return_buckets else out


def cell_loss(logits: list[torch.Tensor], targets: list[dict], mask: torch.Tensor, num_classes: int,
              max_sides=RECEPTIVE_FIELDS) -> torch.Tensor:
    """Cross-entropy summed over levels; at level l the cells of objects larger than
    ``max_sides[l]`` are ignored (None: none). Background cells get a weight that makes their
    total equal to the object cells' (at most 1): at stride 8 a small object covers a few of
    1,024 cells, and a fixed weight let the background win every cell."""
    sides = max_sides if max_sides is not None else [None] * len(logits)
    total = 0.0
    for lg, side in zip(logits, sides):
        lb = cell_targets(targets, mask, lg.shape[-2:], num_classes, side).to(lg.device)  # (N, h, w)
        per_cell = F.cross_entropy(lg, lb, ignore_index=-100, reduction="none")  # (N, h, w)
        fg, bg = (lb >= 0) & (lb < num_classes), lb == num_classes
        w_bg = min(1.0, fg.sum().item() / max(bg.sum().item(), 1))
        weight = fg.float() + w_bg * bg.float()
        total = total + (per_cell * weight).sum() / weight.sum().clamp(min=1e-6)
    return total


@torch.no_grad()
def accuracy(model: CellClassifier, loader, num_classes: int) -> dict:
    """Per level (strides 8, 16, 32), on the cells that lie in an object box: the accuracy
    (``object_cell_accuracy``: the arg-max over the classes and background is the object's
    class), and per size bucket small, medium, large ``bucket_cell_accuracy[level][bucket]`` and
    ``bucket_shape_accuracy[level][bucket]`` (the arg-max over the object classes only: does
    the map tell the shape), None where a level has no such cell, with ``bucket_cells``.
    Every object is counted at every level here, whatever the training ignored."""
    model.eval()
    right, shape_right, total = torch.zeros(3, 3), torch.zeros(3, 3), torch.zeros(3, 3)  # (level, bucket)
    for imgs, mask, targets in loader:
        logits = model(imgs, mask)
        for lvl, lg in enumerate(logits):
            lb, bk = cell_targets(targets, mask, lg.shape[-2:], num_classes, return_buckets=True)
            hit, shape_hit = lg.argmax(1) == lb, lg[:, :num_classes].argmax(1) == lb
            for b in range(3):
                right[lvl, b] += (hit & (bk == b)).sum()
                shape_right[lvl, b] += (shape_hit & (bk == b)).sum()
                total[lvl, b] += (bk == b).sum()

    def ratio(num):
        return [[(r / t).item() if t > 0 else None for r, t in zip(rr, tt)] for rr, tt in zip(num, total)]

    return {"object_cell_accuracy": (right.sum(1) / total.sum(1).clamp(min=1)).tolist(),
            "bucket_cell_accuracy": ratio(right), "bucket_shape_accuracy": ratio(shape_right),
            "bucket_cells": total.long().tolist()}


def pretrain(data, out, epochs: int = 4, batch_size: int = 8, lr: float = 1e-3, weight_decay: float = 1e-4,
             channels=(32, 64, 128), image_size: int | None = None, seed: int = 0, threads: int | None = None,
             log=print, max_sides=RECEPTIVE_FIELDS) -> dict:
    """Train the backbone on the toy dataset at ``data`` and write it to ``out``; return what was saved
    (without the weights). Refuses to overwrite ``out``. ``max_sides``: per level, the largest
    object side labelled there (default: the maps' receptive fields; None labels every object
    at every level)."""
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; remove it or choose another --out")
    if threads:
        torch.set_num_threads(threads)
    if image_size is None:
        info = Path(data) / "dataset_info.json"
        image_size = json.loads(info.read_text())["image_size"] if info.is_file() else 256
    torch.manual_seed(seed)
    train_set = build_dataset(data, "train", "toy", image_size)
    val_set = build_dataset(data, "val", "toy", image_size)
    k = train_set.num_classes
    batch_size = min(batch_size, len(train_set))  # a tiny dataset still gives one step per epoch
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, collate_fn=collate_fn, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    val_loader = DataLoader(val_set, batch_size=batch_size, collate_fn=collate_fn)
    model = CellClassifier(SmallBackbone(channels), k)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * len(loader),
                                                    pct_start=0.1)
    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        t0, total, n = time.time(), 0.0, 0
        for imgs, mask, targets in loader:
            loss = cell_loss(model(imgs, mask), targets, mask, k, max_sides)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total, n = total + loss.item(), n + 1
        row = {"epoch": epoch, "loss": total / n, **accuracy(model, val_loader, k),
               "seconds": round(time.time() - t0, 1)}
        history.append(row)
        acc = ", ".join(f"{100 * a:.1f}" for a in row["object_cell_accuracy"])
        def pct(key):
            return ", ".join("-" if lv[0] is None else f"{100 * lv[0]:.1f}" for lv in row[key])
        log(f"pretrain epoch {epoch}/{epochs}: loss {row['loss']:.4f}, validation accuracy on object cells "
            f"at strides 8, 16, 32: {acc} %, on small-object cells: {pct('bucket_cell_accuracy')} % "
            f"(shape only: {pct('bucket_shape_accuracy')} %) ({row['seconds']:.0f}s)")
    record = {"channels": list(channels), "class_names": train_set.class_names, "image_size": image_size,
              "data": str(data), "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
              "max_sides": list(max_sides) if max_sides is not None else None,
              "history": history}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_atomic({"backbone": model.backbone.state_dict(), **record}, out)
    return record


def load_backbone_weights(backbone: nn.Module, path) -> dict:
    """Load what :func:`pretrain` saved into ``backbone`` (strict); return the file's record."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights {path} do not exist (make them with python -m ddetr_minimal pretrain)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "backbone" not in ckpt:
        raise ValueError(f"{path} is not a file written by ddetr_minimal.training.pretrain (no 'backbone' entry)")
    try:
        backbone.load_state_dict(ckpt["backbone"])
    except RuntimeError as err:
        raise ValueError(f"backbone weights {path} do not fit this backbone (channels {ckpt.get('channels')}): "
                         f"{err}") from None
    return {k: v for k, v in ckpt.items() if k != "backbone"}


def main(argv=None) -> None:
    """``python -m ddetr_minimal pretrain --help``."""
    p = argparse.ArgumentParser(prog="python -m ddetr_minimal pretrain", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="a toy dataset folder (python -m ddetr_minimal synthetic)")
    p.add_argument("--out", required=True, help="where the backbone weights go (never overwritten)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    try:
        pretrain(args.data, args.out, args.epochs, args.batch_size, args.lr, seed=args.seed, threads=args.threads)
    except (FileExistsError, ValueError) as err:
        p.error(str(err))


if __name__ == "__main__":
    main()
