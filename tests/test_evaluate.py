"""COCO evaluation: the pycocotools wrapper and the ``evaluate`` command on a checkpoint."""
import contextlib
import io
import json

import pytest
import torch
from pycocotools.coco import COCO

from ddetr_minimal.training import evaluate, train
from ddetr_minimal.datasets.coco_eval import (
    METRIC_NAMES,
    coco_box_metrics,
    format_metrics,
    to_coco_results,
)
from ddetr_minimal.datasets.synthetic import generate


def _gt(tmp_path):
    """Three images, one object per COCO size bucket, category ids 5 and 9."""
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 200, "height": 200} for i in (1, 2, 3)]
    boxes = {1: [10, 10, 20, 20], 2: [50, 50, 60, 60], 3: [20, 30, 150, 120]}  # small, medium, large
    anns = [{"id": i, "image_id": i, "category_id": 5 if i != 2 else 9, "bbox": b, "area": b[2] * b[3],
             "iscrowd": 0} for i, b in boxes.items()]
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 5, "name": "a"}, {"id": 9, "name": "b"}]}))
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path)), boxes


def _detections(boxes, shift=0.0, labels=None):
    out = []
    for i, (x, y, w, h) in boxes.items():
        label = (0 if i != 2 else 1) if labels is None else labels[i]
        out.append({"scores": torch.tensor([0.9]), "labels": torch.tensor([label]),
                    "boxes": torch.tensor([[x + shift, y, x + w + shift, y + h]], dtype=torch.float32)})
    return out


def test_to_coco_results_maps_labels_and_converts_to_xywh():
    det = [{"scores": torch.tensor([0.5, 0.25]), "labels": torch.tensor([1, 0]),
            "boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 5.0, 5.0]])}]
    res = to_coco_results([42], det, [5, 9])
    assert res == [{"image_id": 42, "category_id": 9, "bbox": [10.0, 20.0, 20.0, 40.0], "score": 0.5},
                   {"image_id": 42, "category_id": 5, "bbox": [0.0, 0.0, 5.0, 5.0], "score": 0.25}]
    with pytest.raises(ValueError, match="image_ids"):
        to_coco_results([1, 2], det, [5, 9])


def test_perfect_detections_score_one_and_errors_score_less(tmp_path):
    gt, boxes = _gt(tmp_path)
    perfect = coco_box_metrics(gt, to_coco_results([1, 2, 3], _detections(boxes), [5, 9]))
    for k in ("AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L"):
        assert perfect[k] == pytest.approx(1.0), k
    # shifting every box by 8 px: the small one falls below IoU 0.5 (0.43), the large one stays above 0.75 (0.90)
    shifted = coco_box_metrics(gt, to_coco_results([1, 2, 3], _detections(boxes, shift=8), [5, 9]))
    assert shifted["AP_S"] == pytest.approx(0.0) and shifted["AP_L"] > 0.5 and shifted["AP"] < perfect["AP"]
    wrong = coco_box_metrics(gt, to_coco_results([1, 2, 3], _detections(boxes, labels={1: 1, 2: 0, 3: 1}), [5, 9]))
    assert wrong["AP"] == pytest.approx(0.0)
    assert coco_box_metrics(gt, []) == {k: 0.0 for k in METRIC_NAMES}
    only_first = coco_box_metrics(gt, to_coco_results([1], _detections({1: boxes[1]}), [5, 9]), image_ids=[1])
    assert only_first["AP_S"] == pytest.approx(1.0) and only_first["AP_L"] == -1.0  # no large object there
    assert format_metrics(perfect).startswith("AP 100.0")


@pytest.mark.slow
def test_evaluate_command_prints_and_saves(tmp_path, capsys):
    toy = generate(tmp_path / "toy", num_train=4, num_val=3, image_size=160, seed=0, progress=False)
    run = tmp_path / "run"
    history = train.main(["--model", "detr", "--data-path", str(toy), "--output-dir", str(run), "--epochs", "1",
                          "--d-model", "32", "--n-heads", "2", "--enc-layers", "1", "--dec-layers", "1",
                          "--dim-feedforward", "64", "--num-queries", "8", "--batch-size", "2", "--no-progress",
                          "--threads", "1", "--device", "cpu"])["epochs"]
    capsys.readouterr()
    result = evaluate.main(["--checkpoint", str(run / "checkpoint.pth"), "--no-progress", "--device", "cpu"])
    printed = capsys.readouterr().out
    saved = json.loads((run / "eval_val_epoch1.json").read_text())
    assert saved["metrics"] == result["metrics"] and saved["num_images"] == 3
    for k in ("AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L"):
        assert k in printed
        # the same weights on the same images give the numbers training logged
        assert saved["metrics"][k] == pytest.approx(history[0][k])
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", str(run / "checkpoint.pth"), "--no-progress", "--device", "cpu"])
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        evaluate.evaluate_checkpoint(tmp_path / "nothing.pth")
