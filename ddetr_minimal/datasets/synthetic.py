"""A seeded toy detection dataset in COCO format: shapes on cluttered backgrounds.

Five classes (circle, square, triangle, cross, ring) that only the *shape* tells apart: every
object gets a random colour, and every image a random background made of a smooth colour
gradient, random lines, soft blobs and pixel noise. Objects may overlap (each annotated object
stays at least ``1 - MAX_OCCLUDED`` visible) and their sizes are drawn per COCO area bucket,
so small (< 32^2 px), medium and large (> 96^2 px) objects are all well represented.
``clutter`` (0 to 1, default 1) scales the background's blobs, lines and noise.

Layout written under ``out_dir`` (the COCO 2017 layout, with shorter names)::

    out_dir/train/000000.jpg ...
    out_dir/val/000000.jpg ...
    out_dir/annotations/instances_train.json
    out_dir/annotations/instances_val.json
    out_dir/dataset_info.json          the parameters that produced it

The same parameters always give the same files: every image has its own random stream,
spawned from ``seed`` with :class:`numpy.random.SeedSequence`.

Command line::

    python -m ddetr_minimal synthetic --out data/toy --num-train 1000 --num-val 200 --seed 0
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

CLASSES = ("circle", "square", "triangle", "cross", "ring")
# COCO area buckets (pixels); the generator draws a bucket first, then a size inside it.
BUCKETS = {"small": (10.0, 24.0), "medium": (36.0, 76.0), "large": (104.0, 150.0)}
BUCKET_PROBS = {"small": 0.4, "medium": 0.35, "large": 0.25}
MAX_OCCLUDED = 0.4  # an annotated object keeps at least 60 % of its pixels visible
MIN_IMAGE_SIZE = 160  # large objects (> 96 px a side) must fit
INFO_FILE = "dataset_info.json"


# --------------------------------------------------------------------------------------
# Shapes: each returns a boolean mask (H, W) of the object's pixels
# --------------------------------------------------------------------------------------
def _rotated(points: np.ndarray, angle: float, cx: float, cy: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    pts = points @ rot.T + np.array([cx, cy])  # (P, 2)
    return [tuple(p) for p in pts]


def shape_mask(kind: str, cx: float, cy: float, size: float, angle: float, image_size: int) -> np.ndarray:
    """Draw one shape of nominal side ``size`` centred at ``(cx, cy)``; return its mask (H, W)."""
    img = Image.new("L", (image_size, image_size), 0)
    draw = ImageDraw.Draw(img)
    r = size / 2
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif kind == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ri = r * 0.55
        draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    elif kind == "square":
        sq = np.array([[-r, -r], [r, -r], [r, r], [-r, r]])
        draw.polygon(_rotated(sq, angle, cx, cy), fill=255)
    elif kind == "triangle":
        tri = np.array([[r * math.cos(a), r * math.sin(a)] for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])
        draw.polygon(_rotated(tri, angle, cx, cy), fill=255)
    elif kind == "cross":
        t = r / 3  # half the bar thickness
        for bar in (np.array([[-r, -t], [r, -t], [r, t], [-r, t]]), np.array([[-t, -r], [t, -r], [t, r], [-t, r]])):
            draw.polygon(_rotated(bar, angle, cx, cy), fill=255)
    else:
        raise ValueError(f"kind must be one of {CLASSES}, got {kind!r}")
    return np.asarray(img) > 127


# --------------------------------------------------------------------------------------
# Backgrounds
# --------------------------------------------------------------------------------------
def _background(rng: np.random.Generator, image_size: int, clutter: float = 1.0) -> np.ndarray:
    """A cluttered RGB background (H, W, 3) uint8: gradient, blobs, lines. ``clutter`` in [0, 1]
    scales the number of blobs and lines."""
    coarse = rng.uniform(40, 215, size=(3, 3, 3)).astype(np.uint8)  # (3, 3, RGB)
    img = Image.fromarray(coarse).resize((image_size, image_size), Image.BICUBIC)
    blobs = Image.new("RGB", (image_size, image_size), (0, 0, 0))
    alpha = Image.new("L", (image_size, image_size), 0)
    for _ in range(round(int(rng.integers(2, 6)) * clutter)):  # soft irregular blobs
        pts = rng.uniform(0, image_size, size=(int(rng.integers(4, 8)), 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        ImageDraw.Draw(blobs).polygon([tuple(p) for p in pts], fill=colour)
        ImageDraw.Draw(alpha).polygon([tuple(p) for p in pts], fill=int(rng.integers(40, 110)))
    blur = ImageFilter.GaussianBlur(radius=image_size / 24)
    img = Image.composite(blobs.filter(blur), img, alpha.filter(blur))
    draw = ImageDraw.Draw(img)
    for _ in range(round(int(rng.integers(3, 10)) * clutter)):  # thin clutter lines
        x0, y0, x1, y1 = rng.uniform(-20, image_size + 20, size=4)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.line([(x0, y0), (x1, y1)], fill=colour, width=int(rng.integers(1, 4)))
    return np.asarray(img).copy()


def _contrasting_colour(rng: np.random.Generator, region: np.ndarray) -> np.ndarray:
    """A random colour far enough from the mean colour of ``region`` (P, 3) to be visible."""
    mean = region.reshape(-1, 3).mean(axis=0)  # (3,)
    for _ in range(50):
        colour = rng.integers(0, 256, 3)
        if np.abs(colour - mean).sum() > 150:
            return colour
    return np.where(mean > 127, 0, 255)


# --------------------------------------------------------------------------------------
# One image
# --------------------------------------------------------------------------------------
def _sample_size(rng: np.random.Generator, bucket: str, image_size: int, small_sides=None) -> float:
    lo, hi = small_sides if bucket == "small" and small_sides is not None else BUCKETS[bucket]
    hi = min(hi, (image_size - 6) / 1.5)  # room for a rotated square inside the image
    lo = min(lo, hi)
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def make_image(rng: np.random.Generator, image_size: int, max_objects: int, clutter: float = 1.0,
               small_sides=None):
    """Render one image; return ``(rgb (H, W, 3) uint8, objects)`` with objects as
    ``(class_index, (x, y, w, h))`` in COCO pixel convention. ``clutter`` in [0, 1] scales the
    background's blobs and lines and the pixel noise (1: the full clutter, 0: a plain gradient).
    ``small_sides`` ``(lo, hi)`` replaces the nominal sides of the small bucket (``BUCKETS``)."""
    rgb = _background(rng, image_size, clutter).astype(np.int16)
    n_wanted = int(rng.integers(1, max_objects + 1))
    visible: list[np.ndarray] = []  # visible mask of each placed object
    full: list[np.ndarray] = []
    kinds: list[int] = []
    has_large = False
    for _ in range(n_wanted):
        names = list(BUCKET_PROBS)
        probs = np.array([BUCKET_PROBS[b] for b in names])
        bucket = names[int(rng.choice(len(names), p=probs / probs.sum()))]
        if bucket == "large" and has_large:
            bucket = "medium"
        size = _sample_size(rng, bucket, image_size, small_sides)
        kind = int(rng.integers(len(CLASSES)))
        angle = float(rng.uniform(-math.pi / 9, math.pi / 9)) if CLASSES[kind] != "triangle" else float(rng.uniform(0, 2 * math.pi))
        for _try in range(20):
            margin = size * 0.75 + 2
            cx, cy = rng.uniform(margin, image_size - margin, size=2)
            mask = shape_mask(CLASSES[kind], cx, cy, size, angle, image_size)
            if not mask.any():
                continue
            # the new object lies on top: it must not hide too much of any earlier object
            if all((v & mask).sum() <= MAX_OCCLUDED * f.sum() - (f.sum() - v.sum()) for v, f in zip(visible, full)):
                break
        else:
            continue
        for v in visible:
            v &= ~mask
        visible.append(mask.copy())
        full.append(mask)
        kinds.append(kind)
        has_large |= bucket == "large"
        rgb[mask] = _contrasting_colour(rng, rgb[mask])
    rgb = rgb + rng.normal(0, 10 * clutter, size=rgb.shape)  # sensor noise over everything
    rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    objects = []
    for kind, mask in zip(kinds, full):
        ys, xs = np.nonzero(mask)
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        objects.append((kind, (float(x0), float(y0), float(x1 - x0), float(y1 - y0))))
    return rgb, objects


# --------------------------------------------------------------------------------------
# The dataset on disk
# --------------------------------------------------------------------------------------
def _write_split(out_dir: Path, split: str, num_images: int, image_size: int, max_objects: int,
                 seed_seq: np.random.SeedSequence, progress: bool, clutter: float = 1.0,
                 small_sides=None) -> dict:
    img_dir = out_dir / split
    img_dir.mkdir(parents=True)
    images, annotations = [], []
    ann_id = 1
    children = seed_seq.spawn(num_images)
    for i in tqdm(range(num_images), desc=f"toy {split}", disable=not progress, unit="img"):
        rng = np.random.default_rng(children[i])
        rgb, objects = make_image(rng, image_size, max_objects, clutter, small_sides)
        file_name = f"{i:06d}.jpg"
        Image.fromarray(rgb).save(img_dir / file_name, quality=92)
        images.append({"id": i + 1, "file_name": file_name, "width": image_size, "height": image_size})
        for kind, (x, y, w, h) in objects:
            annotations.append({"id": ann_id, "image_id": i + 1, "category_id": kind + 1,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
            ann_id += 1
    categories = [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(CLASSES)]
    coco = {"info": {"description": f"ddetr_minimal toy shapes, {split} split"},
            "images": images, "annotations": annotations, "categories": categories}
    ann_file = out_dir / "annotations" / f"instances_{split}.json"
    ann_file.parent.mkdir(exist_ok=True)
    ann_file.write_text(json.dumps(coco))
    return coco


def check_small_sides(small_sides) -> tuple[float, float]:
    """``small_sides`` as ``(lo, hi)`` floats (None: ``BUCKETS["small"]``), or a ValueError
    naming it: two numbers with 4 <= lo <= hi <= 31 (a side of 32 px or more is not small)."""
    if small_sides is None:
        return BUCKETS["small"]
    try:
        lo, hi = (float(x) for x in small_sides)
    except (TypeError, ValueError):
        raise ValueError(f"small_sides must be two numbers (lo, hi), got {small_sides!r}") from None
    if not 4.0 <= lo <= hi <= 31.0:
        raise ValueError(f"small_sides must satisfy 4 <= lo <= hi <= 31 pixels, got {small_sides!r}")
    return lo, hi


SIZE_BUCKETS = ("small", "medium", "large")  # COCO's area buckets, the generator's BUCKETS


def size_bucket(area: float) -> str:
    """COCO's bucket of a box area in pixels: small < 32^2 <= medium <= 96^2 < large."""
    return "small" if area < 32 ** 2 else "large" if area > 96 ** 2 else "medium"


