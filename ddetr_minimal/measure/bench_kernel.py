"""Time the CUDA kernel against the ``torch`` backend at Deformable DETR's scale (GPU only).

    python -m ddetr_minimal bench-kernel [--repeats 50] [--warmup 10] [--out-dir data/bench] [--force]

Two workloads, as in the paper's detector (ResNet-50, 4 levels, 8 heads of 32 channels,
4 points per head and level, batch 2, an 800 x 1333 image):

* ``encoder``: every position of the four maps is a query (Lq = sum H_l * W_l = 22223);
* ``decoder``: 300 object queries.

Each runs in float32 and in bfloat16, with both backends. For every case the script
records the median time of the forward pass and of forward + backward (CUDA events,
after warm-up), the peak of PyTorch's allocator above the inputs, and the largest
difference between the two backends' outputs. Results go to ``<out-dir>/<gpu-name>.json``
with the GPU, driver, versions, date and command; an existing file is only replaced
with ``--force``. Without a usable GPU and CuPy the script exits with a message.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from .records import provenance, write_json
from ..ops.cupy_kernel import missing
from ..ops.random_inputs import random_op_inputs
from ..ops.msda import ms_deform_attn

LEVEL_SHAPES = ((100, 167), (50, 84), (25, 42), (13, 21))
BATCH, HEADS, HEAD_DIM, POINTS = 2, 8, 32, 4
DECODER_QUERIES = 300
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BACKENDS = ("cupy", "torch")


def make_inputs(n_queries: int, dtype: torch.dtype, device: str = "cuda", seed: int = 0):
    """Random op inputs at the benchmark's scale: locations in [0, 1], softmaxed weights."""
    return random_op_inputs(LEVEL_SHAPES, N=BATCH, Lq=n_queries, M=HEADS, D=HEAD_DIM, P=POINTS, dtype=dtype,
                            device=device, seed=seed)


def median_ms(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    """Median wall time of ``fn`` on the GPU in milliseconds, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def peak_mib(fn: Callable[[], object]) -> float:
    """Peak memory PyTorch's allocator holds while ``fn`` runs, above what was held before (MiB)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def bench_case(n_queries: int, dtype: torch.dtype, backend: str, repeats: int, warmup: int) -> Dict[str, float]:
    """Forward and forward+backward timings and peak memory of one backend on one workload."""
    value, shapes, starts, loc, weights = make_inputs(n_queries, dtype)

    def forward():
        with torch.no_grad():
            return ms_deform_attn(value, shapes, starts, loc, weights, backend=backend)

    leaves = [t.detach().requires_grad_(True) for t in (value, loc, weights)]
    grad_out = torch.randn(BATCH, n_queries, HEADS * HEAD_DIM, device="cuda", dtype=dtype)  # (N, Lq, M*D)

    def forward_backward():
        out = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2], backend=backend)
        return torch.autograd.grad(out, leaves, grad_out)

    return {
        "forward_ms": median_ms(forward, repeats, warmup),
        "forward_backward_ms": median_ms(forward_backward, repeats, warmup),
        "forward_peak_mib": peak_mib(forward),
        "forward_backward_peak_mib": peak_mib(forward_backward),
    }


def max_difference(n_queries: int, dtype: torch.dtype) -> float:
    """Largest |kernel - torch backend| over the output of one workload (a sanity check)."""
    inputs = make_inputs(n_queries, dtype)
    with torch.no_grad():
        a = ms_deform_attn(*inputs, backend="cupy").float()
        b = ms_deform_attn(*inputs, backend="torch").float()
    return (a - b).abs().max().item()


def _driver_version() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(argv: List[str]) -> Dict[str, object]:
    """Where, when and with what the numbers were measured."""
    import cupy

    driver_api = cupy.cuda.runtime.driverGetVersion()
    return {
        "gpu": torch.cuda.get_device_name(),
        "driver": _driver_version(),
        "cuda_driver_api": f"{driver_api // 1000}.{driver_api % 1000 // 10}",
        "cuda_runtime_torch": torch.version.cuda,
        "torch": torch.__version__,
        "cupy": cupy.__version__,
        **provenance(["python", "-m", "ddetr_minimal", "bench-kernel", *argv]),
    }


def output_path(out_dir: Path, gpu_name: str) -> Path:
    """``out_dir/<gpu name with unsafe characters replaced by '-'>.json``."""
    return Path(out_dir) / (re.sub(r"[^A-Za-z0-9._-]+", "-", gpu_name).strip("-") + ".json")


def write_result(path: Path, data: Dict[str, object], force: bool = False) -> None:
    """Write ``data`` as JSON; refuse to replace an existing file unless ``force``."""
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists; pass --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, data)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m ddetr_minimal bench-kernel", description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=50, help="timed runs per case (median reported)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs before timing")
    parser.add_argument("--out-dir", type=Path, default=Path("data/bench"), help="folder for <gpu-name>.json")
    parser.add_argument("--force", action="store_true", help="replace an existing result file")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")

    problems = missing()
    if problems:
        sys.exit("bench_kernel needs a CUDA GPU and CuPy, and cannot run here: " + "; ".join(problems))
    path = output_path(args.out_dir, torch.cuda.get_device_name())
    if path.exists() and not args.force:
        sys.exit(f"{path} already exists; pass --force to replace it")

    encoder_queries = sum(h * w for h, w in LEVEL_SHAPES)
    results = []
    for scale, n_queries in (("encoder", encoder_queries), ("decoder", DECODER_QUERIES)):
        for dtype_name, dtype in DTYPES.items():
            diff = max_difference(n_queries, dtype)
            for backend in BACKENDS:
                row = {"scale": scale, "queries": n_queries, "dtype": dtype_name, "backend": backend,
                       **bench_case(n_queries, dtype, backend, args.repeats, args.warmup),
                       "max_abs_diff_kernel_vs_torch": diff}
                print(json.dumps(row))
                results.append(row)

    data = {
        **environment(argv),
        "config": {"batch": BATCH, "level_shapes": LEVEL_SHAPES, "heads": HEADS, "head_dim": HEAD_DIM,
                   "points": POINTS, "repeats": args.repeats, "warmup": args.warmup},
        "results": results,
    }
    write_result(path, data, force=args.force)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
