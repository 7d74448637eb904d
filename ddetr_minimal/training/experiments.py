"""Recorded experiments: ``python -m ddetr_minimal experiments convergence``.

``convergence`` trains DETR and Deformable DETR on the toy dataset with the same backbone
(the small CNN), width, data, augmentation and learning-rate schedule (the ``toy`` preset of
:mod:`ddetr_minimal.training.train`; the lr drop happens at the same epoch for both).

Both start from the same pretrained backbone, as in the paper, where both start from an
ImageNet-trained ResNet-50. Offline there are no such weights, so the command first trains the
small CNN with :mod:`ddetr_minimal.training.pretrain` on a toy dataset of its own (another seed, so the
validation images stay unseen) and hands the result to both trainings (``--pretrain-epochs 0``
trains from scratch instead). The backbone then learns at a tenth of the transformer's learning
rate, the paper's ratio. An epoch of
DETR costs about a quarter of one of Deformable DETR on a CPU (its encoder sees 8x8 tokens
instead of ~1,360), so DETR runs ``--detr-epochs`` while Deformable DETR runs the first
``--deformable-epochs`` of the *same* schedule: every epoch of the shorter run is exactly what a
full-length run would have produced at that epoch. Both are evaluated with pycocotools after
every epoch, so they are compared at the same epochs.

DETR can be trained as published (softmax cross-entropy with a down-weighted "no object"
class; run ``detr``) and as the paper's "DETR+" rows do (sigmoid focal loss, the loss
Deformable DETR uses; run ``detr_focal``, the default), so that the comparison isolates the
attention rather than the classification loss (``--detr-losses ce,focal`` trains both and
checks the claim against each).

The trainings run side by side (``--parallel``, one thread each). The result goes to
``data/results/convergence.json``: per-epoch loss, AP, AP50, AP75, AP_S, AP_M, AP_L of both,
the command, git commit, machine, date and wall time, and a summary of the paper's claim
(Deformable DETR reaches DETR's final AP in at most a tenth of DETR's epochs; higher AP_S).

``--variants refine,two_stage`` adds Deformable DETR with iterative box refinement and the
two-stage variant (built on refinement, as in the paper), trained like the baseline; they are recorded in
``data/results/variants.json`` (``--only-variants`` skips the baseline pair).
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path


from ..measure.records import provenance, write_json
from .runs import AP_KEYS, add_toy_data_arguments, launch as _launch, read_curve, toy_dataset

VARIANTS = {"refine": ["--with-box-refine"], "two_stage": ["--with-box-refine", "--two-stage"]}


def summarize(detr: list[dict], deformable: list[dict]) -> dict:
    """The paper's claim, checked on the two curves (AP values are fractions in [0, 1])."""
    d_eval = [r for r in detr if "AP" in r]
    f_eval = [r for r in deformable if "AP" in r]
    final_d, final_f = d_eval[-1], f_eval[-1]
    reach = next((r["epoch"] for r in f_eval if r["AP"] >= final_d["AP"]), None)
    # DETR's trend: the mean AP of its last three evaluations against the three before
    last, before = [r["AP"] for r in d_eval[-3:]], [r["AP"] for r in d_eval[-6:-3]]
    gain = sum(last) / len(last) - (sum(before) / len(before) if before else 0.0)
    trend = "still rising" if gain > max(0.005, 0.05 * final_d["AP"]) else "plateaued"
    same_epoch = next((r for r in d_eval if r["epoch"] == final_f["epoch"]), None)
    return {
        "detr_epochs": final_d["epoch"], "detr_final": {k: final_d[k] for k in AP_KEYS},
        "deformable_epochs": final_f["epoch"], "deformable_final": {k: final_f[k] for k in AP_KEYS},
        "detr_at_deformable_final_epoch": {k: same_epoch[k] for k in AP_KEYS} if same_epoch else None,
        "deformable_epoch_reaching_detr_final_AP": reach,
        "epoch_ratio": (reach / final_d["epoch"]) if reach else None,
        "claim_tenth_of_epochs_met": bool(reach and reach <= final_d["epoch"] / 10),
        "claim_higher_AP_S_met": final_f["AP_S"] > final_d["AP_S"],
        "detr_trend": trend, "detr_trend_gain_last3_vs_prev3": gain,
    }