def area_histogram(coco: dict) -> dict:
    """Count annotations per COCO area bucket (:func:`size_bucket`)."""
    counts = dict.fromkeys(SIZE_BUCKETS, 0)
    for a in coco["annotations"]:
        counts[size_bucket(a["area"])] += 1
    return counts


def generate(out_dir: str | os.PathLike = "data/toy", num_train: int = 1000, num_val: int = 200,
             image_size: int = 256, seed: int = 0, max_objects: int = 5, force: bool = False,
             progress: bool = True, clutter: float = 1.0, small_sides=None) -> Path:
    """Write the toy dataset under ``out_dir``; return the folder.

    Refuses (``FileExistsError``) when ``out_dir`` exists and is not empty, unless ``force``;
    even with ``force`` it only replaces a folder that holds a previously generated toy
    dataset (recognised by its ``dataset_info.json``), never an arbitrary folder.
    ``small_sides`` ``(lo, hi)``: the nominal sides (pixels) of small objects, default
    ``BUCKETS["small"]``.
    """
    for name, value, low in (("num_train", num_train, 1), ("num_val", num_val, 1),
                             ("max_objects", max_objects, 1), ("image_size", image_size, MIN_IMAGE_SIZE)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not isinstance(clutter, (int, float)) or isinstance(clutter, bool) or not 0.0 <= clutter <= 1.0:
        raise ValueError(f"clutter must be a number in [0, 1], got {clutter!r}")
    small_sides = check_small_sides(small_sides)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} already exists and is not empty; pass --force to replace it")
        if not (out / INFO_FILE).is_file():
            raise FileExistsError(f"{out} exists but holds no {INFO_FILE}, so it is not a generated toy "
                                  "dataset; refusing to delete it even with --force")
        for child in ("train", "val", "annotations", INFO_FILE):
            path = out / child
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    seq_train, seq_val = np.random.SeedSequence(seed).spawn(2)
    train = _write_split(out, "train", num_train, image_size, max_objects, seq_train, progress, clutter, small_sides)
    val = _write_split(out, "val", num_val, image_size, max_objects, seq_val, progress, clutter, small_sides)
    info = {"num_train": num_train, "num_val": num_val, "image_size": image_size, "seed": seed,
            "max_objects": max_objects, "clutter": clutter, "small_sides": list(small_sides),
            "classes": list(CLASSES),
            "area_histogram": {"train": area_histogram(train), "val": area_histogram(val)}}
    (out / INFO_FILE).write_text(json.dumps(info, indent=2))
    return out


