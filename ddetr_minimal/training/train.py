"""Train DETR or Deformable DETR: ``python -m ddetr_minimal train --model deformable``.

Presets fill every hyper-parameter; any flag given on the command line wins.

* ``toy``  -- the toy shapes dataset (``data/toy``) on a CPU: small CNN backbone trained from
  scratch, a narrow transformer (width 64, 4 heads, 2 encoder + 3 decoder layers, no
  dropout), 30 queries, AdamW lr 2e-4 everywhere but the sampling offsets and reference
  points (0.1 x), batch 4, 50 epochs with the lr divided by 10 after epoch 40.
* ``coco`` -- the paper's recipe: ResNet-50 (ImageNet weights), 6+6 layers, width 256, AdamW
  with lr 2e-4, backbone lr 2e-5, sampling offsets and reference points at 0.1 x lr, weight
  decay 1e-4, gradient clipping 0.1, batch 4 per process (32 on the paper's 8 GPUs), 50 epochs with the lr divided by 10
  after epoch 40, 300 queries.

What lands in ``--output-dir``:

* ``config.json``   the resolved hyper-parameters;
* ``metrics.jsonl`` one JSON line per epoch: train losses, lr, seconds, and the COCO metrics
  (``AP``, ``AP50``, ``AP75``, ``AP_S``, ``AP_M``, ``AP_L``, ...) on evaluation epochs;
* ``checkpoint.pth`` after every epoch, written to a temporary file then moved into place
  with ``os.replace`` so a crash never leaves a half-written checkpoint. It holds the model,
  optimizer, scheduler, gradient scaler, the number of finished epochs and every random
  state (torch, CUDA, numpy, Python, the data loader's generator; one set per rank).

``--backbone-weights FILE`` starts the backbone from :mod:`ddetr_minimal.training.pretrain`'s output
(the toy experiments' stand-in for ImageNet weights); ``--lr-backbone`` sets its learning rate.

``--pretrained NAME_OR_PATH`` fine-tunes a released COCO model (or any checkpoint in the
official or Hugging Face layout) on the dataset, with its own classes: the architecture and
every tensor but the class heads come from the checkpoint, and the learning rates are the
paper's unless given (see :mod:`ddetr_minimal.training.finetune`).

``--resume`` continues from ``checkpoint.pth`` exactly where it stopped (on a CPU the weights
after 1 + 1 resumed epochs equal those after 2 straight ones). An output folder that already
holds a checkpoint or metrics is never overwritten unless ``--resume`` or ``--force``.

Several processes: ``torchrun --nproc_per_node=2 -m ddetr_minimal train ...`` (gloo on a CPU,
NCCL on GPUs). ``--amp`` runs the model in float16 on a GPU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from ..datasets.coco_eval import format_metrics
from ..datasets.coco import build_dataset, collate_fn
from . import finetune
from .engine import evaluate, is_dist, rank, train_one_epoch
from .pretrain import load_backbone_weights
from ..measure.records import save_atomic

CHECKPOINT = "checkpoint.pth"
METRICS = "metrics.jsonl"
CONFIG = "config.json"

PRESETS = {
    "toy": dict(data_path="data/toy", backbone="small", pretrained_backbone=False, d_model=64, n_heads=4,
                enc_layers=2, dec_layers=3, dim_feedforward=256, dropout=0.0, num_queries=30, n_points=4, n_levels=4,
                lr=2e-4, lr_backbone=2e-4, lr_linear_proj_mult=0.1, weight_decay=1e-4, clip_max_norm=0.1,
                batch_size=4, epochs=50, lr_drop=40, eval_every=5, image_size=None),
    "coco": dict(data_path=None, backbone="resnet50", pretrained_backbone=True, d_model=256, n_heads=8,
                 enc_layers=6, dec_layers=6, dim_feedforward=1024, dropout=0.1, num_queries=300, n_points=4, n_levels=4,
                 lr=2e-4, lr_backbone=2e-5, lr_linear_proj_mult=0.1, weight_decay=1e-4, clip_max_norm=0.1,
                 batch_size=4, epochs=50, lr_drop=40, eval_every=1, image_size=None),
}
# names of parameters trained at lr * lr_linear_proj_mult (as in the paper's code release)
LINEAR_PROJ_NAMES = ("sampling_offsets", "reference_points")


def build_parser() -> argparse.ArgumentParser:
    """The command line; preset-dependent flags default to ``None`` and are filled later."""
    p = argparse.ArgumentParser(prog="python -m ddetr_minimal train",
                                description="Train DETR or Deformable DETR on a COCO-layout dataset.")
    p.add_argument("--model", required=True, choices=["deformable", "detr"])
    p.add_argument("--preset", default="toy", choices=sorted(PRESETS))
    p.add_argument("--data-path", help="COCO-layout dataset root (toy: data/toy; coco: the COCO 2017 folder)")
    p.add_argument("--output-dir", help="where checkpoints and metrics go (default data/runs/<model>)")
    p.add_argument("--resume", action="store_true", help="continue from <output-dir>/checkpoint.pth")
    p.add_argument("--force", action="store_true", help="discard an existing checkpoint and metrics in output-dir")
    g = p.add_argument_group("schedule")
    for name, typ in (("epochs", int), ("lr_drop", int), ("batch_size", int), ("eval_every", int),
                      ("lr", float), ("lr_backbone", float), ("lr_linear_proj_mult", float),
                      ("weight_decay", float), ("clip_max_norm", float)):
        g.add_argument("--" + name.replace("_", "-"), type=typ, dest=name)
    m = p.add_argument_group("model")
    m.add_argument("--backbone", choices=["resnet50", "resnet101", "small"])
    m.add_argument("--pretrained-backbone", dest="pretrained_backbone", action="store_true", default=None)
    m.add_argument("--no-pretrained-backbone", dest="pretrained_backbone", action="store_false")
    m.add_argument("--pretrained", metavar="NAME_OR_PATH",
                   help="fine-tune from released weights: a release name (deformable_detr, deformable_detr_refine, "
                   "deformable_detr_two_stage, deformable_detr_single_scale; downloaded once) or a checkpoint file "
                   "or Hugging Face folder; new class heads for this dataset")
    m.add_argument("--backbone-weights", help="start the backbone from a file written by python -m "
                   "ddetr_minimal.training.pretrain (the small CNN's analogue of ImageNet weights)")
    for name, typ in (("d_model", int), ("n_heads", int), ("enc_layers", int), ("dec_layers", int),
                      ("dim_feedforward", int), ("dropout", float), ("num_queries", int), ("n_points", int),
                      ("n_levels", int)):
        m.add_argument("--" + name.replace("_", "-"), type=typ, dest=name)
    m.add_argument("--with-box-refine", action="store_true", help="iterative bounding-box refinement")
    m.add_argument("--two-stage", action="store_true", help="two-stage Deformable DETR")
    m.add_argument("--detr-focal", action="store_true", help="DETR with the focal classification loss")
    m.add_argument("--no-aux-loss", dest="aux_loss", action="store_false", help="no per-decoder-layer losses")
    r = p.add_argument_group("run")
    r.add_argument("--eval-epochs", help="comma-separated epochs to evaluate at, besides every --eval-every")
    r.add_argument("--save-epochs", help="comma-separated epochs whose model weights are also kept, in half "
                   "precision, as <output-dir>/model_e<epoch>.pth (0: the initialisation)")
    r.add_argument("--image-size", type=int, help="toy image side, sets the random crop (default: read from "
                   "the dataset's dataset_info.json, else 256)")
    r.add_argument("--max-train-images", type=int, help="use only the first N training images")
    r.add_argument("--max-val-images", type=int, help="evaluate on the first N validation images only")
    r.add_argument("--num-workers", type=int, default=0)
    r.add_argument("--seed", type=int, default=42)
    r.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    r.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    r.add_argument("--amp", action="store_true", help="float16 autocast and gradient scaling (CUDA only)")
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")
    return p


def resolve_args(argv=None) -> argparse.Namespace:
    """Parse ``argv`` and fill every unset flag from the preset; check the combination."""
    args = build_parser().parse_args(argv)
    args.flags_given = sorted([k for k in PRESETS[args.preset] if getattr(args, k, None) is not None]
                              + [k for k in ("with_box_refine", "two_stage") if getattr(args, k)])
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.data_path is None:
        raise SystemExit("--data-path is required with --preset coco (the COCO 2017 root folder)")
    if args.image_size is None:
        info = Path(args.data_path) / "dataset_info.json"
        args.image_size = json.loads(info.read_text())["image_size"] if info.is_file() else 256
    for name in ("eval_epochs", "save_epochs"):
        text = getattr(args, name)
        try:
            setattr(args, name, sorted({int(e) for e in text.split(",") if e.strip()}) if text else [])
        except ValueError:
            raise SystemExit(f"--{name.replace('_', '-')} must be comma-separated integers, got {text!r}") from None
    if any(not 0 <= e <= args.epochs for e in args.save_epochs):
        raise SystemExit(f"--save-epochs must lie in 0..{args.epochs} (--epochs), got {args.save_epochs}")
    if args.output_dir is None:
        args.output_dir = os.path.join("data", "runs", args.model)
    if args.model == "detr" and (args.with_box_refine or args.two_stage):
        raise SystemExit("--with-box-refine and --two-stage are Deformable DETR options; got --model detr")
    if args.resume and args.force:
        raise SystemExit("--resume and --force contradict each other; pick one")
    for name in ("epochs", "batch_size", "eval_every"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


# --------------------------------------------------------------------------------------
# pieces
# --------------------------------------------------------------------------------------
def init_distributed(device_name: str) -> tuple[int, int]:
    """Join the process group when started by torchrun; return ``(rank, world_size)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not is_dist():
        backend = "nccl" if device_name.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
    return (dist.get_rank(), dist.get_world_size()) if is_dist() else (0, 1)


