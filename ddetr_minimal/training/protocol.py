"""The repeated convergence protocol: which runs, their schedules, and the statistics over seeds.

Pure logic, no training, so that it is tested on its own:

* :func:`schedule` -- a model's epochs and its learning-rate drop at a fixed fraction of them
  (the paper: DETR 500 epochs dropped after 400, Deformable DETR 50 dropped after 40, both 0.8);
* :func:`plan` -- every run of the experiment: DETR and Deformable DETR over several seeds,
  Deformable DETR a tenth of DETR's epochs, plus the controls and variants;
* :func:`summarize` -- mean and standard deviation over seeds of the final metrics,
  epochs-to-threshold with its spread, and the paper's claims checked as measured.

A seed changes the model's initialisation and the order (and random crops) of the training
images; the images themselves, the pretrained backbone and every other setting stay the same.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

AP_KEYS = ("AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L")
# group -> (train --model, extra train flags, what it is)
GROUPS = {
    "detr": ("detr", ["--detr-focal"], "DETR (focal loss, as the paper's DETR+ rows)"),
    "deformable": ("deformable", [], "Deformable DETR, 4 levels (strides 8, 16, 32, 64)"),
    "single_scale": ("deformable", ["--n-levels", "1"], "Deformable DETR on the stride-32 map only"),
    "refine": ("deformable", ["--with-box-refine"], "+ iterative box refinement"),
    "two_stage": ("deformable", ["--with-box-refine", "--two-stage"], "++ two-stage"),
}
# group -> its name in the book's tables and figures
LABELS = {"detr": "DETR", "deformable": "Deformable DETR", "single_scale": "single-scale Deformable DETR",
          "refine": "+ box refinement", "two_stage": "++ two-stage"}
SHORT_GROUPS = tuple(g for g in GROUPS if g != "detr")  # the runs on Deformable DETR's short schedule


@dataclass
class Run:
    """One training of the experiment."""

    name: str  # e.g. "deformable_s1"
    group: str  # a key of GROUPS
    seed: int
    epochs: int
    lr_drop: int  # the lr is divided by 10 after this epoch
    eval_every: int
    save_epochs: list = field(default_factory=list)  # epochs whose weights are kept (0: the initialisation)

    @property
    def model(self) -> str:
        return GROUPS[self.group][0]

    def train_args(self) -> list[str]:
        """The flags of ``python -m ddetr_minimal train`` that make this run what it is."""
        args = ["--model", self.model, *GROUPS[self.group][1], "--seed", str(self.seed), "--epochs",
                str(self.epochs), "--lr-drop", str(self.lr_drop), "--eval-every", str(self.eval_every)]
        if self.save_epochs:
            args += ["--save-epochs", ",".join(str(e) for e in self.save_epochs)]
        return args

    def as_dict(self) -> dict:
        return {**asdict(self), "model": self.model, "description": GROUPS[self.group][2]}


def schedule(epochs: int, drop_fraction: float) -> int:
    """The epoch after which the lr drops: ``drop_fraction * epochs``, which must be a whole epoch
    strictly inside the schedule (so every model drops at exactly the same fraction)."""
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 2:
        raise ValueError(f"epochs must be an integer >= 2, got {epochs!r}")
    if not 0.0 < drop_fraction < 1.0:
        raise ValueError(f"drop_fraction must be in (0, 1), got {drop_fraction!r}")
    drop = round(drop_fraction * epochs)
    if not math.isclose(drop, drop_fraction * epochs, abs_tol=1e-9) or not 1 <= drop < epochs:
        raise ValueError(f"drop_fraction {drop_fraction} of {epochs} epochs is {drop_fraction * epochs:g}, not a "
                         f"whole epoch inside the schedule; choose epochs that make it one")
    return drop


def snapshot_epochs(epochs: int, fractions=(0.0, 0.1, 0.5, 1.0)) -> list[int]:
    """The epochs at the given fractions of a schedule (0 is the initialisation), without repeats."""
    return sorted({round(f * epochs) for f in fractions})


def plan(detr_epochs: int, seeds, drop_fraction: float = 0.8, epoch_ratio: int = 10,
         extra_groups=("single_scale", "refine", "two_stage"), extra_seeds=None,
         detr_eval_every: int = 5, short_eval_every: int = 1, snapshot_seed=None) -> list[Run]:
    """Every run: first those of ``snapshot_seed`` (whose weights are kept), DETR first, then the
    other seeds, longest first (so that runs side by side finish close together).

    DETR trains ``detr_epochs``; Deformable DETR and ``extra_groups`` train
    ``detr_epochs / epoch_ratio`` (a whole number). Each drops its lr at ``drop_fraction`` of its
    own schedule. DETR and Deformable DETR run every seed of ``seeds``; the extra groups run
    ``extra_seeds`` (default: the first seed). ``snapshot_seed`` (default: the first seed) keeps
    the weights of DETR and Deformable DETR at 0, 10, 50 and 100 % of training and of the extra
    groups at the end."""
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds) or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"seeds must be distinct integers, got {seeds!r}")
    if not isinstance(epoch_ratio, int) or epoch_ratio < 1 or detr_epochs % epoch_ratio:
        raise ValueError(f"detr_epochs ({detr_epochs}) must be a multiple of epoch_ratio ({epoch_ratio!r})")
    unknown = [g for g in extra_groups if g not in SHORT_GROUPS or g == "deformable"]
    if unknown:
        raise ValueError(f"extra_groups: unknown {unknown}; choose from {[g for g in SHORT_GROUPS if g != 'deformable']}")
    short = detr_epochs // epoch_ratio
    extra_seeds = seeds[:1] if extra_seeds is None else list(extra_seeds)
    keep = seeds[0] if snapshot_seed is None else snapshot_seed
    runs = []
    for group, epochs, group_seeds, every in (("detr", detr_epochs, seeds, detr_eval_every),
                                              ("deformable", short, seeds, short_eval_every),
                                              *((g, short, extra_seeds, short_eval_every) for g in extra_groups)):
        for seed in group_seeds:
            save = []
            if seed == keep:
                save = snapshot_epochs(epochs) if group in ("detr", "deformable") else [epochs]
            runs.append(Run(f"{group}_s{seed}", group, seed, epochs, schedule(epochs, drop_fraction),
                            max(1, min(every, epochs)), save))
    return sorted(runs, key=lambda r: (r.seed != keep, r.group != "detr" if r.seed == keep else -r.epochs))


# --------------------------------------------------------------------------------------
# statistics over seeds
# --------------------------------------------------------------------------------------
def mean_sd(values) -> dict:
    """``{"mean", "sd", "n", "min", "max"}`` of the values that are not None (sd: the sample
    standard deviation, n - 1 in the denominator; 0 for a single value); all None without any."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return {"mean": None, "sd": None, "n": 0, "min": None, "max": None}
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return {"mean": m, "sd": sd, "n": len(xs), "min": min(xs), "max": max(xs)}


