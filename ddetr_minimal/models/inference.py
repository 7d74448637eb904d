"""Run a detector on photos: normalise and pad them into a batch, keep the confident
detections, and read where a decoder layer's cross-attention samples.

Used by the book's page on the released COCO models; every function works on any
:class:`~ddetr_minimal.models.deformable_detr.DeformableDETR` (trained here or loaded).
"""
from __future__ import annotations

import inspect
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..datasets.transforms import IMAGENET_MEAN, IMAGENET_STD

Tensor = torch.Tensor


def prepare_images(photos: Sequence[Tensor], max_side: int = 1333) -> Tuple[Tensor, Tensor, List[Tuple[int, int]]]:
    """Photos (3, H, W) in [0, 1] -> ``(images (N, 3, H, W), mask (N, H, W), sizes)``.

    A photo whose longer side exceeds ``max_side`` is scaled down (antialiased) first, the
    limit of the release's training images. Each is ImageNet-normalised and padded at the
    bottom and right; ``mask`` is True on padding; ``sizes`` are the original (H, W).
    """
    if not photos:
        raise ValueError("photos must hold at least one (3, H, W) tensor, got none")
    resized, sizes = [], []
    for i, p in enumerate(photos):
        if not isinstance(p, Tensor) or p.dim() != 3 or p.shape[0] != 3 or not p.is_floating_point():
            got = f"{p.dtype} {tuple(p.shape)}" if isinstance(p, Tensor) else type(p).__name__
            raise ValueError(f"photos[{i}] must be a float tensor (3, H, W) in [0, 1], got {got}")
        sizes.append((int(p.shape[1]), int(p.shape[2])))
        scale = min(1.0, max_side / max(p.shape[1:]))
        if scale < 1.0:
            size = (max(1, round(p.shape[1] * scale)), max(1, round(p.shape[2] * scale)))
            p = F.interpolate(p[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        resized.append(p)
    H, W = max(p.shape[1] for p in resized), max(p.shape[2] for p in resized)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    images = torch.zeros(len(resized), 3, H, W)  # (N, 3, H, W)
    mask = torch.ones(len(resized), H, W, dtype=torch.bool)  # (N, H, W), True = padding
    for i, p in enumerate(resized):
        images[i, :, : p.shape[1], : p.shape[2]] = (p - mean) / std
        mask[i, : p.shape[1], : p.shape[2]] = False
    return images, mask, sizes


@torch.no_grad()
def detect(model: nn.Module, postprocessor: nn.Module, photos: Sequence[Tensor], threshold: float = 0.5,
           max_side: int = 1333) -> List[Dict[str, Tensor]]:
    """Detections of ``model`` on each photo: ``boxes`` (n, 4) as (x0, y0, x1, y1) pixels of the
    original photo, ``scores`` (n,) and ``labels`` (n,), best first, scores >= ``threshold``."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    images, mask, sizes = prepare_images(photos, max_side)
    model.eval()
    outputs = model(images, mask)
    results = postprocessor(outputs, torch.tensor(sizes))
    kept = []
    for r in results:
        order = r["scores"].argsort(descending=True)
        order = order[r["scores"][order] >= threshold]
        kept.append({k: v[order] for k, v in r.items()})
    return kept


@torch.no_grad()
def decoder_sampling(model: nn.Module, images: Tensor, mask: Tensor, layer: int = -1) -> Dict[str, object]:
    """Where decoder layer ``layer``'s cross-attention samples, for every query.

    Returns ``locations`` (N, Lq, M, L, P, 2) normalised (x, y) on the padded image,
    ``weights`` (N, Lq, M, L, P), the layer's ``reference_points`` (N, Lq, L, 2|4) as it
    received them, ``spatial_shapes`` (L, 2) and the model's ``outputs``.
    """
    attn = model.transformer.decoder.layers[layer].cross_attn
    seen = {}

    signature = inspect.signature(attn.forward)

    def hook(module, args, kwargs):
        bound = signature.bind(*args, **kwargs).arguments  # the call's arguments by name
        for key, name in (("query", "query"), ("ref", "reference_points"), ("shapes", "input_spatial_shapes")):
            seen[key] = bound[name]

    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model.eval()
        outputs = model(images, mask)
    finally:
        handle.remove()
    locations, weights = attn.sampling(seen["query"], seen["ref"], seen["shapes"])
    return {"locations": locations, "weights": weights, "reference_points": seen["ref"],
            "spatial_shapes": seen["shapes"], "outputs": outputs}
