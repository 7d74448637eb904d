"""The repeated convergence experiment: ``python -m ddetr_minimal experiments seeds``.

DETR and Deformable DETR each run their own full schedule -- Deformable DETR a tenth of DETR's
epochs -- and both divide the learning rate by 10 at the same fraction of it (0.8, the paper's
400/500 and 40/50). Every run starts from the same pretrained backbone (the small CNN, trained
once by :mod:`ddetr_minimal.training.pretrain` on a toy dataset of its own) and uses the same
data, width and augmentation; a seed changes the transformer's initialisation and the order
and crops of the training images. DETR and Deformable DETR run every ``--seeds``; the
single-scale control (Deformable DETR on the stride-32 map only, what DETR reads) and the
box-refinement and two-stage variants run ``--extra-seeds``. See
:mod:`ddetr_minimal.training.protocol` for the plan and the statistics.

The runs go side by side (``--parallel``, ``--threads`` each), longest first. The record
(``--out``, default ``data/results/convergence_seeds.json``) is rewritten after every run that
ends, so an interrupted recording keeps what finished; ``--resume`` continues: finished runs
are only read, the others continue from their checkpoint. Per run it keeps the model, seed,
epochs, lr drop, per-epoch curve (loss every epoch; AP, AP50, AP75, AP_S, AP_M, AP_L on
evaluated epochs) and seconds, plus the provenance of every invocation, and a summary
(mean +- sd over seeds, epochs to AP 5, AP 10 and DETR's final AP, the claims as measured).

For one seed the weights of DETR and Deformable DETR at 0, 10, 50 and 100 % of training, and the
final weights of the variants, go to ``--checkpoints-dir`` (``data/checkpoints``) with a
manifest; :func:`ddetr_minimal.training.checkpoints.load_trained` loads them.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..measure.records import provenance, write_json
from . import checkpoints, protocol
from .runs import add_toy_data_arguments, launch as _launch, read_curve, toy_dataset

SHARED_KEYS = ("preset", "backbone", "d_model", "n_heads", "enc_layers", "dec_layers", "dim_feedforward",
               "dropout", "num_queries", "n_points", "lr", "lr_backbone", "lr_linear_proj_mult", "weight_decay",
               "clip_max_norm", "batch_size", "image_size")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddetr_minimal experiments seeds",
                                description="DETR vs Deformable DETR convergence over seeds, each on its own schedule.")
    # small objects of 18 to 30 px a side: 2 to 4 cells of the stride-8 map, under one of stride 32
    add_toy_data_arguments(p, num_val=1000, pretrain_num_val=300, small_sides=(18.0, 30.0))
    p.add_argument("--pretrain-epochs", type=int, default=12)
    p.add_argument("--pretrain-seed", type=int, default=42)
    p.add_argument("--backbone-weights", help="start every run from this file of python -m ddetr_minimal pretrain "
                   "(made on --pretrain-data) instead of pretraining one into --runs-dir")
    p.add_argument("--lr-backbone", type=float, default=2e-5, help="the pretrained backbone's lr (a tenth of the lr)")
    p.add_argument("--detr-epochs", type=int, default=150)
    p.add_argument("--epoch-ratio", type=int, default=10, help="DETR's epochs / Deformable DETR's")
    p.add_argument("--drop-fraction", type=float, default=0.8, help="fraction of each schedule after which lr /= 10")
    p.add_argument("--seeds", default="0,1,2", help="seeds of DETR and Deformable DETR")
    p.add_argument("--extra", default="single_scale,refine,two_stage",
                   help="extra groups on Deformable DETR's schedule: single_scale, refine, two_stage ('' for none)")
    p.add_argument("--extra-seeds", default="0")
    p.add_argument("--detr-eval-every", type=int, default=5, help="DETR evaluates every N epochs (and the last)")
    p.add_argument("--runs-dir", default="data/runs/convergence_seeds")
    p.add_argument("--out", default="data/results/convergence_seeds.json")
    p.add_argument("--checkpoints-dir", default="data/checkpoints")
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--resume", action="store_true", help="continue: finished runs are read, the others resume")
    p.add_argument("--force", action="store_true", help="start every run, the record and the checkpoints over")
    p.add_argument("--table", action="store_true", help="print the summary table of the --out record and stop")
    p.add_argument("--only", help="comma-separated run names to train now (the others are only read)")
    p.add_argument("--train-arg", action="append", default=[],
                   help="extra flag for every training, e.g. --train-arg=--batch-size=8 (repeatable)")
    return p


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"{flag} must be comma-separated integers, got {text!r}") from None


def run_state(run: protocol.Run, run_dir: Path) -> str:
    """``"finished"`` (its last epoch is in metrics.jsonl), ``"partial"`` (a checkpoint to resume
    from) or ``"new"``."""
    metrics, ckpt = run_dir / "metrics.jsonl", run_dir / "checkpoint.pth"
    if metrics.is_file() and ckpt.is_file():
        lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        if lines and lines[-1]["epoch"] >= run.epochs:
            return "finished"
    return "partial" if ckpt.is_file() else "new"


def run_record(run: protocol.Run, run_dir: Path, train_args: list[str]) -> dict:
    """What the record keeps of one run (its curve so far)."""
    curve = read_curve(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    done = bool(curve) and curve[-1]["epoch"] >= run.epochs and any("AP" in r for r in curve)
    return {**run.as_dict(), "train_args": train_args, "finished": done, "epochs_done": curve[-1]["epoch"] if curve else 0,
            "wall_seconds": round(sum(r["train_seconds"] + r.get("eval_seconds", 0) for r in curve), 1),
            "cpu_seconds": round(sum(r.get("cpu_seconds", 0) for r in curve), 1), "curve": curve}


def export_checkpoints(run: protocol.Run, run_dir: Path, record: dict, root: Path, started: dict, force: bool) -> dict:
    """Copy a finished run's kept weights into ``root`` as trained checkpoints; return their
    manifest entries. A file already there is kept (never overwritten) unless ``force``."""
    import torch

    from .train import weights_file

    config = json.loads((run_dir / "config.json").read_text())
    ckpt = torch.load(run_dir / "checkpoint.pth", map_location="cpu", weights_only=False)
    by_epoch = {r["epoch"]: r for r in record["curve"]}
    entries = {}
    for epoch in run.save_epochs:
        name = f"{run.name}_e{epoch:03d}"
        path = root / f"{name}.pth"
        row = by_epoch.get(epoch, {})
        entry = {"file": path.name, "run": run.name, "group": run.group, "seed": run.seed, "epoch": epoch,
                 "of_epochs": run.epochs, "AP": row.get("AP"), "AP_S": row.get("AP_S"),
                 "command": started["command"], "commit": started["commit"]}
        if not path.exists() or force:
            state = torch.load(weights_file(run_dir, epoch), map_location="cpu", weights_only=True)
            checkpoints.write_trained(path, state, config, ckpt["class_names"], entry)
        entries[name] = entry
    return entries


def evaluation_noise(run_dir: Path, threads: int, repeats: int = 20) -> dict:
    """The spread of a finished run's final AP over halves of the validation images
    (:func:`ddetr_minimal.training.noise.subset_spread`), computed once into ``noise.json``."""
    from types import SimpleNamespace

    import torch
    from torch.utils.data import DataLoader

    from ..datasets.coco import build_dataset, collate_fn
    from .noise import coco_results, subset_spread
    from .train import build_model_from_args

    cache = run_dir / "noise.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    torch.set_num_threads(threads)
    ckpt = torch.load(run_dir / "checkpoint.pth", map_location="cpu", weights_only=False)
    args = SimpleNamespace(**{**ckpt["args"], "pretrained_backbone": False})
    dataset = build_dataset(args.data_path, "val", args.preset, args.image_size)
    model, _, post = build_model_from_args(args, dataset.num_classes)
    model.load_state_dict(ckpt["model"])
    results = coco_results(model, post, DataLoader(dataset, batch_size=8, collate_fn=collate_fn), dataset)
    spread = {"epoch": ckpt["epoch"], **subset_spread(dataset.coco_gt(), results, dataset.image_ids(), repeats)}
    write_json(cache, spread)
    return spread


def seeds(argv=None) -> dict:
    """The ``seeds`` command; returns the record it wrote."""
    args = build_parser().parse_args(argv)
    if args.table:
        record = json.loads(Path(args.out).read_text())
        print(protocol.format_table(record["summary"]))
        return record
    if args.resume and args.force:
        raise SystemExit("--resume and --force contradict each other; pick one")
    extra = [g for g in args.extra.split(",") if g]
    runs = protocol.plan(args.detr_epochs, _ints(args.seeds, "--seeds"), args.drop_fraction, args.epoch_ratio,
                         extra, _ints(args.extra_seeds, "--extra-seeds"), args.detr_eval_every)
    names = [r.name for r in runs]
    only = [x for x in (args.only or "").split(",") if x]
    if any(x not in names for x in only):
        raise SystemExit(f"--only: unknown runs {[x for x in only if x not in names]}; the runs are {names}")
    out, runs_dir, ck_root = Path(args.out), Path(args.runs_dir), Path(args.checkpoints_dir)
    if out.exists() and not (args.resume or args.force):
        raise SystemExit(f"{out} already holds a record; pass --resume to continue it or --force to redo it")
    started = provenance(["python", "-m", "ddetr_minimal", "experiments", "seeds",
                          *(argv if argv is not None else sys.argv[1:])])
    earlier = json.loads(out.read_text()).get("invocations", []) if out.exists() and args.resume else []
    info = toy_dataset(args)
    backbone = pretrained_backbone(args, runs_dir)
    common = ["--preset", "toy", "--data-path", args.data, "--threads", str(args.threads), "--no-progress",
              "--backbone-weights", backbone["weights"], "--lr-backbone", str(args.lr_backbone), *args.train_arg]
    jobs, states = {}, {}
    for run in runs:
        run_dir = runs_dir / run.name
        states[run.name] = "new" if args.force else run_state(run, run_dir)
        flags = [*run.train_args(), "--output-dir", str(run_dir), *common]
        if states[run.name] != "finished" and (not only or run.name in only):
            # a run that crashed before its first checkpoint has nothing to resume from: it starts over
            fresh = args.force or (run_dir / "metrics.jsonl").exists()
            jobs[run.name] = flags + (["--resume"] if states[run.name] == "partial" else ["--force"] * fresh)
        states[run.name] = (states[run.name], flags)
    print(f"{len(runs)} runs; to train now: {', '.join(jobs) or 'none'}; logs in {runs_dir}/<run>/log.txt", flush=True)
    manifest = {} if args.force else checkpoints.read_manifest(ck_root)

    def write_record(wall: float) -> dict:
        records = [run_record(r, runs_dir / r.name, states[r.name][1]) for r in runs]
        for run, rec in zip(runs, records):
            if rec["finished"] and run.save_epochs:
                manifest.update(export_checkpoints(run, runs_dir / run.name, rec, ck_root, started, args.force))
                rec["evaluation_noise"] = evaluation_noise(runs_dir / run.name, args.threads)
        if manifest:
            checkpoints.write_manifest(ck_root, manifest, started)
        config = next((json.loads((runs_dir / r.name / "config.json").read_text()) for r in runs
                       if (runs_dir / r.name / "config.json").is_file()), {})
        record = {**started, "invocations": [*earlier, {**started, "wall_seconds": round(wall, 1)}],
                  "dataset": {"path": args.data, **info}, "backbone_pretraining": backbone,
                  "shared_config": {k: config.get(k) for k in SHARED_KEYS}, "threads_per_run": args.threads,
                  "runs_in_parallel": args.parallel, "drop_fraction": args.drop_fraction,
                  "epoch_ratio": args.epoch_ratio,
                  "note": "AP values are fractions in [0, 1]; wall_seconds of a run sum its epochs' training and "
                          "evaluation over every invocation; the summary counts finished runs only.",
                  "runs": {r.name: rec for r, rec in zip(runs, records)},
                  "summary": protocol.summarize(records, noise={r["group"]: r["evaluation_noise"] for r in records
                                                                if "evaluation_noise" in r})}
        write_json(out, record)
        return record

    t0 = time.time()
    record = run_jobs(jobs, runs_dir, args.parallel, args.threads, lambda name: write_record(time.time() - t0))
    record = write_record(time.time() - t0)
    print(f"wrote {out}", flush=True)
    print(protocol.format_table(record["summary"]), flush=True)
    print(json.dumps(record["summary"]["claims"], indent=1), flush=True)
    return record


def pretrained_backbone(args, runs_dir: Path) -> dict:
    """The one pretrained backbone every run starts from (``runs_dir/backbone.pth``), made once."""
    from .pretrain import pretrain

    if Path(args.pretrain_data).resolve() == Path(args.data).resolve() or args.pretrain_data_seed == args.data_seed:
        raise SystemExit("--pretrain-data must be another dataset than --data, made with another seed "
                         "(the detectors' validation images must stay unseen)")
    if args.backbone_weights:
        import hashlib

        import torch

        path = Path(args.backbone_weights)
        if not path.is_file():
            raise SystemExit(f"--backbone-weights: {path} does not exist")
        stored = {k: v for k, v in torch.load(path, map_location="cpu", weights_only=True).items() if k != "backbone"}
        if Path(stored.get("data", "")).resolve() != Path(args.pretrain_data).resolve():
            raise SystemExit(f"--backbone-weights: {path} was pretrained on {stored.get('data')!r}, "
                             f"not on --pretrain-data {args.pretrain_data!r}")
        info = toy_dataset(args, pretrain=True)
        return {**stored, "weights": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                "dataset": {"path": args.pretrain_data, **info}}
    weights, record_file = runs_dir / "backbone.pth", runs_dir / "backbone.json"
    if weights.is_file() and record_file.is_file() and not args.force:
        return json.loads(record_file.read_text())
    if weights.exists():
        if not args.force:
            raise SystemExit(f"{weights} exists without its {record_file.name}; pass --force to redo it")
        weights.unlink()
    runs_dir.mkdir(parents=True, exist_ok=True)
    info = toy_dataset(args, pretrain=True)
    t0 = time.time()
    record = pretrain(args.pretrain_data, weights, epochs=args.pretrain_epochs, seed=args.pretrain_seed,
                      threads=args.threads, log=lambda msg: print(msg, flush=True))
    record.update(weights=str(weights), wall_seconds=round(time.time() - t0, 1),
                  dataset={"path": args.pretrain_data, **info})
    write_json(record_file, record)
    return record


def run_jobs(jobs: dict, runs_dir: Path, parallel: int, threads: int, on_finish) -> dict | None:
    """Run ``{name: train arguments}``, ``parallel`` at a time, in order; call ``on_finish(name)``
    after each one ends. A failure stops the others and shows the end of its log."""
    pending, running, last = list(jobs.items()), {}, None
    while pending or running:
        while pending and len(running) < parallel:
            name, flags = pending.pop(0)
            running[name] = _launch(name, flags, runs_dir / name, threads)
        time.sleep(2)
        for name, proc in list(running.items()):
            if proc.poll() is None:
                continue
            proc.log_file.close()
            del running[name]
            print(f"{name} finished (exit {proc.returncode})", flush=True)
            if proc.returncode != 0:
                for other in running.values():
                    other.terminate()
                tail = (runs_dir / name / "log.txt").read_text()[-3000:]
                raise SystemExit(f"training {name} failed (exit {proc.returncode}); end of its log:\n{tail}")
            last = on_finish(name)
    return last


def main(argv=None) -> None:
    """``python -m ddetr_minimal experiments seeds [options]``: the recorded experiment."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "seeds":
        raise SystemExit(f"usage: python -m ddetr_minimal experiments seeds [options] (add --help after seeds); "
                         f"got {' '.join(argv) or 'no experiment'}")
    seeds(argv[1:])


if __name__ == "__main__":
    main()