def evaluated(curve: list[dict]) -> list[dict]:
    return [r for r in curve if "AP" in r]


def epochs_to(curve: list[dict], threshold: float, key: str = "AP"):
    """The first evaluated epoch whose ``key`` reaches ``threshold``, or None."""
    return next((r["epoch"] for r in evaluated(curve) if r[key] >= threshold), None)


def group_summary(runs: list[dict], thresholds: dict) -> dict:
    """Statistics of the finished runs of one group (each ``{"seed", "epochs", "curve", ...}``)."""
    finals = [evaluated(r["curve"])[-1] for r in runs]
    out = {"seeds": [r["seed"] for r in runs], "epochs": runs[0]["epochs"], "lr_drop": runs[0]["lr_drop"],
           "final": {k: mean_sd(f[k] for f in finals) for k in AP_KEYS},
           "wall_seconds": mean_sd(r.get("wall_seconds") for r in runs), "epochs_to": {}}
    for label, th in thresholds.items():
        reached = [epochs_to(r["curve"], th) for r in runs]
        out["epochs_to"][label] = {"threshold": th, "per_seed": reached, "reached": sum(e is not None for e in reached),
                                   **mean_sd(reached)}
    return out


def summarize(runs: list[dict], min_ap_s_gap: float = 0.05, noise: dict | None = None) -> dict:
    """The summary of a record's finished runs (AP values are fractions in [0, 1]): per group
    the mean +- sd over seeds, epochs to AP 5, AP 10 and DETR's mean final AP, and the claims
    checked as measured (None where a group has no finished run yet). ``noise`` (``{group:
    subset_spread of one run}``) adds, per group, the evaluation's standard error of the final
    AP and AP_S next to the seeds' sd."""
    by_group: dict[str, list[dict]] = {}
    for r in runs:
        if r.get("finished"):
            by_group.setdefault(r["group"], []).append(r)
    detr_final = None
    if "detr" in by_group:
        detr_final = mean_sd(evaluated(r["curve"])[-1]["AP"] for r in by_group["detr"])["mean"]
    thresholds = {"AP 5": 0.05, "AP 10": 0.10}
    if detr_final is not None:
        thresholds["DETR final AP"] = detr_final
    groups = {g: group_summary(rs, thresholds) for g, rs in by_group.items()}
    for g, spread in (noise or {}).items():
        if g in groups:
            se = spread["standard_error"]
            groups[g]["evaluation_noise"] = {
                k: {"standard_error": se[k], "seed_sd": groups[g]["final"][k]["sd"],
                    "seed_sd_over_standard_error": groups[g]["final"][k]["sd"] / se[k] if se[k] > 0 else None}
                for k in ("AP", "AP_S")}
    claims = {"detr_mean_final_AP_at_least_10": None, "deformable_mean_final_AP_at_least_detr": None,
              "deformable_AP_S_gap": None, "deformable_AP_S_above_detr_by_5_points_and_2_summed_sd": None}
    if "detr" in groups:
        claims["detr_mean_final_AP_at_least_10"] = groups["detr"]["final"]["AP"]["mean"] >= 0.10
    if "detr" in groups and "deformable" in groups:
        d, f = groups["detr"]["final"], groups["deformable"]["final"]
        claims["deformable_mean_final_AP_at_least_detr"] = f["AP"]["mean"] >= d["AP"]["mean"]
        gap, summed_sd = f["AP_S"]["mean"] - d["AP_S"]["mean"], f["AP_S"]["sd"] + d["AP_S"]["sd"]
        claims["deformable_AP_S_gap"] = {"gap": gap, "summed_sd": summed_sd, "min_gap": min_ap_s_gap}
        claims["deformable_AP_S_above_detr_by_5_points_and_2_summed_sd"] = gap >= min_ap_s_gap and gap > 2 * summed_sd
    return {"detr_mean_final_AP": detr_final, "groups": groups, "claims": claims}


