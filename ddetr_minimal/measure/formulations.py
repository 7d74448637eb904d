"""Pure-PyTorch formulations of the op, timed against transformers' on the CPU.

Run ``python -m ddetr_minimal bench-formulations`` (needs ``transformers``). Every formulation
below computes the op of :func:`ddetr_minimal.ops.msda.ms_deform_attn`; all but ``sparse``
with ``grid_sample``, differing in how the samples are laid out and mixed, which decides how
much memory each pass reads and writes. ``sparse`` (:mod:`ddetr_minimal.ops.sparse`) writes no
samples at all: the op as sparse matrix products. Each is first checked against the ``loop`` reference (numbers and gradients,
float64), then timed forward+backward on one thread (CPU time, the median of interleaved
repeats) at the shapes of :data:`ddetr_minimal.measure.versus_transformers.OP_CASES`, next to
transformers' formulation, and the bytes it saves for the backward pass are counted. The result
goes to ``data/bench/cpu/formulations.json``; the ``torch`` backend keeps the fastest on the CPU.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, Sequence

import torch
import torch.nn.functional as F

from ..ops.grid_sample import ms_deform_attn_grid_sample
from ..ops.reference import ms_deform_attn_loop
from ..ops.sparse import ms_deform_attn_sparse
from .memory import saved_tensor_bytes
from .records import provenance, write_json
from .versus_transformers import OP_CASES, fwd_bwd, interleaved_times, op_inputs, transformers_op


def _sample(value_l, grid_l):
    return F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)


def _levels(value, shapes):
    """value (N, S, M, D) -> one (N*M, D, H, W) map per level."""
    N, _, M, D = value.shape
    return [v.permute(0, 2, 3, 1).reshape(N * M, D, H, W)  # (N*M, D, H, W)
            for (H, W), v in zip(shapes, value.split([H * W for H, W in shapes], dim=1))]


def stacked(value, spatial_shapes, lsi, loc, weights, mix="mul"):
    """All levels' samples stacked into one (N*M, D, Lq, L*P) tensor, then mixed (transformers'
    layout, and this package's before); ``mix`` is "mul" (product and sum) or "einsum"."""
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = loc.shape
    shapes = spatial_shapes.tolist()
    grids = (2 * loc - 1).transpose(1, 2)  # (N, M, Lq, L, P, 2)
    samples = torch.stack([_sample(v, grids[:, :, :, l].reshape(N * M, Lq, P, 2))
                           for l, v in enumerate(_levels(value, shapes))], dim=-2)  # (N*M, D, Lq, L, P)
    samples = samples.flatten(-2)  # (N*M, D, Lq, L*P)
    w = weights.transpose(1, 2).reshape(N * M, Lq, L * P)  # (N*M, Lq, L*P)
    if mix == "einsum":
        out = torch.einsum("bdqj,bqj->bdq", samples, w)  # (N*M, D, Lq)
    else:
        out = (samples * w[:, None]).sum(-1)  # (N*M, D, Lq)
    return out.reshape(N, M * D, Lq).transpose(1, 2).contiguous()  # (N, Lq, M*D)


def per_level_queries_first(value, spatial_shapes, lsi, loc, weights, mix="mul", channels_last=False):
    """One level at a time, summed as it comes; grid (N*M, Lq, P, 2), the sum over the last axis P.
    ``mix="bmm"`` sums with a batched matrix product; ``channels_last`` stores each map as NHWC."""
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = loc.shape
    grids = (2 * loc - 1).transpose(1, 2)  # (N, M, Lq, L, P, 2)
    w = weights.transpose(1, 2)  # (N, M, Lq, L, P)
    out = 0
    for l, v in enumerate(_levels(value, spatial_shapes.tolist())):
        if channels_last:
            v = v.contiguous(memory_format=torch.channels_last)
        s = _sample(v, grids[:, :, :, l].reshape(N * M, Lq, P, 2))  # (N*M, D, Lq, P)
        w_l = w[:, :, :, l].reshape(N * M, Lq, P, 1)  # (N*M, Lq, P, 1)
        if mix == "bmm":
            out = out + torch.matmul(s.transpose(1, 2), w_l).squeeze(-1).transpose(1, 2)  # (N*M, D, Lq)
        else:
            out = out + (s * w_l.squeeze(-1)[:, None]).sum(-1)  # (N*M, D, Lq)
    return out.reshape(N, M * D, Lq).transpose(1, 2).contiguous()  # (N, Lq, M*D)


