"""Where a training step of this package's detector spends its time, on the CPU.

Two views of one step (forward, matching, losses, backward) of the model that
:mod:`.versus_transformers` times:

* **stages** (wall seconds): the backbone, the encoder, the decoder, the matcher and the losses
  of the forward pass, timed by hooks on those modules, then the backward pass;
* **kinds of work** (shares of the step's CPU time, from ``torch.profiler``): the linear
  layers' matrix products, the convolutions, dropout's random masks, the deformable attention
  op (forward and backward, everything inside it), and the rest.

``python -m ddetr_minimal benchmark`` records both next to the comparison with transformers.
"""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Callable, Dict, Iterable

import torch
from torch import nn

# aten operators by kind of work (self CPU time); anything inside the op counts as the op
KINDS = {
    "linear layers": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
    "convolutions": ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::thnn_conv2d",
                     "aten::_slow_conv2d_forward", "aten::_slow_conv2d_backward"),
    "dropout masks": ("aten::bernoulli_",),
}
OP_EVENTS = ("_SparseMSDA", "_SparseMSDABackward", "ddetr_minimal::ms_deform_attn")  # the op's own events


def _timed(modules: Dict[str, nn.Module], seconds: Dict[str, float]):
    """Forward hooks adding each module's wall time (all its calls) to ``seconds[name]``."""
    handles, started = [], {}
    for name, module in modules.items():
        def pre(_m, _args, name=name):
            started[name] = time.perf_counter()

        def post(_m, _args, _out, name=name):
            seconds[name] += time.perf_counter() - started.pop(name)
        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return handles


def stage_seconds(model: nn.Module, criterion: nn.Module, forward: Callable, backward: Callable) -> Dict[str, float]:
    """Wall seconds of each stage of one step: ``forward()`` returns the loss, ``backward(loss)``."""
    seconds: Dict[str, float] = defaultdict(float)
    parts = {"backbone": model.backbone, "encoder": model.transformer.encoder,
             "decoder": model.transformer.decoder, "matcher": criterion.matcher, "criterion": criterion,
             "model": model}
    handles = _timed(parts, seconds)
    try:
        loss = forward()
        t0 = time.perf_counter()
        backward(loss)
        seconds["backward"] = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    rest = seconds.pop("model") - seconds["backbone"] - seconds["encoder"] - seconds["decoder"]
    return {"backbone": seconds["backbone"], "encoder": seconds["encoder"], "decoder": seconds["decoder"],
            "rest of the model (projections, heads)": rest, "matcher": seconds["matcher"],
            "losses": seconds.pop("criterion") - seconds["matcher"], "backward": seconds["backward"]}


def _inside_op(event) -> bool:
    while event is not None:
        if event.name in OP_EVENTS:
            return True
        event = event.cpu_parent
    return False


def kind_shares(events: Iterable) -> Dict[str, float]:
    """Shares of the self CPU time of profiler ``events`` by kind of work (they sum to 1)."""
    totals: Dict[str, float] = defaultdict(float)
    for e in events:
        if _inside_op(e):
            kind = "deformable attention op"
        else:
            kind = next((k for k, names in KINDS.items() if e.name in names), "everything else")
        totals[kind] += e.self_cpu_time_total
    total = sum(totals.values()) or 1.0
    order = (*KINDS, "deformable attention op", "everything else")
    return {k: totals.get(k, 0.0) / total for k in order}


def profile_step(model: nn.Module, criterion: nn.Module, step_inputs, threads: int = 2, warmup: int = 1) -> dict:
    """Stages and kinds of work of one training step of ``model`` on ``step_inputs``
    (an image batch and its targets), with ``threads`` threads."""
    images, targets = step_inputs

    def forward():
        model.zero_grad(set_to_none=True)
        return criterion.total_loss(criterion(model(images), targets))

    def backward(loss):
        loss.backward()

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(warmup):
            backward(forward())
        stages = stage_seconds(model, criterion, forward, backward)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            backward(forward())
        kinds = kind_shares(prof.events())
    finally:
        torch.set_num_threads(before)
    return {"threads": threads, "stages_s": stages, "step_s": sum(stages.values()), "kind_shares": kinds}


def report(profile: dict) -> str:
    n = profile["threads"]
    lines = [f"Our training step, {n} thread{'s' if n != 1 else ''}: {profile['step_s']:.2f} s"]
    for name, s in profile["stages_s"].items():
        lines.append(f"  {name:<40} {1e3 * s:8.1f} ms  {100 * s / profile['step_s']:5.1f} %")
    lines.append("  by kind of work (CPU time):")
    for name, share in profile["kind_shares"].items():
        lines.append(f"  {name:<40} {100 * share:5.1f} %")
    return "\n".join(lines)
