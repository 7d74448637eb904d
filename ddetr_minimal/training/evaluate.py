"""COCO box metrics of a checkpoint: ``python -m ddetr_minimal evaluate --checkpoint RUN/checkpoint.pth``.

The model is rebuilt from the hyper-parameters stored in the checkpoint, run over the
validation split of its dataset (or ``--data-path``), scored with pycocotools, printed, and
saved as JSON (default ``eval_<split>_epoch<E>.json`` beside the checkpoint; an existing
file is only replaced with ``--force``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils.data import DataLoader

from ..datasets.coco_eval import METRIC_NAMES
from ..datasets.coco import build_dataset, collate_fn
from .engine import evaluate
from .train import build_model_from_args


def evaluate_checkpoint(checkpoint, data_path=None, split: str = "val", batch_size: int = 8,
                        max_images: int | None = None, device: str = "cpu", progress: bool = True) -> dict:
    """Load ``checkpoint`` (a path written by ``ddetr_minimal.training.train``), evaluate it on
    ``split`` and return ``{"metrics": {...}, "epoch": E, ...}``."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("model", "args", "epoch"):
        if key not in ckpt:
            raise ValueError(f"checkpoint {str(path)!r} has no {key!r} entry; was it written by ddetr_minimal.training.train?")
    args = SimpleNamespace(**ckpt["args"])
    data_path = data_path or args.data_path
    dataset = build_dataset(data_path, split, args.preset, args.image_size or 256, max_images)
    args.pretrained_backbone = False  # the weights come from the checkpoint
    model, criterion, postprocessor = build_model_from_args(args, dataset.num_classes)
    model.load_state_dict(ckpt["model"])
    dev = torch.device(device)
    model.to(dev)
    criterion.to(dev)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    metrics = evaluate(model, criterion, postprocessor, loader, dataset, dev, progress=progress)
    return {"checkpoint": str(path), "epoch": ckpt["epoch"], "model": args.model, "split": split,
            "data_path": str(data_path), "num_images": len(dataset), "metrics": metrics}


def main(argv=None) -> dict:
    """Command line entry point: ``python -m ddetr_minimal evaluate --help``."""
    p = argparse.ArgumentParser(prog="python -m ddetr_minimal evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data-path", help="dataset root (default: the one the checkpoint was trained on)")
    p.add_argument("--split", default="val")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-images", type=int)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output", help="JSON file for the metrics (default beside the checkpoint)")
    p.add_argument("--force", action="store_true", help="replace an existing metrics file")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    result = evaluate_checkpoint(args.checkpoint, args.data_path, args.split, args.batch_size,
                                 args.max_images, args.device, args.progress)
    out = Path(args.output) if args.output else \
        Path(args.checkpoint).with_name(f"eval_{args.split}_epoch{result['epoch']}.json")
    if out.exists() and not args.force:
        p.error(f"{out} already exists; pass --force to replace it or --output to choose another file")
    m = result["metrics"]
    print(f"{result['model']} epoch {result['epoch']} on {result['num_images']} {args.split} images:")
    for name in METRIC_NAMES:
        print(f"  {name:6s} {100 * m[name]:6.2f}")
    out.write_text(json.dumps(result, indent=2))
    print(f"saved {out}")
    return result


if __name__ == "__main__":
    main()