def per_level_points_first(value, spatial_shapes, lsi, loc, weights):
    """The kept layout (grid (N*M, P, Lq, 2), levels split once), mixed by a product and a sum
    over P instead of one multiply-add per point."""
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = loc.shape
    grids = (2 * loc - 1).permute(3, 0, 2, 4, 1, 5).reshape(L, N * M, P, Lq, 2).contiguous()  # (L, N*M, P, Lq, 2)
    w = weights.permute(3, 0, 2, 4, 1).reshape(L, N * M, 1, P, Lq).contiguous()  # (L, N*M, 1, P, Lq)
    out = 0
    for v, g, w_l in zip(_levels(value, spatial_shapes.tolist()), grids.unbind(0), w.unbind(0)):
        out = out + (_sample(v, g) * w_l).sum(2)  # (N*M, D, Lq)
    return out.reshape(N, M * D, Lq).transpose(1, 2).contiguous()  # (N, Lq, M*D)


def canvas(value, spatial_shapes, lsi, loc, weights):
    """One grid_sample over all levels: the maps stacked into one canvas, a zero row under each
    and zero columns right of the narrower ones; points outside their level are moved off it."""
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = loc.shape
    shapes = spatial_shapes.tolist()
    Wc = max(W for _, W in shapes)
    maps = [F.pad(v, (0, Wc - W, 0, 1)) for (_, W), v in zip(shapes, _levels(value, shapes))]
    board = torch.cat(maps, dim=2)  # (N*M, D, Hc, Wc)
    Hc = board.shape[2]
    hw = spatial_shapes.to(loc.dtype)  # (L, 2) as (H, W)
    top = torch.tensor([0] + [H + 1 for H, _ in shapes[:-1]], dtype=loc.dtype).cumsum(0)  # (L,)
    x = loc[..., 0] * hw[:, 1, None]  # (N, Lq, M, L, P) in pixels of the level, + 0.5
    y = loc[..., 1] * hw[:, 0, None]  # (N, Lq, M, L, P)
    inside = (y >= -0.5) & (y < hw[:, 0, None] + 0.5)  # rows that can touch the level
    gy = torch.where(inside, 2 * (y + top[:, None]) / Hc - 1, torch.full_like(y, -3.0))  # off the canvas
    grid = torch.stack((2 * x / Wc - 1, gy), -1)  # (N, Lq, M, L, P, 2)
    grid = grid.permute(0, 2, 3, 4, 1, 5).reshape(N * M, L * P, Lq, 2)  # (N*M, L*P, Lq, 2)
    w = weights.permute(0, 2, 3, 4, 1).reshape(N * M, 1, L * P, Lq)  # (N*M, 1, L*P, Lq)
    out = (_sample(board, grid) * w).sum(2)  # (N*M, D, Lq)
    return out.view(N, M * D, Lq).transpose(1, 2).contiguous()  # (N, Lq, M*D)


# name -> (function, what it is)
FORMULATIONS: Dict[str, tuple] = {
    "stacked": (stacked, "all levels stacked, then product and sum (transformers' layout; this backend before)"),
    "stacked_einsum": (lambda *a: stacked(*a, mix="einsum"), "all levels stacked, mixed by einsum"),
    "per_level": (per_level_queries_first, "one level at a time, summed as it comes (queries before points)"),
    "per_level_bmm": (lambda *a: per_level_queries_first(*a, mix="bmm"), "one level at a time, mixed by a batched matmul"),
    "per_level_channels_last": (lambda *a: per_level_queries_first(*a, channels_last=True),
                                "one level at a time, each map stored channels-last"),
    "per_level_points_first": (per_level_points_first,
                               "one level at a time, points before queries, product and sum over P"),
    "canvas": (canvas, "one grid_sample over all levels on a zero-separated canvas"),
    "grid_sample": (ms_deform_attn_grid_sample,
                    "per level, points before queries, one addcmul per point (the torch backend on GPUs)"),
    "sparse": (ms_deform_attn_sparse, "sparse matrix products, corner by corner (the torch backend on the CPU)"),
}


def check(fn: Callable) -> float:
    """Largest difference to the loop reference, values and gradients, on a small float64 case."""
    inputs = op_inputs(2, 7, 3, 4, 2, levels=((5, 6), (3, 2), (1, 1)), dtype=torch.float64, seed=3)
    worst = 0.0
    for i, f in enumerate((fn, ms_deform_attn_loop)):
        out = f(*inputs)
        grads = torch.autograd.grad(out, (inputs[0], inputs[3], inputs[4]), torch.ones_like(out) + out.detach())
        if i == 0:
            mine = (out.detach(), *grads)
        else:
            worst = max((a - b).abs().max().item() for a, b in zip(mine, (out.detach(), *grads)))
    return worst


