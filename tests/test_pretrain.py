"""Backbone pretraining: the per-cell targets, a short run, loading the weights into a detector."""
import pytest
import torch

from ddetr_minimal.training import pretrain, train
from ddetr_minimal.models.backbone import SmallBackbone
from ddetr_minimal.datasets.synthetic import generate


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("data") / "toy", num_train=6, num_val=3, image_size=160, seed=0,
                    progress=False)


def test_cell_targets_label_boxes_smallest_on_top_and_ignore_padding():
    # a 64 x 48 image padded to 64 x 64; a big box of class 1 on the left, a small one of class 3 inside it
    boxes = torch.tensor([[16 / 48, 32 / 64, 32 / 48, 64 / 64],   # x 0..32, y 0..64 (cx, cy, w, h)
                          [12 / 48, 12 / 64, 8 / 48, 8 / 64]])     # x 8..16, y 8..16
    t = {"boxes": boxes, "labels": torch.tensor([1, 3]), "size": torch.tensor([64, 48])}
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    mask[:, :, 48:] = True
    lab = pretrain.cell_targets([t], mask, (8, 8), num_classes=5)[0]  # cells of 8 x 8 px, centres at 4, 12, ...
    assert lab.shape == (8, 8)
    assert (lab[:, 6:] == -100).all()  # padding columns (x >= 48)
    assert lab[1, 1] == 3  # centre (12, 12): inside the small box, drawn on top
    assert lab[0, 0] == 1 and lab[7, 3] == 1  # inside the big box only
    assert (lab[:, 4:6] == 5).all()  # x 32..48: background
    assert (lab == 3).sum() == 1


def test_short_pretraining_learns_and_refuses_to_overwrite(toy, tmp_path):
    out = tmp_path / "backbone.pth"
    record = pretrain.pretrain(toy, out, epochs=2, batch_size=2, seed=0, log=lambda *a: None)
    assert [r["epoch"] for r in record["history"]] == [1, 2]
    assert all(len(r["object_cell_accuracy"]) == 3 for r in record["history"])
    assert record["history"][1]["loss"] < record["history"][0]["loss"]
    before = out.read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        pretrain.pretrain(toy, out, epochs=1)
    assert out.read_bytes() == before
    saved = torch.load(out, weights_only=True)["backbone"]
    fresh = SmallBackbone().state_dict()
    assert saved.keys() == fresh.keys()
    assert any(not torch.equal(saved[k], fresh[k]) for k in saved)


def test_training_starts_from_the_pretrained_backbone(toy, tmp_path):
    weights = tmp_path / "backbone.pth"
    pretrain.pretrain(toy, weights, epochs=1, batch_size=2, log=lambda *a: None)
    args = ["--model", "detr", "--data-path", str(toy), "--d-model", "32", "--n-heads", "2", "--enc-layers", "1",
            "--dec-layers", "1", "--dim-feedforward", "64", "--num-queries", "8", "--batch-size", "2",
            "--no-progress", "--threads", "1", "--device", "cpu", "--epochs", "1", "--eval-every", "5",
            "--lr-backbone", "0", "--backbone-weights", str(weights)]
    train.main([*args, "--output-dir", str(tmp_path / "run")])
    model = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=False)["model"]
    saved = torch.load(weights, weights_only=True)["backbone"]
    for k, v in saved.items():  # the backbone was frozen (lr 0), so it still holds the pretrained weights
        assert torch.equal(model["backbone." + k], v), k


def test_bad_backbone_weights_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="do not exist"):
        pretrain.load_backbone_weights(SmallBackbone(), tmp_path / "missing.pth")
    torch.save({"model": {}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="no 'backbone' entry"):
        pretrain.load_backbone_weights(SmallBackbone(), tmp_path / "other.pth")
    torch.save({"backbone": SmallBackbone((8, 16, 32)).state_dict(), "channels": [8, 16, 32]}, tmp_path / "narrow.pth")
    with pytest.raises(ValueError, match=r"do not fit this backbone \(channels \[8, 16, 32\]\)"):
        pretrain.load_backbone_weights(SmallBackbone(), tmp_path / "narrow.pth")
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        pretrain.pretrain(tmp_path, tmp_path / "x.pth", epochs=0)
