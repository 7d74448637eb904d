"""Reading a COCO-layout detection dataset, and batching images of different sizes.

:class:`CocoDetection` reads any folder in the COCO layout (the toy dataset of
:mod:`ddetr_minimal.datasets.synthetic`, or COCO 2017 itself) and returns ``(image, target)`` with

* ``image``  (3, H, W) float, ImageNet-normalised, after the box-aware transforms;
* ``target`` a dict: ``labels`` (n,) int64 contiguous in ``[0, num_classes)``, ``boxes`` (n, 4)
  normalised ``(cx, cy, w, h)`` w.r.t. the transformed image, ``image_id``, ``orig_size`` and
  ``size`` as ``(h, w)``.

Annotations are checked once, when the dataset is built. What happens to bad ones:

=====================================  ======================================================
problem                                policy
=====================================  ======================================================
image file missing                     ``FileNotFoundError`` naming the file, the image id and
                                       its annotation ids (the dataset is incomplete)
bbox not 4 finite numbers; unknown     ``ValueError`` naming the annotation file and the
``image_id`` or ``category_id``        annotation id (the file is corrupt)
box entirely outside its image         ``ValueError`` naming the annotation id and the image
                                       file (coordinates in the wrong convention or image)
box partly outside its image           clipped to the image, silently (rounding at borders)
zero or negative width/height          dropped with a logged warning naming the annotation
(also after clipping)                  id and image file (COCO 2017 has a few; no signal)
``iscrowd = 1``                        kept out of the training targets (pycocotools still
                                       uses them when evaluating)
=====================================  ======================================================

:func:`collate_fn` pads a batch to its largest image and builds ``mask (N, H, W)``, True at
padding, which the model uses to ignore padded pixels.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from pathlib import Path

import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.ops import box_convert
from torchvision.transforms.v2 import functional as F

from .transforms import make_transforms

log = logging.getLogger(__name__)


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-layout detection dataset: ``img_folder`` with the images, ``ann_file`` the JSON.

    ``transforms`` is called as ``image, target = transforms(image, target)`` with a
    :class:`tv_tensors.Image` and boxes as :class:`tv_tensors.BoundingBoxes` (see
    :func:`ddetr_minimal.datasets.transforms.make_transforms`); ``None`` only converts to float and
    normalises. ``max_images`` keeps the first images by id (for quick experiments).
    """

    def __init__(self, img_folder, ann_file, transforms=None, max_images: int | None = None):
        self.img_folder, self.ann_file = Path(img_folder), Path(ann_file)
        if not self.img_folder.is_dir():
            raise FileNotFoundError(f"img_folder {str(self.img_folder)!r} is not a directory")
        if not self.ann_file.is_file():
            raise FileNotFoundError(f"ann_file {str(self.ann_file)!r} does not exist")
        with open(self.ann_file) as f:
            data = json.load(f)
        for key in ("images", "annotations", "categories"):
            if key not in data:
                raise ValueError(f"ann_file {str(self.ann_file)!r} has no {key!r} list; is it a COCO instances file?")
        # contiguous labels 0..num_classes-1 in increasing category id order
        self.cat_ids = sorted(c["id"] for c in data["categories"])
        self.cat_id_to_label = {cid: i for i, cid in enumerate(self.cat_ids)}
        self.class_names = [c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])]
        images = sorted(data["images"], key=lambda im: im["id"])
        if max_images is not None:
            images = images[:max_images]
        self.images = images
        self._anns = self._check_annotations(data["annotations"], {im["id"]: im for im in data["images"]})
        self._check_files()
        self.transforms = transforms if transforms is not None else make_transforms("val", "toy")
        self._coco = None

    # ----------------------------------------------------------------------------------
    # checks, run once
    # ----------------------------------------------------------------------------------
    def _check_annotations(self, annotations, all_images) -> dict:
        keep_ids = {im["id"] for im in self.images}
        per_image: dict[int, list] = {i: [] for i in keep_ids}
        where = f"in {str(self.ann_file)!r}"
        for ann in annotations:
            aid = ann.get("id")
            if ann.get("image_id") not in all_images:
                raise ValueError(f"annotation id {aid} {where} refers to unknown image_id {ann.get('image_id')!r}")
            if ann["image_id"] not in keep_ids:
                continue
            if ann.get("category_id") not in self.cat_id_to_label:
                raise ValueError(f"annotation id {aid} {where} has category_id {ann.get('category_id')!r}, "
                                 f"expected one of {self.cat_ids}")
            bbox = ann.get("bbox")
            if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
                    or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
                raise ValueError(f"annotation id {aid} {where} has bbox {bbox!r}; expected 4 finite numbers [x, y, w, h]")
            if ann.get("iscrowd", 0):
                continue
            im = all_images[ann["image_id"]]
            W, H = im["width"], im["height"]
            x, y, w, h = (float(v) for v in bbox)
            if w <= 0 or h <= 0:
                log.warning("dropping annotation id %s of image %s: bbox %s has zero or negative size",
                            aid, im["file_name"], bbox)
                continue
            x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, float(W)), min(y + h, float(H))
            if x >= W or y >= H or x + w <= 0 or y + h <= 0:
                raise ValueError(f"annotation id {aid} {where}: bbox {bbox!r} [x, y, w, h] lies entirely outside "
                                 f"its image {im['file_name']!r} of size {W}x{H} (wrong box format or image?)")
            if x1 - x0 < 1e-3 or y1 - y0 < 1e-3:
                log.warning("dropping annotation id %s of image %s: bbox %s is empty once clipped to the image",
                            aid, im["file_name"], bbox)
                continue
            per_image[ann["image_id"]].append((aid, self.cat_id_to_label[ann["category_id"]], [x0, y0, x1, y1]))
        return per_image

    def _check_files(self) -> None:
        for im in self.images:
            path = self.img_folder / im["file_name"]
            if not path.is_file():
                ids = [a[0] for a in self._anns[im["id"]]]
                raise FileNotFoundError(f"image file {str(path)!r} (image id {im['id']}, annotation ids {ids[:10]}) "
                                        f"listed in {str(self.ann_file)!r} does not exist")

    # ----------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Number of contiguous labels (one per category)."""
        return len(self.cat_ids)

    def coco_gt(self):
        """The ground truth as a ``pycocotools.coco.COCO`` object (loaded once, quietly)."""
        if self._coco is None:
            from pycocotools.coco import COCO
            with contextlib.redirect_stdout(io.StringIO()):
                self._coco = COCO(str(self.ann_file))
        return self._coco

    def image_ids(self) -> list[int]:
        """The image ids this dataset serves, in order."""
        return [im["id"] for im in self.images]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        im = self.images[index]
        path = self.img_folder / im["file_name"]
        with Image.open(path) as pil:
            pil = pil.convert("RGB")
        if pil.size != (im["width"], im["height"]):
            raise ValueError(f"image file {str(path)!r} is {pil.size[0]}x{pil.size[1]} but {str(self.ann_file)!r} "
                             f"says {im['width']}x{im['height']}")
        image = tv_tensors.Image(F.pil_to_tensor(pil))  # (3, H, W) uint8
        anns = self._anns[im["id"]]
        boxes = torch.tensor([a[2] for a in anns], dtype=torch.float32).reshape(-1, 4)  # (n, 4) xyxy px
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(im["height"], im["width"])),
            "labels": torch.tensor([a[1] for a in anns], dtype=torch.int64),
        }
        image, target = self.transforms(image, target)
        h, w = image.shape[-2:]
        boxes = box_convert(target["boxes"].as_subclass(torch.Tensor), "xyxy", "cxcywh")  # (n, 4) px
        boxes = boxes / torch.tensor([w, h, w, h], dtype=torch.float32)  # (n, 4) normalised
        out = {
            "labels": target["labels"],
            "boxes": boxes,
            "image_id": im["id"],
            "orig_size": torch.tensor([im["height"], im["width"]]),
            "size": torch.tensor([h, w]),
        }
        return image.as_subclass(torch.Tensor), out


