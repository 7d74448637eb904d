"""Side-by-side cost of vanilla and deformable attention, and of the op's backends.

Run ``python -m ddetr_minimal benchmark`` (CPU by default; ``--device cuda`` on a GPU). It prints,
in one run:

(a) forward+backward time and memory of an encoder self-attention layer, vanilla multi-head
    attention against single-scale deformable attention, as H*W grows, with the exponent of a
    power law ``t ~ (HW)^e`` fitted to the larger sizes;
(b) the op's ``loop`` and ``torch`` backends on one multi-scale case;
(c) on a CPU, when ``transformers`` is installed, this package against transformers'
    pure-PyTorch Deformable DETR (:mod:`ddetr_minimal.measure.versus_transformers`): the op's
    forward+backward time at the paper's and the toy experiment's shapes, its memory saved for
    backward, and a training step of the paper-sized detector;

and the ratios between them, then writes everything to a JSON file the book reads
(``data/bench/<device>/benchmark.json``).

Time: the median of a few repeats, all sizes measured in turn within each repeat; CPU time of
this process on a CPU (so other programs on a shared machine do not inflate it), wall time on a
GPU. Memory: on a GPU the peak allocated memory (``torch.cuda.max_memory_allocated``); on a CPU,
where PyTorch keeps no allocator statistics, the bytes of tensors autograd saves for the
backward pass (the activation memory), counted with ``saved_tensors_hooks``. The vanilla layer's
attention matrices dominate both.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, List, Sequence

import torch

from ..models.attention import MultiHeadAttention
from .cost import attention_flops, deformable_attention_flops
from ..models.deformable_attention import MSDeformAttn
from .cost import fit_exponent, grid_reference_points
from .timing import median_times
from .memory import saved_tensor_bytes
from .records import provenance, write_json
from ..ops.checks import level_start_index_from_shapes
from ..ops.msda import ms_deform_attn


def _clock(device: torch.device) -> str:
    # CPU time of this process on the CPU (other programs on a shared machine do not count);
    # wall time, synchronised, on a GPU
    return "wall" if device.type == "cuda" else "cpu"


def memory_bytes(fn: Callable[[], torch.Tensor], device: torch.device) -> int:
    """Peak memory of a forward+backward (GPU) or bytes saved for backward (CPU), see module doc."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn().sum().backward()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    return saved_tensor_bytes(fn)


