"""Run a detector on photos: normalise and pad them into a batch, keep the confident
detections, and read where the attention looks: where an encoder or decoder layer of Deformable
DETR samples (:func:`encoder_sampling`, :func:`decoder_sampling`), and how DETR's decoder
cross-attention spreads over its map (:func:`detr_cross_attention`).

Used by the book's page on the released COCO models and the chapter on the trained toy
detectors; the sampling functions work on any
:class:`~ddetr_minimal.models.deformable_detr.DeformableDETR` (trained here or loaded).
"""
from __future__ import annotations

import inspect
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..datasets.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..ops.checks import check_positive_ints, level_start_index_from_shapes

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


def _run_capturing(model: nn.Module, attn: nn.Module, images: Tensor, mask: Tensor) -> Tuple[dict, dict]:
    """Run ``model`` once and keep the query, reference points and spatial shapes that the
    :class:`~.deformable_attention.MSDeformAttn` module ``attn`` received. Returns ``(seen, outputs)``."""
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
    return seen, outputs


def _check_layer(layers, layer: int, what: str) -> None:
    if not isinstance(layer, int) or not -len(layers) <= layer < len(layers):
        raise ValueError(f"layer must index the {len(layers)} {what} layers (-{len(layers)} to "
                         f"{len(layers) - 1}), got {layer!r}")


@torch.no_grad()
def decoder_sampling(model: nn.Module, images: Tensor, mask: Tensor, layer: int = -1) -> Dict[str, object]:
    """Where decoder layer ``layer``'s cross-attention samples, for every query.

    Returns ``locations`` (N, Lq, M, L, P, 2) normalised (x, y) on the padded image,
    ``weights`` (N, Lq, M, L, P), the layer's ``reference_points`` (N, Lq, L, 2|4) as it
    received them, ``spatial_shapes`` (L, 2) and the model's ``outputs``.
    """
    layers = model.transformer.decoder.layers
    _check_layer(layers, layer, "decoder")
    attn = layers[layer].cross_attn
    seen, outputs = _run_capturing(model, attn, images, mask)
    locations, weights = attn.sampling(seen["query"], seen["ref"], seen["shapes"])
    return {"locations": locations, "weights": weights, "reference_points": seen["ref"],
            "spatial_shapes": seen["shapes"], "outputs": outputs}


@torch.no_grad()
def encoder_sampling(model: nn.Module, images: Tensor, mask: Tensor, layer: int = -1) -> Dict[str, object]:
    """Where encoder layer ``layer``'s self-attention samples, for every token (one per pixel of
    every level, in the order of the flattened levels).

    Returns ``locations`` (N, S, M, L, P, 2) normalised (x, y) on the padded image,
    ``weights`` (N, S, M, L, P), ``reference_points`` (N, S, L, 2) (each token's own pixel
    centre, in every level's frame), ``spatial_shapes`` (L, 2), ``level_start_index`` (L,) and
    the model's ``outputs``. :func:`token_index` finds the token of an image point.
    """
    layers = model.transformer.encoder.layers
    _check_layer(layers, layer, "encoder")
    attn = layers[layer].self_attn
    seen, outputs = _run_capturing(model, attn, images, mask)
    locations, weights = attn.sampling(seen["query"], seen["ref"], seen["shapes"])
    shapes = seen["shapes"]
    return {"locations": locations, "weights": weights, "reference_points": seen["ref"],
            "spatial_shapes": shapes, "level_start_index": level_start_index_from_shapes(shapes),
            "outputs": outputs}


def token_index(spatial_shapes: Tensor, level: int, x: float, y: float) -> int:
    """The flattened token of level ``level`` whose pixel holds the normalised point ``(x, y)``
    (in [0, 1] of the padded image): its index into the S tokens of :func:`encoder_sampling`."""
    L = spatial_shapes.shape[0]
    if not isinstance(level, int) or not 0 <= level < L:
        raise ValueError(f"level must be in [0, {L}), got {level!r}")
    if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
        raise ValueError(f"(x, y) must be a normalised point in [0, 1], got ({x!r}, {y!r})")
    H, W = (int(v) for v in spatial_shapes[level])
    row, col = min(int(y * H), H - 1), min(int(x * W), W - 1)
    return int(level_start_index_from_shapes(spatial_shapes)[level]) + row * W + col


@torch.no_grad()
def detr_cross_attention(model: nn.Module, images: Tensor, mask: Tensor, layer: int = -1) -> Dict[str, object]:
    """The attention of DETR's decoder layer ``layer`` from every query to every position of the
    stride-32 map: ``weights`` (N, M, Lq, S) (softmax over the S = H * W positions, padding at
    0), ``spatial_shape`` (H, W), ``padding_mask`` (N, S) and the model's ``outputs``."""
    layers = model.transformer.decoder_layers
    _check_layer(layers, layer, "decoder")
    seen = {}

    def keep_weights(module, args, kwargs, output):
        seen["weights"] = output[1]  # MultiHeadAttention returns (output, attention)
        seen["padding"] = kwargs.get("key_padding_mask", args[3] if len(args) > 3 else None)

    def keep_shape(module, args, output):
        seen["shape"] = tuple(int(v) for v in output.shape[-2:])  # (H, W) of the projected map

    handles = [layers[layer].cross_attn.register_forward_hook(keep_weights, with_kwargs=True),
               model.input_proj.register_forward_hook(keep_shape)]
    try:
        model.eval()
        outputs = model(images, mask)
    finally:
        for h in handles:
            h.remove()
    weights = seen["weights"]  # (N, M, Lq, S)
    padding = seen["padding"]
    if padding is None:
        padding = torch.zeros(weights.shape[0], weights.shape[-1], dtype=torch.bool, device=weights.device)
    return {"weights": weights, "spatial_shape": seen["shape"], "padding_mask": padding, "outputs": outputs}


@torch.no_grad()
def detect_batch(model: nn.Module, postprocessor: nn.Module, images: Tensor, mask: Tensor, sizes: Tensor,
                 batch_size: int = 50) -> List[Dict[str, Tensor]]:
    """The post-processed detections of already prepared ``images`` (N, 3, H, W) with ``mask``
    (N, H, W), in pixels of ``sizes`` (N, 2) as (h, w), run ``batch_size`` images at a time."""
    check_positive_ints(batch_size=batch_size)
    model.eval()
    out = []
    for i in range(0, images.shape[0], batch_size):
        out += postprocessor(model(images[i:i + batch_size], mask[i:i + batch_size]), sizes[i:i + batch_size])
    return out


def top_queries(outputs: Dict[str, Tensor], k: int, size: Tuple[int, int], image: int = 0) -> Dict[str, Tensor]:
    """The ``k`` queries of image ``image`` that score highest (their best class), for a sigmoid
    model's ``outputs``: ``queries`` (k,), ``scores`` (k,), ``labels`` (k,) and ``boxes`` (k, 4) as
    pixel (x0, y0, x1, y1) of an image of ``size`` (h, w), best first."""
    from torchvision.ops import box_convert

    logits = outputs["pred_logits"][image]  # (Lq, num_classes)
    if not isinstance(k, int) or not 1 <= k <= logits.shape[0]:
        raise ValueError(f"k must be an integer in [1, {logits.shape[0]}] (the queries), got {k!r}")
    scores, labels = logits.sigmoid().max(-1)  # (Lq,) each
    order = scores.argsort(descending=True)[:k]
    h, w = size
    boxes = box_convert(outputs["pred_boxes"][image][order], "cxcywh", "xyxy") * torch.tensor([w, h, w, h])
    return {"queries": order, "scores": scores[order], "labels": labels[order], "boxes": boxes}
