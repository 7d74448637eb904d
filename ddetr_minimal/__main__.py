"""``python -m ddetr_minimal <command> [options]``: the package's one command line.

Each command is the ``main(argv)`` of one module; ``python -m ddetr_minimal <command> --help``
shows its options.
"""
from __future__ import annotations

import importlib
import sys
from typing import List, Optional

# command -> (module, what it does)
COMMANDS = {
    "synthetic": ("ddetr_minimal.datasets.synthetic", "generate the toy COCO-format dataset"),
    "pretrain": ("ddetr_minimal.training.pretrain", "pretrain the small CNN backbone on toy images"),
    "train": ("ddetr_minimal.training.train", "train DETR or Deformable DETR on a COCO-layout dataset"),
    "evaluate": ("ddetr_minimal.training.evaluate", "COCO box AP of a checkpoint"),
    "experiments": ("ddetr_minimal.training.repeated",
                    "run the recorded experiment: seeds (DETR vs Deformable DETR over seeds)"),
    "benchmark": ("ddetr_minimal.measure.benchmark", "vanilla vs deformable cost, backends, on CPU or GPU"),
    "bench-formulations": ("ddetr_minimal.measure.formulations",
                           "on a CPU: pure-PyTorch formulations of the op against transformers'"),
    "bench-kernel": ("ddetr_minimal.measure.bench_kernel", "on a GPU: the CUDA kernel against the torch backend"),
}


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: python -m ddetr_minimal <command> [options]", "", "commands:"]
    lines += [f"  {c.ljust(width)}  {what}" for c, (_, what) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"unknown command {command!r}; expected one of {', '.join(COMMANDS)}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    module.main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
