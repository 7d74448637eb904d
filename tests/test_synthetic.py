"""The toy dataset generator: determinism, layout, size buckets, shapes, overwrite safety."""
import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from ddetr_minimal.datasets import synthetic
from ddetr_minimal.datasets.synthetic import CLASSES, area_histogram, generate, shape_mask


def _digest(folder):
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = generate(tmp_path / "a", num_train=4, num_val=3, image_size=160, seed=3, progress=False)
    b = generate(tmp_path / "b", num_train=4, num_val=3, image_size=160, seed=3, progress=False)
    c = generate(tmp_path / "c", num_train=4, num_val=3, image_size=160, seed=4, progress=False)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)



def test_the_first_validation_images_do_not_depend_on_the_split_sizes(tmp_path):
    """Every image has its own random stream: a chapter can regenerate the first K validation
    images of a recorded dataset without writing all of it."""
    few = generate(tmp_path / "few", num_train=1, num_val=3, image_size=160, seed=7, small_sides=(12, 20),
                   progress=False)
    many = generate(tmp_path / "many", num_train=6, num_val=5, image_size=160, seed=7, small_sides=(12, 20),
                    progress=False)
    for i in range(3):
        assert (few / "val" / f"{i:06d}.jpg").read_bytes() == (many / "val" / f"{i:06d}.jpg").read_bytes()
    assert (few / "train" / "000000.jpg").read_bytes() == (many / "train" / "000000.jpg").read_bytes()
    ann_few, ann_many = (json.loads((d / "annotations" / "instances_val.json").read_text()) for d in (few, many))
    first = [{k: a[k] for k in ("image_id", "category_id", "bbox")} for a in ann_few["annotations"]]
    same = [{k: a[k] for k in ("image_id", "category_id", "bbox")} for a in ann_many["annotations"] if a["image_id"] <= 3]
    assert first == same and len(first) > 0
    other = generate(tmp_path / "other", num_train=1, num_val=3, image_size=160, seed=8, progress=False)
    assert (other / "val" / "000000.jpg").read_bytes() != (few / "val" / "000000.jpg").read_bytes()

def test_coco_layout_and_valid_boxes(tmp_path):
    out = generate(tmp_path / "toy", num_train=5, num_val=4, image_size=192, seed=0, progress=False)
    for split, n in (("train", 5), ("val", 4)):
        coco = json.loads((out / "annotations" / f"instances_{split}.json").read_text())
        assert [c["name"] for c in coco["categories"]] == list(CLASSES)
        assert len(coco["images"]) == n
        ids = {c["id"] for c in coco["categories"]}
        for im in coco["images"]:
            with Image.open(out / split / im["file_name"]) as pil:
                assert pil.size == (im["width"], im["height"]) == (192, 192)
        for a in coco["annotations"]:
            x, y, w, h = a["bbox"]
            assert a["category_id"] in ids and w > 0 and h > 0
            assert x >= 0 and y >= 0 and x + w <= 192 and y + h <= 192
            assert a["area"] == pytest.approx(w * h)
        assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])


def test_all_area_buckets_well_populated(tmp_path):
    out = generate(tmp_path / "toy", num_train=1, num_val=60, image_size=256, seed=1, progress=False)
    coco = json.loads((out / "annotations" / "instances_val.json").read_text())
    counts = area_histogram(coco)
    total = sum(counts.values())
    assert total >= 100
    for bucket, n in counts.items():
        assert n / total >= 0.15, f"{bucket} holds only {n} of {total} objects"