def collate_fn(batch):
    """Stack ``(image, target)`` pairs into ``(images (N, 3, H, W), mask (N, H, W), targets)``.

    Images are padded with zeros at the bottom and right to the largest height and width in
    the batch; ``mask`` is True at padded pixels.
    """
    if not batch:
        raise ValueError("collate_fn got an empty batch")
    images, targets = zip(*batch)
    H = max(img.shape[-2] for img in images)
    W = max(img.shape[-1] for img in images)
    padded = images[0].new_zeros((len(images), 3, H, W))  # (N, 3, H, W)
    mask = torch.ones((len(images), H, W), dtype=torch.bool)  # (N, H, W)
    for i, img in enumerate(images):
        if img.dim() != 3 or img.shape[0] != 3:
            raise ValueError(f"batch item {i} image has shape {tuple(img.shape)}, expected (3, H, W)")
        padded[i, :, : img.shape[1], : img.shape[2]] = img
        mask[i, : img.shape[1], : img.shape[2]] = False
    return padded, mask, list(targets)


def dataset_paths(root, split: str) -> tuple[Path, Path]:
    """``(img_folder, ann_file)`` of ``split`` under ``root``: the COCO 2017 layout
    (``train2017/``, ``annotations/instances_train2017.json``) when present, else the toy
    layout (``train/``, ``annotations/instances_train.json``)."""
    root = Path(root)
    for folder, ann in ((f"{split}2017", f"instances_{split}2017.json"), (split, f"instances_{split}.json")):
        if (root / "annotations" / ann).is_file():
            return root / folder, root / "annotations" / ann
    raise FileNotFoundError(f"no annotations for split {split!r} under {str(root)!r}: expected "
                            f"annotations/instances_{split}2017.json or annotations/instances_{split}.json")


def build_dataset(root, split: str, preset: str = "toy", image_size: int = 256,
                  max_images: int | None = None) -> CocoDetection:
    """The ``split`` ("train"/"val") of the COCO-layout dataset under ``root`` with the
    ``preset``'s transforms."""
    img_folder, ann_file = dataset_paths(root, split)
    return CocoDetection(img_folder, ann_file, make_transforms(split, preset, image_size), max_images)