def _fwd_bwd(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    return lambda: fn().sum().backward()


def encoder_layers(d_model: int, n_heads: int, n_points: int, device: torch.device):
    """A vanilla and a single-scale deformable self-attention layer of the same width."""
    torch.manual_seed(0)
    vanilla = MultiHeadAttention(d_model, n_heads).to(device)
    deform = MSDeformAttn(d_model, n_levels=1, n_heads=n_heads, n_points=n_points, backend="torch").to(device)
    return vanilla, deform


def bench_encoder_scaling(sides: Sequence[int], d_model: int = 64, n_heads: int = 8, n_points: int = 4,
                          device: torch.device = torch.device("cpu"), repeats: int = 3) -> List[dict]:
    """Time and memory of vanilla vs deformable self-attention over square maps of the given sides."""
    vanilla, deform = encoder_layers(d_model, n_heads, n_points, device)
    rows, calls = [], []
    for side in sides:
        H = W = side
        x = torch.randn(1, H * W, d_model, device=device, requires_grad=True)  # (1, HW, C)
        shapes = torch.tensor([[H, W]], device=device)
        lsi = level_start_index_from_shapes(shapes)
        ref = grid_reference_points(H, W).to(device).view(1, H * W, 1, 2)  # (1, HW, L=1, 2)

        # bind this size's tensors now: the calls are timed after the loop
        def run_vanilla(x=x):
            return vanilla(x, x, x)[0]

        def run_deform(x=x, ref=ref, shapes=shapes, lsi=lsi):
            return deform(x, ref, x, shapes, lsi)

        row = {"H": H, "W": W, "HW": H * W}
        for name, fn in (("vanilla", run_vanilla), ("deformable", run_deform)):
            calls.append((_fwd_bwd(fn), ()))
            row[f"{name}_bytes"] = memory_bytes(fn, device)
        row["vanilla_flops"] = attention_flops(H * W, H * W, d_model)
        row["deformable_flops"] = deformable_attention_flops(H * W, H * W, d_model, n_heads, 1, n_points)
        rows.append(row)
    # every size and layer measured in turn within each repeat, so load bursts spread evenly
    seconds = median_times(calls, repeats=repeats, min_seconds=0.02, clock=_clock(device))
    for i, row in enumerate(rows):
        row["vanilla_s"], row["deformable_s"] = seconds[2 * i], seconds[2 * i + 1]
    return rows


def bench_backends(device: torch.device = torch.device("cpu"), repeats: int = 3, n_queries: int = 500,
                   shapes: Sequence[Sequence[int]] = ((32, 32), (16, 16), (8, 8), (4, 4)),
                   n_heads: int = 8, head_dim: int = 32, n_points: int = 4) -> List[dict]:
    """Forward+backward of the op with every available backend on one multi-scale case."""
    g = torch.Generator().manual_seed(0)
    ss = torch.tensor(shapes, device=device)  # (L, 2)
    lsi = level_start_index_from_shapes(ss)
    L, S = len(shapes), int(ss.prod(1).sum())
    value = torch.randn(1, S, n_heads, head_dim, generator=g).to(device).requires_grad_()
    loc = torch.rand(1, n_queries, n_heads, L, n_points, 2, generator=g).to(device).requires_grad_()
    aw = torch.rand(1, n_queries, n_heads, L * n_points, generator=g).softmax(-1)
    aw = aw.view(1, n_queries, n_heads, L, n_points).to(device).requires_grad_()
    backends = ["loop", "torch"]
    if device.type == "cuda":
        from ..ops.cupy_kernel import is_available

        if is_available():
            backends.append("cupy")
    fns = [lambda b=b: ms_deform_attn(value, ss, lsi, loc, aw, backend=b) for b in backends]
    seconds = median_times([(_fwd_bwd(fn), ()) for fn in fns], repeats=repeats, min_seconds=0.02,
                           clock=_clock(device))
    return [{"backend": b, "fwd_bwd_s": t, "bytes": memory_bytes(fn, device)}
            for b, t, fn in zip(backends, seconds, fns)]


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


TINY_COMPARISON = dict(op_cases={"tiny": dict(N=1, Lq=30, M=2, D=4, P=2)}, levels=((4, 4), (2, 2)),
                       image_size=64, d_model=64, layers=2, ffn=64, num_queries=10, step_warmup=0)


def versus_transformers_part(args, device: torch.device) -> dict | None:
    """(c): print and return the comparison with transformers, or None (with the reason) when skipped."""
    from . import versus_transformers as vt

    why = ("--skip-transformers was given" if args.skip_transformers else
           "it runs on the CPU only (pass --device cpu)" if device.type != "cpu" else
           None if vt.transformers_available() else
           "transformers (or timm) is not installed: pip install transformers timm")
    if why:
        print(f"\nSkipping the comparison with transformers: {why}.")
        return None
    sizes = TINY_COMPARISON if args.tiny_comparison else {}
    print("\nMeasuring against transformers (the op on one thread, the training step on "
          f"{args.step_threads})...")
    versus = vt.compare(op_repeats=args.op_repeats, step_repeats=args.step_repeats,
                        step_threads=args.step_threads, **sizes)
    print(vt.report(versus))
    return versus


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m ddetr_minimal benchmark", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda when available)")
    p.add_argument("--sides", default="16,24,32,40,48,56",
                   help="comma-separated sides of the square feature maps (at least five)")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="JSON path (default data/bench/<device>/benchmark.json)")
    p.add_argument("--queries", type=int, default=500, help="queries in the backend comparison")
    p.add_argument("--threads", type=int, default=1,
                   help="PyTorch CPU threads while measuring (default 1: CPU time then counts work, "
                        "not threads spinning while they wait for a busy core)")
    p.add_argument("--force", action="store_true", help="overwrite an existing JSON file")
    p.add_argument("--skip-transformers", action="store_true", help="leave out the comparison with transformers")
    p.add_argument("--op-repeats", type=int, default=9, help="repeats of the op against transformers")
    p.add_argument("--step-repeats", type=int, default=5, help="repeats of the training step against transformers")
    p.add_argument("--step-threads", type=int, default=2, help="PyTorch threads of the training step")
    p.add_argument("--tiny-comparison", action="store_true",
                   help="compare with transformers on tiny shapes and a tiny detector (a check that it runs)")
    args = p.parse_args(argv)

    sides = [int(s) for s in args.sides.split(",") if s.strip()]
    if len(sides) < 5 or any(s <= 0 for s in sides):
        p.error(f"--sides needs at least five positive sizes, got {args.sides!r}")
    device = torch.device(args.device)
    if args.threads < 1:
        p.error(f"--threads must be a positive integer, got {args.threads}")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda was asked for, but torch.cuda.is_available() is False")
    out = args.out or os.path.join("data", "bench", device.type, "benchmark.json")
    if os.path.exists(out) and not args.force:
        p.error(f"--out {out} exists; pass --force to overwrite it")

    print(f"Encoder self-attention, forward+backward, d_model={args.d_model}, on {device}")
    rows = bench_encoder_scaling(sides, d_model=args.d_model, device=device, repeats=args.repeats)
    mem_label = "peak mem" if device.type == "cuda" else "saved for bwd"
    print(f"{'HW':>6} {'vanilla ms':>11} {'deform ms':>10} {'ratio':>7} {'vanilla ' + mem_label:>22} "
          f"{'deform ' + mem_label:>22} {'ratio':>7}")
    for r in rows:
        print(f"{r['HW']:>6} {1e3 * r['vanilla_s']:>11.2f} {1e3 * r['deformable_s']:>10.2f} "
              f"{r['vanilla_s'] / r['deformable_s']:>7.2f} {_fmt_bytes(r['vanilla_bytes']):>22} "
              f"{_fmt_bytes(r['deformable_bytes']):>22} {r['vanilla_bytes'] / r['deformable_bytes']:>7.2f}")
    tail = rows[-4:]  # fit on the larger sizes, where the leading term dominates
    hw = [r["HW"] for r in tail]
    exps = {
        "vanilla_time": fit_exponent(hw, [r["vanilla_s"] for r in tail])[0],
        "deformable_time": fit_exponent(hw, [r["deformable_s"] for r in tail])[0],
        "vanilla_memory": fit_exponent(hw, [r["vanilla_bytes"] for r in tail])[0],
        "deformable_memory": fit_exponent(hw, [r["deformable_bytes"] for r in tail])[0],
        "vanilla_flops": fit_exponent(hw, [r["vanilla_flops"] for r in tail])[0],
        "deformable_flops": fit_exponent(hw, [r["deformable_flops"] for r in tail])[0],
    }
    print("Fitted exponents e in cost ~ (HW)^e over HW = " + ", ".join(map(str, hw)) + ":")
    for k, v in exps.items():
        print(f"  {k:<18} {v:.2f}")

    print(f"\nThe op's backends on levels (32,32),(16,16),(8,8),(4,4), {args.queries} queries, 8 heads, D=32, P=4:")
    brows = bench_backends(device, repeats=args.repeats, n_queries=args.queries)
    base = next(r for r in brows if r["backend"] == "torch")
    for r in brows:
        print(f"  {r['backend']:<6} {1e3 * r['fwd_bwd_s']:>9.2f} ms  {_fmt_bytes(r['bytes']):>11}  "
              f"time vs torch x{r['fwd_bwd_s'] / base['fwd_bwd_s']:.2f}  memory vs torch x{r['bytes'] / base['bytes']:.2f}")

    versus = versus_transformers_part(args, device)

    result = {
        **provenance(["python", "-m", "ddetr_minimal", "benchmark", *(argv if argv is not None else sys.argv[1:])]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "memory_kind": "peak_allocated" if device.type == "cuda" else "saved_for_backward",
        "d_model": args.d_model,
        "encoder": rows,
        "exponents": exps,
        "exponent_fit_hw": hw,
        "backends": brows,
        "versus_transformers": versus,
    }
    write_json(out, result)
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
