"""Pieces of the recorded experiment: the toy dataset it uses, a run's curve, a training
started as a subprocess with its log."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from ..datasets.synthetic import BUCKETS, INFO_FILE, generate, parse_sides

AP_KEYS = ("AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L")


def ensure_dataset(root: Path, num_train: int, num_val: int, image_size: int, seed: int,
                   clutter: float = 1.0, small_sides=None) -> dict:
    """Generate the toy dataset at ``root`` unless it is there; return its ``dataset_info.json``.
    An existing dataset made with other parameters is an error (never regenerated silently)."""
    info_path = root / INFO_FILE
    small_sides = [float(x) for x in (small_sides or BUCKETS["small"])]
    if not info_path.is_file():
        generate(root, num_train, num_val, image_size, seed, clutter=clutter, small_sides=small_sides)
    info = json.loads(info_path.read_text())
    info.setdefault("clutter", 1.0)  # datasets written before the options existed have full clutter
    info.setdefault("small_sides", list(BUCKETS["small"]))  # and the first small sides
    wanted = {"num_train": num_train, "num_val": num_val, "image_size": image_size, "seed": seed,
              "clutter": clutter, "small_sides": small_sides}
    differs = {k: (info.get(k), v) for k, v in wanted.items() if info.get(k) != v}
    if differs:
        raise SystemExit(f"{root} holds a toy dataset made with other parameters {differs} (found, wanted); "
                         "point --data elsewhere or regenerate it with python -m ddetr_minimal synthetic --force")
    return info


def toy_dataset(args, pretrain: bool = False) -> dict:
    """:func:`ensure_dataset` for the flags of :func:`add_toy_data_arguments`: the detectors'
    dataset (``--data``), or the backbone's (``--pretrain-data``) when ``pretrain``."""
    if pretrain:
        return ensure_dataset(Path(args.pretrain_data), args.pretrain_num_train, args.pretrain_num_val,
                              args.image_size, args.pretrain_data_seed, args.clutter, args.small_sides)
    return ensure_dataset(Path(args.data), args.num_train, args.num_val, args.image_size, args.data_seed,
                          args.clutter, args.small_sides)


def read_curve(run_dir: Path) -> list[dict]:
    """The per-epoch records of a run: epoch, lr, train loss, val loss, AP metrics, seconds."""
    curve = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        row = {"epoch": rec["epoch"], "lr": rec["lr"], "loss": rec["train_loss"],
               "train_seconds": rec["train_seconds"]}
        for k in (*AP_KEYS, "val_loss", "eval_seconds", "cpu_seconds"):
            if k in rec:
                row[k] = rec[k]
        curve.append(row)
    return curve


def launch(name: str, train_args: list[str], run_dir: Path, threads: int) -> subprocess.Popen:
    run_dir.mkdir(parents=True, exist_ok=True)
    log = open(run_dir / "log.txt", "a")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "ddetr_minimal", "train", *train_args]
    log.write(f"$ {shlex.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    proc.run_name, proc.log_file = name, log
    return proc


def add_toy_data_arguments(p, num_val: int, pretrain_num_val: int, small_sides=BUCKETS["small"]) -> None:
    """The experiment's data flags: the toy dataset, and the one the backbone is pretrained on."""
    p.add_argument("--data", default="data/toy_convergence", help="toy dataset folder (generated when missing)")
    p.add_argument("--num-train", type=int, default=400)
    p.add_argument("--num-val", type=int, default=num_val)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--clutter", type=float, default=1.0, help="background clutter of the toy images, 0 to 1")
    p.add_argument("--small-sides", type=parse_sides, default=small_sides,
                   help=f"nominal sides of the small objects, lo,hi pixels (default {small_sides[0]:g},{small_sides[1]:g})")
    p.add_argument("--pretrain-data", default="data/toy_pretrain",
                   help="toy dataset for pretraining the backbone (generated when missing)")
    p.add_argument("--pretrain-num-train", type=int, default=1500)
    p.add_argument("--pretrain-num-val", type=int, default=pretrain_num_val)
    p.add_argument("--pretrain-data-seed", type=int, default=1)
