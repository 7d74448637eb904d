"""Fine-tuning from released weights: ``python -m ddetr_minimal train --pretrained NAME_OR_PATH``.

``NAME_OR_PATH`` is one of :data:`ddetr_minimal.models.released.RELEASES` (downloaded once,
from the Hugging Face hub or Google Drive) or a checkpoint on disk in either layout (an
official ``.pth``, or a Hugging Face folder). What happens:

* the **architecture** (backbone, width, heads, layers, levels, points, queries, refinement,
  two-stage) is the checkpoint's; a size flag given on the command line must agree with it;
* **every tensor but the class heads** is loaded (backbone, input projections, encoder,
  decoder, box heads, queries, two-stage layers);
* the **class heads** are new, sized for the dataset's own classes and initialised as
  in training from scratch: bias at the focal prior (every class starts at probability 0.01),
  weights at PyTorch's default. The released heads cannot be kept even for COCO's own
  categories: they index COCO's category ids 1..90, the dataset loader numbers categories 0..num_classes-1;
* the **learning rates** are the paper's unless given: 2e-4, backbone 2e-5, sampling offsets
  and reference points 0.1 x (see :func:`ddetr_minimal.training.train.param_groups`);
  ResNet's stem and first stage stay frozen, as in the release.
"""
from __future__ import annotations

import os

from torch import nn

from ..models.released import (RELEASES, ReleasedWeights, check_release_name, download_released, load_weights,
                               read_released)

ARCH_FLAGS = ("backbone", "d_model", "n_heads", "enc_layers", "dec_layers", "dim_feedforward", "num_queries",
              "n_points", "n_levels", "with_box_refine", "two_stage")
PAPER_LRS = {"lr": 2e-4, "lr_backbone": 2e-5, "lr_linear_proj_mult": 0.1}
CLASS_HEADS = ("class_embed.",)


def read_pretrained(value: str, cache_dir: str | None = None) -> ReleasedWeights:
    """The weights named by ``--pretrained``: a release name (downloaded once) or a path."""
    if value in RELEASES:
        weights = read_released(download_released(value, cache_dir))
        check_release_name(value, weights)
        return weights
    if os.path.exists(value):
        return read_released(value)
    raise SystemExit(f"--pretrained must be one of {', '.join(sorted(RELEASES))} or an existing checkpoint "
                     f"file or folder, got {value!r}")


def apply_pretrained(args, weights: ReleasedWeights) -> None:
    """Set ``args``' architecture to the checkpoint's and the paper's learning rates where not given.

    ``args.flags_given`` (filled by :func:`~ddetr_minimal.training.train.resolve_args`) lists the
    flags set on the command line; one of them that disagrees with the checkpoint is an error.
    """
    if args.model != "deformable":
        raise SystemExit(f"--pretrained loads Deformable DETR weights; got --model {args.model}")
    if args.backbone_weights:
        raise SystemExit("--pretrained already holds the backbone's weights; drop --backbone-weights")
    given = set(getattr(args, "flags_given", ()))
    conflicts = [f"--{k.replace('_', '-')} {getattr(args, k)} (the checkpoint has {v})"
                 for k, v in weights.arch.items() if k in given and getattr(args, k) != v]
    if conflicts:
        raise SystemExit(f"--pretrained {args.pretrained}: the model's shape comes from the checkpoint "
                         f"{weights.file}; these flags disagree with it: " + "; ".join(conflicts))
    for key in ARCH_FLAGS:
        setattr(args, key, weights.arch[key])
    args.pretrained_backbone = False  # the backbone's weights are in the checkpoint
    for key, value in PAPER_LRS.items():
        if key not in given:
            setattr(args, key, value)


def load_pretrained(model: nn.Module, weights: ReleasedWeights) -> int:
    """Load every tensor but the class heads (which keep their fresh initialisation); all or
    nothing, with the checks of :func:`ddetr_minimal.models.released.load_checked`. Returns
    how many tensors were loaded."""
    load_weights(model, weights, skip=CLASS_HEADS)
    return sum(1 for k in model.state_dict() if not k.startswith(CLASS_HEADS))
