"""This package's CPU path against Hugging Face ``transformers``' pure-PyTorch Deformable DETR.

Measured side by side in one process, with the same inputs:

* **the op**, forward+backward: the ``torch`` backend against transformers'
  ``MultiScaleDeformableAttention`` (its pure-PyTorch formulation), at the shapes of
  :data:`OP_CASES`: an encoder layer of the paper's model on four levels 32x32..4x4 (M=8, D=32),
  and the encoder of the toy experiment (M=4, D=16, 256x256 images, batch 4);
* **the op's memory**: bytes autograd saves for the backward pass
  (:func:`ddetr_minimal.measure.memory.saved_tensor_bytes`), the activation memory of training;
* **a training step** of the paper-sized detector (ResNet-50, d=256, 6+6 layers, 300 queries,
  random weights, batch 1): forward, matching, losses, backward, against
  ``DeformableDetrForObjectDetection`` built with the same configuration (timm's ResNet-50
  without pretrained weights, frozen batch norm, stem and first stage frozen as here, the
  same dropout, the paper's matching costs, focal loss and auxiliary losses);
* **where our step's time goes**, by stage and by kind of work (:mod:`.step_profile`).

``transformers`` (and ``timm`` for its backbone) are benchmark and test dependencies only;
they are imported inside the functions below, never when the package is imported.
"""
from __future__ import annotations

import importlib.util
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .memory import saved_tensor_bytes
from .step_profile import profile_step
from .step_profile import report as step_report
from ..ops.checks import level_start_index_from_shapes
from ..ops.msda import ms_deform_attn

LEVELS = ((32, 32), (16, 16), (8, 8), (4, 4))
# name -> (N, Lq, M, D, P): the paper's encoder layer on these levels, and the toy experiment's encoder
OP_CASES = {
    "paper": dict(N=4, Lq=1360, M=8, D=32, P=4),
    "toy": dict(N=4, Lq=1360, M=4, D=16, P=4),
}


def transformers_available() -> bool:
    """True when ``transformers`` can be imported (and ``timm``, which its detector's backbone needs)."""
    return all(importlib.util.find_spec(name) is not None for name in ("transformers", "timm"))


def transformers_op() -> Callable:
    """transformers' pure-PyTorch op, called with this package's signature."""
    from transformers.models.deformable_detr import modeling_deformable_detr as hf

    if hasattr(hf, "multi_scale_deformable_attention"):  # transformers 4.x: a function
        def op(value, shapes, lsi, loc, weights):
            return hf.multi_scale_deformable_attention(value, shapes, loc, weights)
        return op
    module = hf.MultiScaleDeformableAttention()  # transformers 5.x: a module, same computation

    def op(value, shapes, lsi, loc, weights):
        return module(value, shapes, [tuple(s) for s in shapes.tolist()], lsi, loc, weights, 64)
    return op


