"""Set criterion: focal / cross-entropy, L1, GIoU against hand computations; normalisation;
auxiliary and encoder losses; empty images; the box count across processes."""
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ddetr_minimal.models.criterion import SetCriterion, num_boxes_across_processes
from ddetr_minimal.models.matcher import HungarianMatcher
from conftest import giou_cxcywh




def _focal(x, t, alpha=0.25, gamma=2.0):
    p = 1 / (1 + math.exp(-x))
    ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
    p_t = p * t + (1 - p) * (1 - t)
    return (alpha * t + (1 - alpha) * (1 - t)) * ce * (1 - p_t) ** gamma


PRED = [[0.5, 0.5, 0.2, 0.2], [0.1, 0.9, 0.1, 0.1]]
TARGET = [0.55, 0.5, 0.2, 0.3]  # clearly closest to prediction 0


def _one_image(logits):
    outputs = {"pred_logits": torch.tensor([logits]), "pred_boxes": torch.tensor([PRED])}
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([TARGET])}]
    return outputs, targets


def test_focal_l1_giou_losses_match_hand_computation():
    logits = [[0.5, -1.0], [2.0, 0.3]]
    outputs, targets = _one_image(logits)
    crit = SetCriterion(2, HungarianMatcher(), aux_layers=0)
    losses = crit(outputs, targets)
    onehot = [[0, 1], [0, 0]]  # prediction 0 matched to class 1; prediction 1 is "no object"
    focal = sum(_focal(logits[q][k], onehot[q][k]) for q in range(2) for k in range(2))
    assert losses["loss_ce"].item() == pytest.approx(focal, rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(0.05 + 0.1, rel=1e-5)
    assert losses["loss_giou"].item() == pytest.approx(1 - giou_cxcywh(PRED[0], TARGET), rel=1e-5)
    total = 2 * losses["loss_ce"] + 5 * losses["loss_bbox"] + 2 * losses["loss_giou"]
    assert crit.total_loss(losses).item() == pytest.approx(total.item())


def test_cross_entropy_weights_no_object_by_eos_coef():
    logits = [[0.5, 1.5, -1.0], [2.0, 0.3, 0.1]]  # 2 classes + no object
    outputs, targets = _one_image(logits)
    crit = SetCriterion(2, HungarianMatcher(1, 5, 2, focal=False), focal=False, aux_layers=0)
    losses = crit(outputs, targets)
    nll = lambda row, c: -math.log(math.exp(row[c]) / sum(math.exp(v) for v in row))
    expected = (1.0 * nll(logits[0], 1) + 0.1 * nll(logits[1], 2)) / (1.0 + 0.1)
    assert losses["loss_ce"].item() == pytest.approx(expected, rel=1e-5)
    assert crit.weight_dict == {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}


def test_box_losses_are_normalised_by_the_number_of_objects():
    torch.manual_seed(0)
    boxes = torch.rand(2, 4, 4) * 0.3 + 0.2
    outputs = {"pred_logits": torch.zeros(2, 4, 3), "pred_boxes": boxes}
    # targets are predictions 0 (and 1) shifted by 0.01 in cx: matched, L1 = 0.01 each
    shift = torch.tensor([0.01, 0, 0, 0])
    targets = [{"labels": torch.tensor([0]), "boxes": boxes[0, :1] + shift},
               {"labels": torch.tensor([2, 1]), "boxes": boxes[1, :2] + shift}]
    losses = SetCriterion(3, HungarianMatcher(0, 1, 0), aux_layers=0)(outputs, targets)
    assert losses["loss_bbox"].item() == pytest.approx(0.01, rel=1e-3)  # (3 x 0.01) / 3 objects


def test_aux_and_encoder_losses_and_their_weights():
    torch.manual_seed(0)
    layer = lambda: {"pred_logits": torch.randn(1, 4, 3), "pred_boxes": torch.rand(1, 4, 4) * 0.5 + 0.25}
    outputs = dict(layer(), aux_outputs=[layer(), layer()], enc_outputs=layer())
    targets = [{"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]])}]
    crit = SetCriterion(3, HungarianMatcher(), aux_layers=2, two_stage=True)
    losses = crit(outputs, targets)
    assert set(losses) == set(crit.weight_dict) and len(losses) == 3 * 4
    # aux layer 1 is supervised exactly like a final layer would be
    alone = SetCriterion(3, HungarianMatcher(), aux_layers=0)(outputs["aux_outputs"][1], targets)
    for k, v in alone.items():
        assert losses[f"{k}_1"].item() == pytest.approx(v.item())
    # proposals are class-agnostic: the object counts as class 0
    binary = [{"labels": torch.tensor([0]), "boxes": targets[0]["boxes"]}]
    enc = SetCriterion(3, HungarianMatcher(), aux_layers=0)(outputs["enc_outputs"], binary)
    assert losses["loss_ce_enc"].item() == pytest.approx(enc["loss_ce"].item())
    with pytest.raises(ValueError, match=r"losses \['loss_ce_7'\] have no weight"):
        crit.total_loss(dict(losses, loss_ce_7=torch.tensor(1.0)))


def test_images_without_objects():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 3, requires_grad=True)
    boxes = torch.rand(2, 5, 4, requires_grad=True)
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)} for _ in range(2)]
    crit = SetCriterion(3, HungarianMatcher(), aux_layers=0)
    losses = crit({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
    # every query is a negative; the divisor is clamped to 1
    expected = sum(_focal(v, 0) for v in logits.detach().flatten().tolist())
    assert losses["loss_ce"].item() == pytest.approx(expected, rel=1e-5)
    crit.total_loss(losses).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_bad_logit_count_is_rejected():
    outputs, targets = _one_image([[0.5, 1.5, -1.0], [2.0, 0.3, 0.1]])
    with pytest.raises(ValueError, match=r"pred_logits has 3 classes .* expected 2"):
        SetCriterion(2, HungarianMatcher(), aux_layers=0)(outputs, targets)
    with pytest.raises(ValueError, match="loss_weights must have exactly the keys"):
        SetCriterion(2, HungarianMatcher(), loss_weights={"loss_ce": 1.0})


def _count_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    targets = [{"labels": torch.zeros(1 + 2 * rank, dtype=torch.int64)}]  # 1 object on rank 0, 3 on rank 1
    n = num_boxes_across_processes(targets, torch.device("cpu"))
    with open(os.path.join(out_dir, f"{rank}.txt"), "w") as f:
        f.write(str(n))
    dist.destroy_process_group()


def test_box_count_is_averaged_across_processes(tmp_path):
    assert num_boxes_across_processes([{"labels": torch.zeros(0)}], torch.device("cpu")) == 1.0  # clamp
    # fork: the workers need no fresh interpreter (spawning one re-imports torch, seconds per process)
    mp.start_processes(_count_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    assert [float((tmp_path / f"{r}.txt").read_text()) for r in range(2)] == [2.0, 2.0]
