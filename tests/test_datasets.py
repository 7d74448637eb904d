"""COCO-layout loading: label mapping, box conversion, bad annotations, transforms, padding."""
import json
import logging

import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from ddetr_minimal.datasets.coco import CocoDetection, build_dataset, collate_fn
from ddetr_minimal.datasets.synthetic import generate
from ddetr_minimal.datasets.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RandomSizeCrop,
    make_transforms,
)


def _write(tmp_path, annotations, images=None, make_files=True):
    """A tiny COCO folder: two images (40x60 and 50x30) and three categories with ids 3, 7, 11."""
    images = images or [{"id": 1, "file_name": "a.png", "width": 60, "height": 40},
                        {"id": 2, "file_name": "b.png", "width": 30, "height": 50}]
    folder = tmp_path / "img"
    folder.mkdir(exist_ok=True)
    if make_files:
        for im in images:
            Image.new("RGB", (im["width"], im["height"]), (120, 30, 200)).save(folder / im["file_name"])
    cats = [{"id": 11, "name": "ring"}, {"id": 3, "name": "circle"}, {"id": 7, "name": "square"}]
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": cats}))
    return folder, ann_file


def _ann(i, image_id, cat, bbox, **kw):
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": bbox, "iscrowd": 0, **kw}


def test_labels_are_contiguous_and_boxes_normalised_cxcywh(tmp_path):
    folder, ann = _write(tmp_path, [_ann(1, 1, 11, [6, 4, 30, 20]), _ann(2, 1, 3, [0, 0, 60, 40]),
                                    _ann(3, 2, 7, [3, 5, 12, 10])])
    ds = CocoDetection(folder, ann)
    assert ds.cat_ids == [3, 7, 11] and ds.class_names == ["circle", "square", "ring"] and ds.num_classes == 3
    image, target = ds[0]
    assert image.shape == (3, 40, 60) and image.dtype == torch.float32
    expected_pixel = (torch.tensor([120, 30, 200]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(image[:, 0, 0], expected_pixel, atol=1e-5)
    assert target["labels"].tolist() == [2, 0]
    # (6 + 15) / 60, (4 + 10) / 40, 30 / 60, 20 / 40
    assert torch.allclose(target["boxes"], torch.tensor([[21 / 60, 14 / 40, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]))
    assert target["orig_size"].tolist() == [40, 60] == target["size"].tolist() and target["image_id"] == 1


def test_missing_image_file_raises_with_file_and_annotation_ids(tmp_path):
    images = [{"id": 5, "file_name": "gone.png", "width": 20, "height": 20}]
    folder, ann = _write(tmp_path, [_ann(41, 5, 3, [1, 1, 5, 5])], images=images, make_files=False)
    with pytest.raises(FileNotFoundError, match=r"gone\.png.*image id 5.*\[41\]"):
        CocoDetection(folder, ann)


def test_box_outside_the_image_raises(tmp_path):
    folder, ann = _write(tmp_path, [_ann(77, 1, 3, [70, 10, 5, 5])])  # x >= width 60
    with pytest.raises(ValueError, match=r"annotation id 77.*outside.*a\.png"):
        CocoDetection(folder, ann)


@pytest.mark.parametrize("bbox, message", [([1, 2, 3], "4 finite numbers"), ([1, 2, float("nan"), 4], "4 finite")])
def test_malformed_bbox_raises(tmp_path, bbox, message):
    folder, ann = _write(tmp_path, [_ann(9, 1, 3, bbox)])
    with pytest.raises(ValueError, match=f"annotation id 9.*{message}"):
        CocoDetection(folder, ann)


def test_unknown_category_or_image_raises(tmp_path):
    folder, ann = _write(tmp_path, [_ann(4, 1, 99, [1, 1, 5, 5])])
    with pytest.raises(ValueError, match=r"annotation id 4.*category_id 99"):
        CocoDetection(folder, ann)
    folder, ann = _write(tmp_path, [_ann(6, 123, 3, [1, 1, 5, 5])])
    with pytest.raises(ValueError, match=r"annotation id 6.*image_id 123"):
        CocoDetection(folder, ann)


def test_degenerate_boxes_are_dropped_with_a_warning(tmp_path, caplog):
    anns = [_ann(1, 1, 3, [5, 5, 0, 10]), _ann(2, 1, 7, [5, 5, 10, -3]), _ann(3, 1, 11, [5, 5, 10, 10]),
            _ann(4, 1, 3, [59.9999, 5, 4, 4])]  # the last one is empty once clipped
    folder, ann = _write(tmp_path, anns)
    with caplog.at_level(logging.WARNING, logger="ddetr_minimal.datasets.coco"):
        ds = CocoDetection(folder, ann)
    _, target = ds[0]
    assert target["labels"].tolist() == [2]
    warned = " ".join(r.getMessage() for r in caplog.records)
    for aid in (1, 2, 4):
        assert f"annotation id {aid} of image a.png" in warned
    assert "annotation id 3 " not in warned


def test_partly_outside_box_is_clipped_and_crowd_is_skipped(tmp_path):
    folder, ann = _write(tmp_path, [_ann(1, 1, 3, [50, -5, 20, 15]), _ann(2, 1, 7, [1, 1, 9, 9], iscrowd=1)])
    _, target = CocoDetection(folder, ann)[0]
    # clipped to x 50..60, y 0..10
    assert torch.allclose(target["boxes"], torch.tensor([[55 / 60, 5 / 40, 10 / 60, 10 / 40]]))
    assert target["labels"].tolist() == [0]


def test_collate_pads_and_masks(tmp_path):
    folder, ann = _write(tmp_path, [_ann(1, 1, 3, [6, 4, 30, 20]), _ann(2, 2, 7, [3, 5, 12, 10])])
    ds = CocoDetection(folder, ann)
    (a, ta), (b, tb) = ds[0], ds[1]
    images, mask, targets = collate_fn([(a, ta), (b, tb)])
    assert images.shape == (2, 3, 50, 60) and mask.shape == (2, 50, 60) and mask.dtype == torch.bool
    assert torch.equal(images[0, :, :40, :60], a) and torch.equal(images[1, :, :50, :30], b)
    assert not mask[0, :40, :].any() and mask[0, 40:, :].all()
    assert not mask[1, :, :30].any() and mask[1, :, 30:].all()
    assert (images[1, :, :, 30:] == 0).all()
    assert targets[1] is tb
    with pytest.raises(ValueError, match="empty batch"):
        collate_fn([])


def _white_box_sample(h=80, w=100, box=(20, 10, 60, 50)):
    img = torch.zeros(3, h, w, dtype=torch.uint8)
    x0, y0, x1, y1 = box
    img[:, y0:y1, x0:x1] = 255
    target = {"boxes": tv_tensors.BoundingBoxes(torch.tensor([box], dtype=torch.float32), format="XYXY",
                                                canvas_size=(h, w)),
              "labels": torch.tensor([1])}
    return tv_tensors.Image(img), target


def _bbox_of_white(img):
    ys, xs = torch.nonzero(img[0] > 127, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_flip_and_crop_move_boxes_with_pixels():
    from torchvision.transforms import v2

    torch.manual_seed(0)
    img, target = _white_box_sample()
    out, t = v2.RandomHorizontalFlip(1.0)(img, target)
    assert t["boxes"].tolist() == [_bbox_of_white(out)] == [[40, 10, 80, 50]]
    crop = RandomSizeCrop(30, 70)
    for _ in range(20):
        out, t = crop(img, target)
        assert 30 <= out.shape[-1] <= 70 and 30 <= out.shape[-2] <= 70
        if (out[0] > 127).any():
            assert t["boxes"].tolist() == [_bbox_of_white(out)]
    with pytest.raises(ValueError, match="min_size"):
        RandomSizeCrop(50, 20)


def test_pipeline_drops_boxes_cropped_away():
    torch.manual_seed(0)
    img, target = _white_box_sample(h=100, w=100, box=(0, 0, 10, 10))
    pipeline = make_transforms("train", "toy", image_size=100)
    kept = dropped = 0
    for _ in range(40):
        out, t = pipeline(img, target)
        assert out.dtype == torch.float32 and len(t["boxes"]) == len(t["labels"])
        visible = bool((out[0] > 0).any())  # white is > 0 after normalisation, black < 0
        assert len(t["labels"]) == int(visible)
        kept, dropped = kept + visible, dropped + (not visible)
    assert kept and dropped
    with pytest.raises(ValueError, match="split"):
        make_transforms("test")
    with pytest.raises(ValueError, match="preset"):
        make_transforms("train", "imagenet")


def test_toy_dataset_loads_with_augmentation(tmp_path):
    root = generate(tmp_path / "toy", num_train=4, num_val=2, image_size=160, seed=0, progress=False)
    torch.manual_seed(1)
    ds = build_dataset(root, "train", "toy", 160)
    sizes = set()
    for i in range(len(ds)):
        for _ in range(3):
            image, t = ds[i]
            sizes.add(tuple(image.shape[-2:]))
            assert ((t["boxes"] >= 0) & (t["boxes"] <= 1)).all()
            assert t["size"].tolist() == list(image.shape[-2:])
            assert t["labels"].max() < ds.num_classes
    assert len(sizes) > 1, "the random crop never changed the image size"
    val = build_dataset(root, "val", "toy")
    assert val[0][0].shape[-2:] == (160, 160)
    with pytest.raises(FileNotFoundError, match="instances_test"):
        build_dataset(root, "test")