def table(summary: dict) -> list[dict]:
    """One row per summarized group: seeds, epochs, lr drop, final AP and AP_S as mean +- sd
    (percent), epochs to DETR's final AP (mean, and how many seeds reached it), mean wall seconds,
    and ``epochs_to``: per threshold label ``(mean, sd, reached)`` over the seeds that reached it."""
    rows = []
    for group, g in summary["groups"].items():
        reach = g["epochs_to"].get("DETR final AP", {})
        rows.append({"group": group, "seeds": len(g["seeds"]), "epochs": g["epochs"], "lr_drop": g["lr_drop"],
                     **{k: (100 * g["final"][k]["mean"], 100 * g["final"][k]["sd"]) for k in ("AP", "AP_S")},
                     "epochs_to_detr_final": (reach.get("mean"), reach.get("reached", 0)),
                     "wall_seconds": g["wall_seconds"]["mean"],
                     "epochs_to": {label: (e["mean"], e["sd"], e["reached"]) for label, e in g["epochs_to"].items()}})
    return rows


def format_table(summary: dict) -> str:
    """:func:`table` as aligned text."""
    lines = [f"{'group':13s} {'seeds':>5s} {'epochs':>6s} {'drop':>4s} {'AP':>12s} {'AP_S':>12s} "
             f"{'to DETR AP':>12s} {'wall s':>7s}"]
    for r in table(summary):
        mean, reached = r["epochs_to_detr_final"]
        reach = f"{mean:.1f} ({reached}/{r['seeds']})" if mean is not None else f"- (0/{r['seeds']})"
        wall = f"{r['wall_seconds']:.0f}" if r["wall_seconds"] is not None else "-"
        lines.append(f"{r['group']:13s} {r['seeds']:5d} {r['epochs']:6d} {r['lr_drop']:4d} "
                     f"{r['AP'][0]:6.1f} ± {r['AP'][1]:3.1f} {r['AP_S'][0]:6.1f} ± {r['AP_S'][1]:3.1f} "
                     f"{reach:>12s} {wall:>7s}")
    return "\n".join(lines)
