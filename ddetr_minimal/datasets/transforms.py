"""Box-aware augmentations built on ``torchvision.transforms.v2``.

Images travel as :class:`tv_tensors.Image` and boxes as :class:`tv_tensors.BoundingBoxes`
(pixel ``XYXY``), so every geometric transform (resize, flip, crop) moves the boxes with the
pixels. :func:`make_transforms` returns the pipeline for a preset:

* ``"toy"``  -- horizontal flip, and half of the time a random crop (no rescaling, so the
  object sizes, and therefore the COCO area buckets, keep their meaning);
* ``"coco"`` -- the DETR / Deformable DETR recipe: flip, multi-scale resize of the shorter
  side to 480..800 (longer side at most 1333), or resize + random crop 384..600 + resize.

Both end with conversion to float, ImageNet normalisation and the removal of boxes that a
crop reduced to (almost) nothing.
"""
from __future__ import annotations

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRESETS = ("toy", "coco")


class RandomSizeCrop(v2.Transform):
    """Crop a random ``h x w`` window, each side drawn uniformly in ``[min_size, max_size]``
    (and at most the image's side), at a random position. Boxes are clipped to the window."""

    def __init__(self, min_size: int, max_size: int):
        super().__init__()
        if not 0 < min_size <= max_size:
            raise ValueError(f"need 0 < min_size <= max_size, got min_size={min_size}, max_size={max_size}")
        self.min_size, self.max_size = int(min_size), int(max_size)

    def make_params(self, flat_inputs):
        """Draw the crop window (uses the global torch RNG, so it is seeded and resumable)."""
        h, w = v2.query_size(flat_inputs)
        ch = int(torch.randint(min(self.min_size, h), min(h, self.max_size) + 1, ()).item())
        cw = int(torch.randint(min(self.min_size, w), min(w, self.max_size) + 1, ()).item())
        top = int(torch.randint(0, h - ch + 1, ()).item())
        left = int(torch.randint(0, w - cw + 1, ()).item())
        return {"top": top, "left": left, "height": ch, "width": cw}

    def transform(self, inpt, params):
        """Apply the crop to one input (image, boxes, mask); plain tensors pass through."""
        return v2.functional.crop(inpt, **params)

    # torchvision < 0.21 calls the private names
    _get_params = make_params
    _transform = transform


def _finish() -> list:
    return [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        v2.SanitizeBoundingBoxes(min_size=1.0, labels_getter=lambda sample: sample[1]["labels"]),
    ]


def make_transforms(split: str, preset: str = "toy", image_size: int = 256) -> v2.Compose:
    """The augmentation pipeline for ``split`` ("train" or "val") of ``preset`` ("toy" or "coco").

    The pipeline is called as ``image, target = t(image, target)`` with ``target["boxes"]`` a
    :class:`tv_tensors.BoundingBoxes` and ``target["labels"]`` a tensor of the same length.
    ``image_size`` is the toy images' side; the crop keeps at least 70 % of it.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    if preset == "toy":
        if split == "val":
            return v2.Compose(_finish())
        crop = RandomSizeCrop(int(0.7 * image_size), image_size)
        return v2.Compose([v2.RandomHorizontalFlip(0.5), v2.RandomApply([crop], p=0.5), *_finish()])
    scales = list(range(480, 801, 32))
    if split == "val":
        return v2.Compose([v2.Resize(800, max_size=1333), *_finish()])
    return v2.Compose([
        v2.RandomHorizontalFlip(0.5),
        v2.RandomChoice([
            v2.RandomShortestSize(scales, max_size=1333),
            v2.Compose([v2.RandomShortestSize([400, 500, 600]), RandomSizeCrop(384, 600),
                        v2.RandomShortestSize(scales, max_size=1333)]),
        ]),
        *_finish(),
    ])