def parse_sides(text: str) -> tuple[float, float]:
    """``"14,28"`` -> ``(14.0, 28.0)`` for the command lines' ``--small-sides``."""
    try:
        return check_small_sides(text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def main(argv=None) -> None:
    """Command line entry point: ``python -m ddetr_minimal synthetic --help``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="data/toy", help="output folder (default data/toy)")
    p.add_argument("--num-train", type=int, default=1000)
    p.add_argument("--num-val", type=int, default=200)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--max-objects", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clutter", type=float, default=1.0,
                   help="background clutter and noise, 0 (plain gradient) to 1 (default, the most)")
    p.add_argument("--small-sides", type=parse_sides, default=None,
                   help=f"nominal sides of small objects, lo,hi in pixels (default {BUCKETS['small'][0]:g},"
                        f"{BUCKETS['small'][1]:g})")
    p.add_argument("--force", action="store_true", help="replace an existing generated dataset")
    args = p.parse_args(argv)
    try:
        out = generate(args.out, args.num_train, args.num_val, args.image_size, args.seed,
                       args.max_objects, args.force, clutter=args.clutter, small_sides=args.small_sides)
    except (FileExistsError, ValueError) as err:
        p.error(str(err))
    info = json.loads((out / INFO_FILE).read_text())
    print(f"wrote {out}: {info['num_train']} train, {info['num_val']} val images; "
          f"objects per area bucket {info['area_histogram']}")


if __name__ == "__main__":
    main()