def pretrain_backbone(args, runs_dir: Path) -> dict:
    """Train the small CNN backbone once (``runs_dir/backbone.pth``) on its own toy dataset and
    return the record of that step. An existing file is reused with --resume, replaced with
    --force, and otherwise an error."""
    from .pretrain import pretrain

    data = Path(args.pretrain_data)
    if data.resolve() == Path(args.data).resolve() or args.pretrain_data_seed == args.data_seed:
        raise SystemExit("--pretrain-data must be another dataset than --data, made with another seed "
                         "(the detectors' validation images must stay unseen)")
    runs_dir.mkdir(parents=True, exist_ok=True)
    weights = runs_dir / "backbone.pth"
    record_file = runs_dir / "backbone.json"
    if weights.exists():
        if args.force:
            weights.unlink()
        elif not args.resume or not record_file.is_file():
            raise SystemExit(f"{weights} exists from an earlier run; pass --resume to reuse it or --force to redo it")
        else:
            return json.loads(record_file.read_text())
    info = toy_dataset(args, pretrain=True)
    print(f"pretraining the backbone on {data} ({args.pretrain_epochs} epochs)", flush=True)
    t0 = time.time()
    record = pretrain(data, weights, epochs=args.pretrain_epochs, seed=args.seed, threads=args.parallel * args.threads,
                      log=lambda msg: print(msg, flush=True))
    record.update(weights=str(weights), wall_seconds=round(time.time() - t0, 1), dataset={"path": str(data), **info})
    write_json(record_file, record)
    return record