def test_classes_use_many_colours(tmp_path):
    """Colour must not identify the class: each class appears in clearly different colours."""
    out = generate(tmp_path / "toy", num_train=40, num_val=1, image_size=192, seed=2, progress=False)
    coco = json.loads((out / "annotations" / "instances_train.json").read_text())
    names = {im["id"]: im["file_name"] for im in coco["images"]}
    colours = {c: [] for c in range(1, len(CLASSES) + 1)}
    for a in coco["annotations"]:
        x, y, w, h = (int(v) for v in a["bbox"])
        if w < 20 or a["category_id"] in (4, 5):  # cross and ring centres are not always object pixels
            continue
        pix = np.asarray(Image.open(out / "train" / names[a["image_id"]]).convert("RGB"))
        colours[a["category_id"]].append(pix[y + h // 2 - 2: y + h // 2 + 2, x + w // 2 - 2: x + w // 2 + 2].reshape(-1, 3).mean(0))
    for cid in (1, 2, 3):
        c = np.array(colours[cid])
        assert len(c) >= 5
        assert c.std(axis=0).mean() > 40, f"class {CLASSES[cid - 1]} colours barely vary"


def test_shapes_differ_in_form():
    size, c = 60, 80.0
    circle = shape_mask("circle", c, c, size, 0.0, 160)
    ring = shape_mask("ring", c, c, size, 0.0, 160)
    square = shape_mask("square", c, c, size, 0.0, 160)
    cross = shape_mask("cross", c, c, size, 0.0, 160)
    assert circle[80, 80] and not ring[80, 80]  # a ring has a hole
    assert square[52, 52] and not cross[52, 52] and not circle[52, 52]  # corners
    assert cross[80, 55] and cross[55, 80] and cross[80, 80]  # the arms and the centre
    tri = shape_mask("triangle", c, c, size, 0.0, 160)
    ys, xs = np.nonzero(tri)
    assert tri.sum() < 0.6 * square.sum() and ys.min() < 80 < ys.max()
    with pytest.raises(ValueError, match="kind"):
        shape_mask("hexagon", c, c, size, 0.0, 160)


def test_refuses_to_overwrite(tmp_path):
    out = generate(tmp_path / "toy", num_train=2, num_val=2, image_size=160, seed=0, progress=False)
    before = _digest(out)
    with pytest.raises(FileExistsError, match="--force"):
        generate(out, num_train=3, num_val=2, image_size=160, seed=1, progress=False)
    assert _digest(out) == before
    generate(out, num_train=3, num_val=2, image_size=160, seed=1, force=True, progress=False)
    assert len(list((out / "train").iterdir())) == 3
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a generated toy"):
        generate(other, num_train=2, num_val=2, image_size=160, force=True, progress=False)
    assert (other / "keep.txt").read_text() == "mine"


def test_bad_parameters():
    with pytest.raises(ValueError, match="image_size"):
        generate("unused", num_train=2, num_val=2, image_size=64)
    with pytest.raises(ValueError, match="num_train"):
        generate("unused", num_train=0, num_val=2)
    with pytest.raises(ValueError, match=r"clutter must be a number in \[0, 1\], got 1.5"):
        generate("unused", num_train=2, num_val=2, clutter=1.5)


def _roughness(folder):
    """Mean absolute difference between horizontally adjacent pixels over a split's images."""
    diffs = [np.abs(np.diff(np.asarray(Image.open(p), dtype=np.float64), axis=1)).mean()
             for p in sorted((folder / "val").glob("*.jpg"))]
    return float(np.mean(diffs))


def test_clutter_controls_the_background(tmp_path):
    plain = generate(tmp_path / "plain", num_train=1, num_val=6, image_size=160, seed=5, clutter=0.0, progress=False)
    busy = generate(tmp_path / "busy", num_train=1, num_val=6, image_size=160, seed=5, progress=False)
    assert _roughness(plain) < 0.5 * _roughness(busy)
    info = json.loads((plain / "dataset_info.json").read_text())
    assert info["clutter"] == 0.0


def test_command_line(tmp_path, capsys):
    out = tmp_path / "cli"
    synthetic.main(["--out", str(out), "--num-train", "2", "--num-val", "2", "--image-size", "160"])
    assert "2 train, 2 val" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        synthetic.main(["--out", str(out), "--num-train", "2", "--num-val", "2", "--image-size", "160"])


def test_small_sides_change_only_the_small_objects_and_are_recorded(tmp_path):
    """``small_sides`` draws the small bucket's sides from its range, is written to
    dataset_info.json, and a bad range is refused naming the argument."""
    import json

    import numpy as np
    import pytest

    from ddetr_minimal.datasets import synthetic

    out = synthetic.generate(tmp_path / "toy", num_train=30, num_val=1, image_size=160,
                             progress=False, small_sides=(20, 22))
    info = json.loads((out / synthetic.INFO_FILE).read_text())
    assert info["small_sides"] == [20.0, 22.0]
    coco = json.loads((out / "annotations" / "instances_train.json").read_text())
    sides = np.array([max(a["bbox"][2], a["bbox"][3]) for a in coco["annotations"]])
    small = sides[sides < 32]
    # a nominal side of 20..22 px gives boxes of about that size (triangles a little less,
    # rotated squares a little more); nothing under 14 px, unlike the default 10..24
    assert len(small) > 0 and small.min() >= 14, small
    default = synthetic.generate(tmp_path / "default", num_train=30, num_val=1, image_size=160,
                                 progress=False)
    coco0 = json.loads((default / "annotations" / "instances_train.json").read_text())
    assert min(max(a["bbox"][2], a["bbox"][3]) for a in coco0["annotations"]) < 14
    for bad in ((30, 20), (2, 10), (10, 40), ("a", 3), 5):
        with pytest.raises(ValueError, match="small_sides"):
            synthetic.generate(tmp_path / "bad", num_train=1, num_val=1, progress=False, small_sides=bad)
    assert not (tmp_path / "bad").exists()
