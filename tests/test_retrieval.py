"""Chapter 1's retrieval task: shapes, reproducible seeded runs, the deformable reference point,
and errors that name the bad argument."""
import math

import pytest
import torch

from ddetr_minimal.measure.retrieval import (
    build_layer,
    pixel_weights,
    position_codes,
    retrieval_batch,
    running_mean,
    steps_to_threshold,
    train_retrieval,
)


def _batch(side=4, C=8, **kwargs):
    g = torch.Generator().manual_seed(0)
    pos = position_codes(side, C, g)
    return pos, retrieval_batch(pos, side, batch=3, n_queries=5, generator=g, **kwargs)


def test_batch_shapes_and_what_each_part_holds():
    pos, b = _batch(displacement=(2.5, 0.5))
    assert b.query.shape == (3, 5, 8) and b.wanted.shape == (3, 5, 8) and b.target.shape == (3, 5)
    assert b.key.shape == b.value.shape == (3, 16, 8)
    assert b.reference.shape == (3, 5, 1, 2)
    torch.testing.assert_close(b.query, pos[b.target])  # a query is its target's position code
    n, q = 1, 2
    torch.testing.assert_close(b.wanted[n, q], b.value[n, b.target[n, q]])
    torch.testing.assert_close(b.key, (b.value + pos) / math.sqrt(2))
    # target = reference + displacement, in pixels whose centres sit at i + 0.5
    t = int(b.target[n, q])
    x_ref, y_ref = (b.reference[n, q, 0] * 4).tolist()
    assert (x_ref + 2.5, y_ref + 0.5) == pytest.approx((t % 4 + 0.5, t // 4 + 0.5))


def test_same_seed_same_batches_for_both_kinds_and_a_run_reproduces():
    a = train_retrieval(4, "deformable", steps=5, d_model=8, seed=3)
    b = train_retrieval(4, "deformable", steps=5, d_model=8, seed=3)
    assert a.loss == b.loss
    for pa, pb in zip(a.trained.parameters(), b.trained.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    c = train_retrieval(4, "deformable", steps=5, d_model=8, seed=4)
    assert c.loss != a.loss
    v = train_retrieval(4, "vanilla", steps=5, d_model=8, seed=3)
    torch.testing.assert_close(v.pos, a.pos, rtol=0, atol=0)  # same data for both kinds
    assert len(v.entropy) == 5 and a.entropy == []


def test_a_run_leaves_the_global_rng_alone():
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    train_retrieval(4, "vanilla", steps=2, d_model=8)
    torch.testing.assert_close(torch.rand(3), expected)


def test_training_lowers_the_loss_and_keeps_the_initial_layer():
    run = train_retrieval(8, "deformable", steps=60, d_model=16, seed=0)
    assert sum(run.loss[-10:]) / 10 < 0.5 * sum(run.loss[:10]) / 10
    changed = [not torch.equal(p, q) for p, q in zip(run.initial.parameters(), run.trained.parameters())]
    assert any(changed)


def test_pixel_weights_of_deformable_attention_at_initialisation():
    """The paper's initialisation puts P points 1..P pixels to the right of the reference with
    weights 1/P: with the reference on a pixel centre each point reads one pixel."""
    side, P = 8, 4
    layer = build_layer("deformable", d_model=8, n_points=P)
    pos, b = _batch(side=side, displacement=(0.0, 0.0))
    b = b._replace(target=torch.full((3, 5), 1 * side + 2))  # every query at pixel (x=2, y=1)
    b = b._replace(reference=torch.tensor([2.5 / side, 1.5 / side]).expand(3, 5, 1, 2))
    w = pixel_weights(layer, b, side)  # (N, Lq, HW)
    assert w.shape == (3, 5, side * side)
    expected = torch.zeros(side * side)
    expected[[side + 3, side + 4, side + 5, side + 6]] = 1 / P
    torch.testing.assert_close(w[1, 2], expected)


def test_pixel_weights_of_vanilla_attention_sum_to_one():
    pos, b = _batch()
    w = pixel_weights(build_layer("vanilla", d_model=8), b, 4)
    assert w.shape == (3, 5, 16)
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 5))


def test_steps_to_threshold():
    assert steps_to_threshold([1.0, 0.9, 0.4, 0.6, 0.3], 0.5) == 2
    assert steps_to_threshold([1.0, 0.9, 0.4, 0.6, 0.3], 0.5, window=2) == 4  # (0.6 + 0.3) / 2
    assert steps_to_threshold([1.0, 0.9], 0.5) == 2  # never: the whole run
    torch.testing.assert_close(running_mean([1.0, 3.0, 2.0, 6.0], 2), torch.tensor([2.0, 2.5, 4.0], dtype=torch.float64))


@pytest.mark.parametrize("call,name", [
    (lambda: train_retrieval(0), "side"),
    (lambda: train_retrieval(4, kind="sparse"), "kind"),
    (lambda: train_retrieval(4, steps=-1), "steps"),
    (lambda: train_retrieval(4, lr=0.0), "lr"),
    (lambda: train_retrieval(4, seed=1.5), "seed"),
    (lambda: train_retrieval(4, displacement=(1.0,)), "displacement"),
    (lambda: train_retrieval(4, displacement=(1.0, float("nan"))), "displacement"),
    (lambda: build_layer("deformable", n_points=0), "n_points"),
    (lambda: retrieval_batch(torch.randn(15, 8), 4), "pos has 15 rows"),
    (lambda: retrieval_batch(torch.randn(16, 8), 4, batch=0), "batch"),
    (lambda: retrieval_batch(torch.randn(16, 8), 4, n_queries=2.0), "n_queries"),
    (lambda: steps_to_threshold([1.0], 0.5, window=0), "window"),
    (lambda: running_mean([1.0], window=-2), "window"),
    (lambda: steps_to_threshold([1.0], float("inf")), "threshold"),
])
def test_bad_arguments_raise_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()