def op_inputs(N: int, Lq: int, M: int, D: int, P: int, levels: Sequence[Sequence[int]] = LEVELS,
              dtype=torch.float32, seed: int = 0):
    """Random inputs of the op's contract: (value, spatial_shapes, level_start_index, locations, weights)."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(levels, dtype=torch.int64)  # (L, 2)
    L, S = len(levels), int(shapes.prod(1).sum())
    value = torch.randn(N, S, M, D, generator=g, dtype=dtype).requires_grad_()  # (N, S, M, D)
    loc = (-0.1 + 1.2 * torch.rand(N, Lq, M, L, P, 2, generator=g, dtype=dtype)).requires_grad_()
    weights = torch.rand(N, Lq, M, L * P, generator=g, dtype=dtype).softmax(-1)  # (N, Lq, M, L*P)
    weights = weights.view(N, Lq, M, L, P).requires_grad_()  # (N, Lq, M, L, P)
    return value, shapes, level_start_index_from_shapes(shapes), loc, weights


def fwd_bwd(fn: Callable, inputs) -> Callable[[], None]:
    """One forward+backward of ``fn(*inputs)``, gradients of the inputs cleared each time."""
    def run():
        for t in inputs:
            t.grad = None
        out = fn(*inputs)
        out.backward(torch.ones_like(out))
    return run


def interleaved_times(calls: Dict[str, Callable[[], None]], repeats: int, warmup: int = 1
                      ) -> Dict[str, Dict[str, float]]:
    """Median wall and CPU seconds of each call, the calls taken in turn within every repeat
    (a burst of load from other programs then spreads over all of them).

    ``"cpu"`` is the CPU time of this process (other programs on the machine do not count),
    ``"wall"`` the elapsed time.
    """
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    seconds = {name: {"wall": [], "cpu": []} for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            seconds[name]["cpu"].append(time.process_time() - cpu)
            seconds[name]["wall"].append(time.perf_counter() - wall)
    return {name: {k: statistics.median(v) for k, v in s.items()} for name, s in seconds.items()}


def compare_op(cases: Optional[Dict[str, dict]] = None, levels: Sequence[Sequence[int]] = LEVELS,
               repeats: int = 7) -> List[dict]:
    """The op's forward+backward time and saved-for-backward bytes, ours against transformers'."""
    theirs = transformers_op()
    ours = lambda *a: ms_deform_attn(*a, backend="torch")  # noqa: E731
    rows = []
    for name, case in (cases or OP_CASES).items():
        inputs = op_inputs(levels=levels, **case)
        with torch.no_grad():  # same numbers before timing anything
            diff = (ours(*inputs) - theirs(*inputs)).abs().max().item()
        t = interleaved_times({"ours": fwd_bwd(ours, inputs), "transformers": fwd_bwd(theirs, inputs)}, repeats)
        t = {k: v["cpu"] for k, v in t.items()}
        mem = {k: saved_tensor_bytes(fn, *inputs) for k, fn in (("ours", ours), ("transformers", theirs))}
        rows.append({"case": name, **case, "levels": [list(s) for s in levels],
                     "ours_s": t["ours"], "transformers_s": t["transformers"],
                     "time_ratio": t["ours"] / t["transformers"],
                     "ours_saved_bytes": mem["ours"], "transformers_saved_bytes": mem["transformers"],
                     "memory_ratio": mem["ours"] / mem["transformers"], "max_abs_diff": diff})
    return rows


def build_ours(num_classes: int = 91, d_model: int = 256, layers: int = 6, ffn: int = 1024,
               num_queries: int = 300, seed: int = 0):
    """This package's paper-sized Deformable DETR (model, criterion), in training mode."""
    from ..models.build import build_model

    torch.manual_seed(seed)
    model, criterion, _ = build_model("deformable", num_classes=num_classes, backbone="resnet50", d_model=d_model,
                                      enc_layers=layers, dec_layers=layers, dim_feedforward=ffn,
                                      num_queries=num_queries, backend="torch")
    return model.train(), criterion


def build_pair(image_size: int = 320, num_classes: int = 91, d_model: int = 256, layers: int = 6,
               ffn: int = 1024, num_queries: int = 300, seed: int = 0):
    """This package's Deformable DETR (model, criterion) and transformers' with the same configuration."""
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

    model, criterion = build_ours(num_classes, d_model, layers, ffn, num_queries, seed)
    config = DeformableDetrConfig(
        use_timm_backbone=True, backbone="resnet50", use_pretrained_backbone=False, num_labels=num_classes,
        d_model=d_model, encoder_layers=layers, decoder_layers=layers, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn,
        num_queries=num_queries, num_feature_levels=4, encoder_n_points=4, decoder_n_points=4,
        two_stage=False, with_box_refine=False, auxiliary_loss=True,
        dropout=0.1, activation_dropout=0.1, attention_dropout=0.1,  # as here: FFN and decoder self-attention
        class_cost=2, bbox_cost=5, giou_cost=2, bbox_loss_coefficient=5, giou_loss_coefficient=2, focal_alpha=0.25)
    theirs = DeformableDetrForObjectDetection(config)
    # as here (and in the paper's code): the stem and the first stage of the backbone are frozen
    for name, p in theirs.model.backbone.named_parameters():
        if not any(stage in name for stage in ("layer2", "layer3", "layer4")):
            p.requires_grad_(False)
    return (model, criterion), theirs.train()


def step_inputs(image_size: int = 320):
    """The training step's image (1, 3, H, W) and its three targets (labels, (cx, cy, w, h) boxes)."""
    g = torch.Generator().manual_seed(1)
    image = torch.randn(1, 3, image_size, image_size, generator=g)  # (1, 3, H, W)
    labels = torch.tensor([1, 5, 7])
    boxes = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4], [0.5, 0.8, 0.1, 0.1]])  # (cx, cy, w, h)
    return image, [{"labels": labels, "boxes": boxes}]


