"""Post-processing: top-k over queries x classes, pixel boxes, and a pycocotools round trip."""
import contextlib
import io

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ddetr_minimal.datasets.coco_eval import to_coco_results
from ddetr_minimal.models.postprocess import PostProcess


def test_topk_over_queries_and_classes():
    logits = torch.full((1, 3, 4), -10.0)
    logits[0, 2, 1] = 3.0  # best: query 2, class 1
    logits[0, 0, 3] = 2.0  # second: query 0, class 3
    logits[0, 2, 0] = 1.0  # third: query 2 again, another class
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1], [0.25, 0.75, 0.5, 0.5]]])
    (r,) = PostProcess(num_select=3)({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]))
    assert r["labels"].tolist() == [1, 3, 0]
    torch.testing.assert_close(r["scores"], torch.sigmoid(torch.tensor([3.0, 2.0, 1.0])))
    # (cx, cy, w, h) = (0.25, 0.75, 0.5, 0.5) of a 200 x 100 (w x h) image -> x 0..100, y 50..100
    torch.testing.assert_close(r["boxes"][0], torch.tensor([0.0, 50.0, 100.0, 100.0]))
    torch.testing.assert_close(r["boxes"][1], torch.tensor([80.0, 30.0, 120.0, 70.0]))
    torch.testing.assert_close(r["boxes"][2], r["boxes"][0])


def test_default_keeps_100_and_clamps_to_available_pairs():
    torch.manual_seed(0)
    out = {"pred_logits": torch.randn(2, 300, 5), "pred_boxes": torch.rand(2, 300, 4)}
    results = PostProcess()(out, torch.tensor([[480, 640], [100, 100]]))
    assert [r["scores"].shape[0] for r in results] == [100, 100]
    assert (results[0]["scores"][:-1] >= results[0]["scores"][1:]).all()
    small = {"pred_logits": torch.randn(1, 4, 5), "pred_boxes": torch.rand(1, 4, 4)}
    assert PostProcess()(small, torch.tensor([[10, 10]]))[0]["scores"].shape == (20,)


def test_softmax_models_give_one_detection_per_query():
    logits = torch.tensor([[[0.0, 2.0, 5.0], [3.0, 1.0, 0.0]]])  # 2 classes + no object
    boxes = torch.rand(1, 2, 4)
    (r,) = PostProcess(focal=False)({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[10, 10]]))
    assert r["labels"].tolist() == [1, 0]  # no-object is never a label, even when most likely
    p = logits.softmax(-1)
    torch.testing.assert_close(r["scores"], torch.stack([p[0, 0, 1], p[0, 1, 0]]))


def test_bad_target_sizes():
    out = {"pred_logits": torch.zeros(2, 3, 4), "pred_boxes": torch.zeros(2, 3, 4)}
    with pytest.raises(ValueError, match=r"target_sizes must have shape \(2, 2\)"):
        PostProcess()(out, torch.tensor([[10, 10]]))
    with pytest.raises(ValueError, match="num_select must be a positive integer"):
        PostProcess(num_select=0)


def test_perfect_predictions_score_ap_one_with_pycocotools():
    """Outputs that encode the ground truth exactly, post-processed and converted for
    ``COCO.loadRes``, give AP = 1 in COCOeval."""
    sizes = [(100, 200), (80, 60)]  # (h, w)
    gt = {  # xywh pixels, COCO category ids 3 and 7
        1: [(3, [10.0, 20.0, 50.0, 40.0]), (7, [100.0, 10.0, 80.0, 60.0])],
        2: [(7, [5.0, 5.0, 30.0, 50.0])],
    }
    categories = [3, 7]
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i, "height": h, "width": w} for i, (h, w) in zip(gt, sizes)],
        "categories": [{"id": c, "name": str(c)} for c in categories],
        "annotations": [{"id": 10 * i + j, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3],
                         "iscrowd": 0} for i, objs in gt.items() for j, (c, b) in enumerate(objs)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    Q = 5
    logits = torch.full((2, Q, 2), -8.0)
    boxes = torch.full((2, Q, 4), 0.5)
    for b, ((h, w), objs) in enumerate(zip(sizes, gt.values())):
        for q, (c, (x, y, bw, bh)) in enumerate(objs):
            logits[b, q, categories.index(c)] = 8.0 - q  # distinct scores: a fixed order
            boxes[b, q] = torch.tensor([(x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h])
    results = PostProcess(num_select=10)({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor(sizes))
    dets = to_coco_results(list(gt), results, categories)
    assert len(dets) == 20 and set(dets[0]) == {"image_id", "category_id", "bbox", "score"}
    assert dets[0]["bbox"] == pytest.approx(gt[1][0][1], abs=1e-3) and dets[0]["category_id"] == 3
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco, coco.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)  # AP@[.5:.95]