def run_all(jobs: dict[str, list[str]], runs_dir: Path, parallel: int, threads: int) -> dict[str, float]:
    """Run ``{name: train arguments}`` as subprocesses, ``parallel`` at a time; return each one's
    wall seconds. A failure stops everything and shows the end of that run's log."""
    pending, running, seconds = list(jobs.items()), {}, {}
    while pending or running:
        while pending and len(running) < parallel:
            name, args = pending.pop(0)
            running[name] = (_launch(name, args, runs_dir / name, threads), time.time())
        time.sleep(2)
        for name, (proc, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            proc.log_file.close()
            del running[name]
            seconds[name] = round(time.time() - t0, 1)
            print(f"[{datetime.datetime.now():%H:%M:%S}] {name} finished (exit {proc.returncode}, "
                  f"{seconds[name]:.0f}s)", flush=True)
            if proc.returncode != 0:
                for other, _ in running.values():
                    other.terminate()
                tail = (runs_dir / name / "log.txt").read_text()[-3000:]
                raise SystemExit(f"training {name} failed (exit {proc.returncode}); end of its log:\n{tail}")
    return seconds


def convergence(argv=None) -> dict:
    """The ``convergence`` command; returns what it wrote."""
    p = argparse.ArgumentParser(prog="python -m ddetr_minimal experiments convergence",
                                description="DETR vs Deformable DETR convergence on the toy dataset.")
    add_toy_data_arguments(p, num_val=150, pretrain_num_val=200)
    p.add_argument("--pretrain-epochs", type=int, default=12,
                   help="epochs of backbone pretraining; 0 trains both detectors' backbones from scratch")
    p.add_argument("--lr-backbone", type=float, default=None,
                   help="backbone learning rate (default: 2e-5 with a pretrained backbone, else the preset's)")
    p.add_argument("--detr-epochs", type=int, default=140)
    p.add_argument("--deformable-epochs", type=int, default=28)
    p.add_argument("--lr-drop", type=int, default=112, help="epoch after which the lr is divided by 10 (both)")
    p.add_argument("--variants", default="", help=f"comma-separated extra Deformable DETR runs: {sorted(VARIANTS)}")
    p.add_argument("--only-variants", action="store_true", help="skip the DETR / Deformable DETR pair")
    p.add_argument("--runs-dir", default="data/runs/convergence")
    p.add_argument("--out", default="data/results/convergence.json")
    p.add_argument("--variants-out", default="data/results/variants.json")
    p.add_argument("--detr-losses", default="focal",
                   help="DETR runs to train: ce (as published), focal (DETR+ with the focal loss)")
    p.add_argument("--parallel", type=int, default=2, help="trainings run at the same time")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per training")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--resume", action="store_true",
                   help="continue the runs in --runs-dir that have a checkpoint (finished ones are only read)")
    p.add_argument("--force", action="store_true", help="restart runs in --runs-dir from scratch")
    p.add_argument("--train-arg", action="append", default=[],
                   help="extra flag passed to every training, e.g. --train-arg=--batch-size=8 (repeatable)")
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {sorted(VARIANTS)}")
    if args.only_variants and not variants:
        p.error("--only-variants needs --variants")
    if args.deformable_epochs > args.detr_epochs:
        p.error("--deformable-epochs must not exceed --detr-epochs")

    t0 = time.time()
    # the command, the code that runs, the machine and the start date
    started = provenance(["python", "-m", "ddetr_minimal", "experiments", "convergence",
                          *(argv if argv is not None else sys.argv[1:])])
    data = Path(args.data)
    info = toy_dataset(args)
    runs_dir = Path(args.runs_dir)
    common = ["--preset", "toy", "--data-path", str(data), "--lr-drop", str(args.lr_drop),
              "--eval-every", "1", "--seed", str(args.seed), "--threads", str(args.threads), "--no-progress"]
    pretraining = None
    if args.pretrain_epochs > 0:
        pretraining = pretrain_backbone(args, runs_dir)
        common += ["--backbone-weights", pretraining["weights"]]
    lr_backbone = args.lr_backbone if args.lr_backbone is not None else (2e-5 if pretraining else None)
    if lr_backbone is not None:
        common += ["--lr-backbone", str(lr_backbone)]
    common += args.train_arg
    if args.force:
        common.append("--force")

    def job(model, epochs, extra=()):
        # --resume continues the runs that have a checkpoint and starts the others
        again = ["--resume"] if args.resume and (runs_dir / name / "checkpoint.pth").is_file() else []
        return ["--model", model, "--epochs", str(epochs), "--output-dir", str(runs_dir / name), *common, *extra,
                *again]

    jobs = {}
    if not args.only_variants:
        losses = [x for x in args.detr_losses.split(",") if x]
        if not losses or any(x not in ("ce", "focal") for x in losses):
            p.error(f"--detr-losses must list ce and/or focal, got {args.detr_losses!r}")
        for name, model, epochs, extra in (("detr", "detr", args.detr_epochs, []),
                                           ("detr_focal", "detr", args.detr_epochs, ["--detr-focal"]),
                                           ("deformable", "deformable", args.deformable_epochs, [])):
            wanted = {"detr": "ce" in losses, "detr_focal": "focal" in losses, "deformable": True}
            if wanted[name]:
                jobs[name] = job(model, epochs, extra)
    for v in variants:
        name = f"deformable_{v}"
        jobs[name] = job("deformable", args.deformable_epochs, VARIANTS[v])
    print(f"runs: {', '.join(jobs)}; logs in {runs_dir}/<run>/log.txt", flush=True)
    seconds = run_all(jobs, runs_dir, args.parallel, args.threads)

    config = json.loads((runs_dir / next(iter(jobs)) / "config.json").read_text())
    shared = {k: config[k] for k in ("preset", "backbone", "d_model", "n_heads", "enc_layers", "dec_layers",
                                     "dim_feedforward", "dropout", "num_queries", "n_points", "lr", "lr_backbone",
                                     "lr_linear_proj_mult", "weight_decay", "clip_max_norm", "batch_size",
                                     "lr_drop", "seed", "image_size")}
    header = {
        **started,
        "dataset": {"path": str(data), **info}, "shared_config": shared, "threads_per_run": args.threads,
        "runs_in_parallel": args.parallel, "backbone_pretraining": pretraining,
        "note": ("AP values are fractions in [0, 1]; every run is evaluated after every epoch. "
                 "Deformable DETR runs the first deformable_epochs of the same lr schedule as DETR. "
                 "wall_seconds is this invocation's; with --resume, earlier epochs ran before it and each "
                 "run's train_eval_seconds and cpu_seconds sum over all its epochs."),
    }
    runs = {}
    for name in jobs:
        curve = read_curve(runs_dir / name)
        runs[name] = {"train_args": jobs[name], "wall_seconds_this_invocation": seconds[name],
                      "train_eval_seconds": round(sum(r["train_seconds"] + r.get("eval_seconds", 0) for r in curve), 1),
                      "cpu_seconds": round(sum(r.get("cpu_seconds", 0) for r in curve), 1), "curve": curve}
    written = {}
    if not args.only_variants:
        detr_runs = [k for k in ("detr", "detr_focal") if k in runs]
        result = {**header, "wall_seconds": None, "runs": {k: runs[k] for k in (*detr_runs, "deformable")}}
        for k in detr_runs:  # "summary" compares with DETR as published when it ran
            key = "summary" if k == detr_runs[0] else f"summary_{k}"
            result[key] = {"detr_run": k, **summarize(runs[k]["curve"], runs["deformable"]["curve"])}
        written["convergence"] = result
    if variants:
        written["variants"] = {**header, "wall_seconds": None,
                               "runs": {k: v for k, v in runs.items() if k.startswith("deformable_")}}
    wall = round(time.time() - t0, 1)
    for key, path in (("convergence", args.out), ("variants", args.variants_out)):
        if key in written:
            written[key]["wall_seconds"] = wall
            write_json(path, written[key])
            print(f"wrote {path}", flush=True)
    if "convergence" in written:
        for key in ("summary", "summary_detr_focal"):
            if key in written["convergence"]:
                print(key, json.dumps(written["convergence"][key], indent=1))
    return written


def main(argv=None) -> None:
    """``python -m ddetr_minimal experiments <experiment> [options]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from .repeated import seeds  # the repeated experiment, over seeds, each model on its own schedule

    commands = {"convergence": convergence, "seeds": seeds}
    if not argv or argv[0] not in commands:
        raise SystemExit(f"usage: python -m ddetr_minimal experiments {{{','.join(commands)}}} [options] "
                         "(add --help after the experiment's name)")
    commands[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
