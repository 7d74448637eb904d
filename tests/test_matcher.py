"""Hungarian matching: optimality against brute force, the cost terms, bad and empty input."""
import itertools
import math

import pytest
import torch

from ddetr_minimal.models.matcher import HungarianMatcher
from conftest import giou_cxcywh


def _random_problem(seed, B=1, Q=5, K=3, n=(3,)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, Q, K, generator=g) * 2
    centres = torch.rand(B, Q, 2, generator=g) * 0.6 + 0.2
    sizes = torch.rand(B, Q, 2, generator=g) * 0.3 + 0.05
    targets = []
    for b in range(B):
        tc = torch.rand(n[b], 2, generator=g) * 0.6 + 0.2
        ts = torch.rand(n[b], 2, generator=g) * 0.3 + 0.05
        targets.append({"labels": torch.randint(0, K, (n[b],), generator=g), "boxes": torch.cat([tc, ts], -1)})
    return {"pred_logits": logits, "pred_boxes": torch.cat([centres, sizes], -1)}, targets


@pytest.mark.parametrize("focal", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_matching_is_the_brute_force_optimum(focal, seed):
    n = seed % 5  # 0 to 4 objects for 5 queries
    outputs, targets = _random_problem(seed, Q=5, K=4 if focal else 5, n=(n,))
    matcher = HungarianMatcher(2, 5, 2, focal=focal) if focal else HungarianMatcher(1, 5, 2, focal=False)
    (rows, cols), = matcher(outputs, targets)
    assert len(rows) == len(cols) == n
    if n == 0:
        return
    cost = matcher.cost_matrix(outputs["pred_logits"][0], outputs["pred_boxes"][0], targets[0]["labels"],
                               targets[0]["boxes"])
    best = min(sum(cost[q, j].item() for j, q in enumerate(perm)) for perm in itertools.permutations(range(5), n))
    found = cost[rows, cols].sum().item()
    assert found == pytest.approx(best, abs=1e-5)
    assert len(set(rows.tolist())) == n and sorted(cols.tolist()) == list(range(n))




def test_cost_terms_match_the_formulas():
    pred = [0.4, 0.5, 0.2, 0.3]
    tgt = [0.5, 0.45, 0.3, 0.2]
    logit = 0.7
    p = 1 / (1 + math.exp(-logit))
    l1 = sum(abs(x - y) for x, y in zip(pred, tgt))
    giou = giou_cxcywh(pred, tgt)
    focal_class = 0.25 * (1 - p) ** 2 * -math.log(p) - 0.75 * p ** 2 * -math.log(1 - p)
    logits = torch.tensor([[-3.0, logit]])
    m = HungarianMatcher(2, 5, 2, focal=True)
    cost = m.cost_matrix(logits, torch.tensor([pred]), torch.tensor([1]), torch.tensor([tgt]))
    assert cost.item() == pytest.approx(2 * focal_class + 5 * l1 - 2 * giou, rel=1e-5)
    softmax_p = math.exp(logit) / (math.exp(-3.0) + math.exp(logit))
    m = HungarianMatcher(1, 5, 2, focal=False)
    cost = m.cost_matrix(logits, torch.tensor([pred]), torch.tensor([1]), torch.tensor([tgt]))
    assert cost.item() == pytest.approx(-softmax_p + 5 * l1 - 2 * giou, rel=1e-5)


def test_batch_with_empty_images():
    outputs, targets = _random_problem(3, B=3, Q=6, n=(0, 2, 0))
    indices = HungarianMatcher()(outputs, targets)
    assert [len(r) for r, _ in indices] == [0, 2, 0]
    assert all(r.dtype == torch.int64 and c.dtype == torch.int64 for r, c in indices)


def test_obvious_assignment():
    """Each target sits exactly on one prediction with the right class: the matcher finds it."""
    boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2], [0.8, 0.7, 0.2, 0.3]]])
    logits = torch.full((1, 3, 2), -5.0)
    logits[0, 0, 1] = logits[0, 1, 0] = logits[0, 2, 1] = 5.0
    targets = [{"labels": torch.tensor([1, 0]), "boxes": boxes[0, [2, 1]]}]
    (rows, cols), = HungarianMatcher()({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert dict(zip(cols.tolist(), rows.tolist())) == {0: 2, 1: 1}


@pytest.mark.parametrize("where", ["pred_boxes", "pred_logits"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_costs_raise_a_clear_error(where, bad):
    outputs, targets = _random_problem(0, B=2, n=(2, 2))
    outputs[where][1, 2, 0] = bad
    with pytest.raises(ValueError, match=rf"cannot match image 1: {where} holds NaN/inf \(\d+ of the 10 matching costs"):
        HungarianMatcher()(outputs, targets)


def test_non_finite_target_raises():
    outputs, targets = _random_problem(0, n=(2,))
    targets[0]["boxes"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"cannot match image 0: targets\[0\]\['boxes'\] holds NaN/inf"):
        HungarianMatcher()(outputs, targets)


def test_bad_targets_are_rejected():
    outputs, targets = _random_problem(0, n=(2,))
    m = HungarianMatcher()
    with pytest.raises(ValueError, match="targets must be a list of 1 dicts"):
        m(outputs, targets * 2)
    with pytest.raises(ValueError, match=r"labels'\] must lie in \[0, 3\)"):
        m(outputs, [{"labels": torch.tensor([0, 3]), "boxes": targets[0]["boxes"]}])
    with pytest.raises(ValueError, match="must be an int64 tensor"):
        m(outputs, [{"labels": torch.tensor([0.0, 1.0]), "boxes": targets[0]["boxes"]}])
    with pytest.raises(ValueError, match=r"must be a float tensor of shape \(2, 4\)"):
        m(outputs, [{"labels": torch.tensor([0, 1]), "boxes": torch.rand(2, 5)}])
    with pytest.raises(ValueError, match="pred_logits must have shape"):
        m({"pred_logits": torch.zeros(1, 5), "pred_boxes": torch.zeros(1, 5, 4)}, targets)