def training_steps(image_size: int = 320, **sizes) -> Dict[str, Callable[[], None]]:
    """One training step (forward, matching, losses, backward) of each detector on the same image."""
    (model, criterion), theirs = build_pair(image_size, **sizes)
    image, targets = step_inputs(image_size)
    labels, boxes = targets[0]["labels"], targets[0]["boxes"]

    def ours():
        model.zero_grad(set_to_none=True)
        losses = criterion(model(image), targets)
        criterion.total_loss(losses).backward()

    def transformers():
        theirs.zero_grad(set_to_none=True)
        theirs(pixel_values=image, labels=[{"class_labels": labels, "boxes": boxes}]).loss.backward()
    return {"ours": ours, "transformers": transformers}


def compare_training_step(image_size: int = 320, threads: int = 2, repeats: int = 5, warmup: int = 1,
                          **sizes) -> dict:
    """Wall and CPU seconds of one training step, ours against transformers', with ``threads`` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t = interleaved_times(training_steps(image_size, **sizes), repeats, warmup)
    finally:
        torch.set_num_threads(before)
    ours, theirs = t["ours"], t["transformers"]
    return {"image_size": image_size, "threads": threads, "repeats": repeats, **sizes,
            "ours_wall_s": ours["wall"], "transformers_wall_s": theirs["wall"],
            "time_ratio": ours["wall"] / theirs["wall"],
            "ours_cpu_s": ours["cpu"], "transformers_cpu_s": theirs["cpu"],
            "cpu_time_ratio": ours["cpu"] / theirs["cpu"]}


def compare(op_repeats: int = 7, step_repeats: int = 5, step_threads: int = 2, image_size: int = 320,
            op_cases: Optional[Dict[str, dict]] = None, levels: Sequence[Sequence[int]] = LEVELS,
            step_warmup: int = 1, **step_sizes) -> dict:
    """Everything above, as one record (the op on one thread, the training step on ``step_threads``)."""
    import transformers

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU time then counts work, not threads waiting for a busy core
    try:
        op = compare_op(op_cases, levels, op_repeats)
    finally:
        torch.set_num_threads(before)
    step = compare_training_step(image_size, step_threads, step_repeats, step_warmup, **step_sizes)
    profile = profile_step(*build_ours(**step_sizes), step_inputs(image_size), step_threads, max(step_warmup, 1))
    return {"transformers": transformers.__version__, "op": op, "training_step": step,
            "training_step_profile": {"image_size": image_size, **profile}}


def report(result: dict) -> str:
    """The ratios side by side, as printed by the benchmark."""
    w = 52
    lines = [f"Against transformers {result['transformers']} (pure PyTorch); ratio = ours / transformers'",
             f"  {'':<{w}} {'ours':>10} {'transformers':>13} {'ratio':>6}"]
    for r in result["op"]:
        label = f"op fwd+bwd, {r['case']} (N={r['N']} Lq={r['Lq']} M={r['M']} D={r['D']} P={r['P']})"
        lines.append(f"  {label:<{w}} {1e3 * r['ours_s']:>7.1f} ms {1e3 * r['transformers_s']:>10.1f} ms "
                     f"{r['time_ratio']:>6.2f}")
    for r in result["op"]:
        label = f"op memory saved for backward, {r['case']}"
        lines.append(f"  {label:<{w}} {r['ours_saved_bytes'] / 2**20:>6.1f} MiB {r['transformers_saved_bytes'] / 2**20:>9.1f}"
                     f" MiB {r['memory_ratio']:>6.2f}")
    s = result["training_step"]
    label = f"training step {s['image_size']}x{s['image_size']}, {s['threads']} threads, wall"
    lines.append(f"  {label:<{w}} {s['ours_wall_s']:>8.2f} s {s['transformers_wall_s']:>11.2f} s {s['time_ratio']:>6.2f}")
    label = f"training step {s['image_size']}x{s['image_size']}, {s['threads']} threads, CPU time"
    lines.append(f"  {label:<{w}} {s['ours_cpu_s']:>8.2f} s {s['transformers_cpu_s']:>11.2f} s {s['cpu_time_ratio']:>6.2f}")
    if "training_step_profile" in result:
        lines += ["", step_report(result["training_step_profile"])]
    return "\n".join(lines)