def build_model_from_args(args, num_classes: int):
    """``(model, criterion, postprocessor)`` for the resolved arguments."""
    from ..models.build import build_model

    return build_model(args.model, num_classes=num_classes, backbone=args.backbone,
                       pretrained_backbone=args.pretrained_backbone, with_box_refine=args.with_box_refine,
                       two_stage=args.two_stage, d_model=args.d_model, n_heads=args.n_heads,
                       enc_layers=args.enc_layers, dec_layers=args.dec_layers,
                       dim_feedforward=args.dim_feedforward, dropout=args.dropout,
                       num_queries=args.num_queries, n_points=args.n_points, aux_loss=args.aux_loss,
                       detr_focal=args.detr_focal, n_levels=getattr(args, "n_levels", 4))


def param_groups(model: torch.nn.Module, lr: float, lr_backbone: float, lr_linear_proj_mult: float) -> list:
    """Three AdamW groups: the backbone at ``lr_backbone`` (frozen when it is 0), the sampling
    offsets and reference points at ``lr * lr_linear_proj_mult``, everything else at ``lr``."""
    groups = {"backbone": [], "linear_proj": [], "rest": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "backbone" in name:
            if lr_backbone <= 0:
                p.requires_grad_(False)
                continue
            groups["backbone"].append(p)
        elif any(key in name for key in LINEAR_PROJ_NAMES):
            groups["linear_proj"].append(p)
        else:
            groups["rest"].append(p)
    lrs = {"backbone": lr_backbone, "linear_proj": lr * lr_linear_proj_mult, "rest": lr}
    return [{"params": ps, "lr": lrs[k], "name": k} for k, ps in groups.items() if ps]


def rng_state(loader_generator: torch.Generator) -> dict:
    """Every random state that influences training, on this process."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
             "loader": loader_generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, loader_generator: torch.Generator) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    loader_generator.set_state(state["loader"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def weights_file(out: Path, epoch: int) -> Path:
    """Where ``--save-epochs`` keeps the weights after ``epoch`` (0: the initialisation)."""
    return Path(out) / f"model_e{epoch:03d}.pth"


def save_weights(model: torch.nn.Module, out: Path, epoch: int) -> None:
    """The model's weights in half precision (integer buffers unchanged), atomically."""
    state = {k: v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu()
             for k, v in model.state_dict().items()}
    save_atomic(state, weights_file(out, epoch))


def _write_lines_atomic(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(lines))
    os.replace(tmp, path)


def prepare_output_dir(args) -> Path:
    """Create the output folder; refuse to clobber a previous run unless --resume/--force."""
    out = Path(args.output_dir)
    existing = [n for n in (CHECKPOINT, METRICS) if (out / n).exists()]
    if existing and not (args.resume or args.force):
        raise SystemExit(f"{out} already holds {', '.join(existing)} from an earlier run; "
                         "pass --resume to continue it or --force to start over")
    if args.resume and not (out / CHECKPOINT).exists():
        raise SystemExit(f"--resume: no {CHECKPOINT} in {out}")
    if rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        if args.force:
            for n in existing:
                (out / n).unlink()
    return out


def _loader(dataset, batch_size, shuffle, seed, generator, num_workers, world, drop_last):
    sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last) if world > 1 else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else False,
                      sampler=sampler, collate_fn=collate_fn, num_workers=num_workers,
                      generator=generator, drop_last=drop_last)


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    """Run a training; return ``{"epochs": [...metrics lines...], "output_dir": ...}``."""
    args = resolve_args(argv)
    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.amp and not device_name.startswith("cuda"):
        raise SystemExit(f"--amp needs a CUDA device, got --device {device_name}")
    if args.threads:
        torch.set_num_threads(args.threads)
    this_rank, world = init_distributed(device_name)
    if device_name.startswith("cuda") and world > 1:
        device_name = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device_name)
    device = torch.device(device_name)
    pretrained = None
    if args.pretrained:  # the architecture is the checkpoint's (also when resuming)
        if is_dist() and this_rank != 0:
            dist.barrier()  # rank 0 downloads into the cache first
        pretrained = finetune.read_pretrained(args.pretrained)
        if is_dist() and this_rank == 0:
            dist.barrier()
        finetune.apply_pretrained(args, pretrained)
    out = prepare_output_dir(args)
    if is_dist():
        dist.barrier()

    torch.manual_seed(args.seed + this_rank)
    np.random.seed(args.seed + this_rank)
    random.seed(args.seed + this_rank)
    loader_gen = torch.Generator().manual_seed(args.seed)

    train_set = build_dataset(args.data_path, "train", args.preset, args.image_size, args.max_train_images)
    val_set = build_dataset(args.data_path, "val", args.preset, args.image_size, args.max_val_images)
    if train_set.cat_ids != val_set.cat_ids:  # labels are positions in the sorted category ids
        raise SystemExit(f"the train and val annotations of {args.data_path} list different categories "
                         f"(ids {train_set.cat_ids[:10]} and {val_set.cat_ids[:10]}); both must list the same")
    per_rank = args.batch_size  # per process, as in the paper's code
    if len(train_set) < per_rank * world:  # the loader drops the last incomplete batch: no step at all
        raise SystemExit(f"--batch-size {per_rank} x {world} process(es) is more than the {len(train_set)} training "
                         f"images of {args.data_path}; lower --batch-size or add images")
    train_loader = _loader(train_set, per_rank, True, args.seed, loader_gen, args.num_workers, world, True)
    val_loader = _loader(val_set, per_rank, False, args.seed, torch.Generator().manual_seed(0),
                         args.num_workers, world, False)

    model, criterion, postprocessor = build_model_from_args(args, train_set.num_classes)
    if args.backbone_weights and not args.resume:  # a resumed run gets every weight from its checkpoint
        load_backbone_weights(model.backbone, args.backbone_weights)
    if pretrained is not None and not args.resume:
        n = finetune.load_pretrained(model, pretrained)
        if this_rank == 0:
            print(f"fine-tuning from {pretrained.file} ({pretrained.layout} layout): {n} tensors loaded, "
                  f"class heads new for {train_set.num_classes} classes", flush=True)
    model.to(device)
    criterion.to(device)
    optimizer = torch.optim.AdamW(param_groups(model, args.lr, args.lr_backbone, args.lr_linear_proj_mult),
                                  lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_drop)
    scaler = torch.amp.GradScaler("cuda") if args.amp else None
    start_epoch = 0
    if args.resume:
        ckpt = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler") is not None:
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch = ckpt["epoch"]
        if len(ckpt["rng"]) != world:
            raise SystemExit(f"--resume: the checkpoint was written by {len(ckpt['rng'])} process(es) but this run "
                             f"has {world}; resume with the same number of processes to continue exactly")
        set_rng_state(ckpt["rng"][this_rank], loader_gen)
    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)

    history = []
    if this_rank == 0 and start_epoch == 0 and 0 in args.save_epochs:
        save_weights(model, out, 0)
    if this_rank == 0:
        (out / CONFIG).write_text(json.dumps(vars(args), indent=2))
        if args.resume and (out / METRICS).exists():  # forget epochs the checkpoint does not hold
            lines = [ln for ln in (out / METRICS).read_text().splitlines(True)
                     if ln.strip() and json.loads(ln)["epoch"] <= start_epoch]
            _write_lines_atomic(out / METRICS, lines)
            history = [json.loads(ln) for ln in lines]
        print(f"training {args.model} ({args.preset}) on {len(train_set)} images, {world} process(es) on "
              f"{device}, epochs {start_epoch + 1}..{args.epochs}, output {out}", flush=True)

    for epoch in range(start_epoch, args.epochs):
        t0, cpu0 = time.time(), time.process_time()
        if isinstance(train_loader.sampler, DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        stats = train_one_epoch(train_model, criterion, train_loader, optimizer, device, epoch + 1,
                                args.clip_max_norm, scaler, args.amp, args.progress)
        lr_now = optimizer.param_groups[-1]["lr"]
        scheduler.step()
        line = {"epoch": epoch + 1, "lr": lr_now, "train_seconds": round(time.time() - t0, 2),
                **{f"train_{k}": v for k, v in stats.items()}}
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs or epoch + 1 in args.eval_epochs:
            t1 = time.time()
            line.update(evaluate(model, criterion, postprocessor, val_loader, val_set, device, args.amp, args.progress))
            line["eval_seconds"] = round(time.time() - t1, 2)
        line["cpu_seconds"] = round(time.process_time() - cpu0, 2)  # this process, train + eval
        rngs = [rng_state(loader_gen)]
        if is_dist():
            rngs = [None] * world
            dist.all_gather_object(rngs, rng_state(loader_gen))
        if this_rank == 0:
            with open(out / METRICS, "a") as f:
                f.write(json.dumps(line) + "\n")
            save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(),
                         "scaler": scaler.state_dict() if scaler is not None else None,
                         "epoch": epoch + 1, "args": vars(args), "rng": rngs,
                         "class_names": train_set.class_names, "cat_ids": train_set.cat_ids}, out / CHECKPOINT)
            if epoch + 1 in args.save_epochs:
                save_weights(model, out, epoch + 1)
            msg = f"epoch {epoch + 1}/{args.epochs} loss {stats['loss']:.4f} ({line['train_seconds']:.0f}s)"
            if "AP" in line:
                msg += "  " + format_metrics(line)
            print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)
        history.append(line)
    if is_dist():
        dist.barrier()
        dist.destroy_process_group()
    return {"epochs": history, "output_dir": str(out)}


if __name__ == "__main__":
    main()