def measure(cases: Dict[str, dict], names: Sequence[str], repeats: int = 7, compile_kept: bool = True) -> list:
    """Rows (case, formulation, seconds, ratio to transformers, saved bytes) for every case."""
    theirs = transformers_op()
    rows = []
    for case, sizes in cases.items():
        inputs = op_inputs(**sizes)
        calls = {"transformers": fwd_bwd(theirs, inputs)}
        fns = {name: FORMULATIONS[name][0] for name in names}
        value, shapes = inputs[0], inputs[1].tolist()
        N, _, M, D = value.shape
        # "value kept as (N*M, D, H, W)": the per-level maps arrive in grid_sample's layout
        maps = [v.detach().clone().requires_grad_() for v in _levels(value, shapes)]
        fns["value_kept_nmdhw"] = lambda v, ss, lsi, loc, w: _kept_layout(maps, ss, loc, w)
        if compile_kept:
            fns["torch_compile"] = torch.compile(ms_deform_attn_grid_sample, dynamic=False)
        calls.update({name: fwd_bwd(fn, inputs) for name, fn in fns.items()})
        seconds = {k: v["cpu"] for k, v in interleaved_times(calls, repeats).items()}
        for name in calls:
            fn = theirs if name == "transformers" else fns[name]
            rows.append({"case": case, **sizes, "formulation": name, "fwd_bwd_s": seconds[name],
                         "ratio_to_transformers": seconds[name] / seconds["transformers"],
                         "saved_bytes": saved_tensor_bytes(fn, *inputs)})
    return rows


def _kept_layout(maps, spatial_shapes, loc, weights):
    """The grid_sample formulation with each level's value already laid out as (N*M, D, H, W)."""
    N, Lq, M, L, P, _ = loc.shape
    D = maps[0].shape[1]
    grids = (2 * loc - 1).permute(3, 0, 2, 4, 1, 5).reshape(L, N * M, P, Lq, 2).contiguous()  # (L, N*M, P, Lq, 2)
    w = weights.permute(3, 0, 2, 4, 1).reshape(L, N * M, 1, P, Lq).contiguous()  # (L, N*M, 1, P, Lq)
    out = maps[0].new_zeros(N * M, D, Lq)
    for v, g, w_l in zip(maps, grids.unbind(0), w.unbind(0)):
        for s_p, w_p in zip(_sample(v, g).unbind(2), w_l.unbind(2)):  # (N*M, D, Lq), (N*M, 1, Lq)
            out = torch.addcmul(out, s_p, w_p)  # (N*M, D, Lq)
    return out.view(N, M * D, Lq).transpose(1, 2).contiguous()  # (N, Lq, M*D)


DESCRIPTIONS = {**{k: v[1] for k, v in FORMULATIONS.items()},
                "transformers": "transformers' MultiScaleDeformableAttention (pure PyTorch)",
                "value_kept_nmdhw": "grid_sample, value already laid out per level as (N*M, D, H, W)",
                "torch_compile": "grid_sample through torch.compile (inductor, C++ on the CPU)"}


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m ddetr_minimal bench-formulations", description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out (it compiles for minutes)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (a check that everything runs)")
    p.add_argument("--out", default=os.path.join("data", "bench", "cpu", "formulations.json"))
    p.add_argument("--force", action="store_true", help="overwrite an existing JSON file")
    args = p.parse_args(argv)
    if os.path.exists(args.out) and not args.force:
        p.error(f"--out {args.out} exists; pass --force to overwrite it")
    bad = {name: d for name, (fn, _) in FORMULATIONS.items() if (d := check(fn)) > 1e-9}
    if bad:
        raise RuntimeError(f"formulations differ from the loop reference: {bad}")
    cases = {"tiny": dict(N=1, Lq=30, M=2, D=4, P=2)} if args.tiny else OP_CASES
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = measure(cases, list(FORMULATIONS), args.repeats, compile_kept=not args.no_compile)
    finally:
        torch.set_num_threads(before)
    print("Formulations of the op, forward+backward, one thread (CPU time); ratio to transformers':")
    for r in rows:
        print(f"  {r['case']:<6} {r['formulation']:<24} {1e3 * r['fwd_bwd_s']:>8.1f} ms  x{r['ratio_to_transformers']:.2f}"
              f"  saved {r['saved_bytes'] / 2**20:6.1f} MiB")
    import transformers

    result = {**provenance(["python", "-m", "ddetr_minimal", "bench-formulations",
                            *(argv if argv is not None else sys.argv[1:])]),
              "transformers": transformers.__version__, "threads": 1, "clock": "cpu",
              "descriptions": DESCRIPTIONS, "rows": rows}
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
