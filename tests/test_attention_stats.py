"""What the chapter on the trained detectors measures: attention entropy and mass in the box,
the encoder's and DETR's attention read through hooks, recall per size bucket, and its plots."""
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.collections import PathCollection  # noqa: E402

from ddetr_minimal.datasets.coco_eval import pixel_ground_truth, recall_by_size, size_bucket  # noqa: E402
from ddetr_minimal.measure.attention_stats import (  # noqa: E402
    attention_statistics,
    box_share,
    cell_box_overlap,
    level_shares,
    map_mass_in_box,
    normalised_entropy,
    pixel_distance,
    points_mass_in_box,
    summarize,
)
from ddetr_minimal.models.build import build_model  # noqa: E402
from ddetr_minimal.models.inference import (  # noqa: E402
    decoder_sampling,
    detect_batch,
    detr_cross_attention,
    encoder_sampling,
    token_index,
)
from ddetr_minimal.models.transformer import encoder_reference_points  # noqa: E402
from ddetr_minimal.viz.curves import plot_grouped_bars  # noqa: E402
from ddetr_minimal.viz.sampling import plot_sampling_grid  # noqa: E402

TINY = dict(backbone="small", d_model=32, n_heads=4, enc_layers=2, dec_layers=2, dim_feedforward=64,
            num_queries=6, dropout=0.0, backend="torch")
H, W = 64, 96


def _batch():
    torch.manual_seed(0)
    images = torch.randn(2, 3, H, W)
    mask = torch.zeros(2, H, W, dtype=torch.bool)
    mask[1, :, 64:] = True  # the second image is 64 x 64, padded on the right
    targets = [
        {"labels": torch.tensor([1, 4]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]]),
         "size": torch.tensor([H, W]), "orig_size": torch.tensor([H, W])},
        {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]]),
         "size": torch.tensor([H, 64]), "orig_size": torch.tensor([H, 64])},
    ]
    return images, mask, targets


# --------------------------------------------------------------------------------------
# the measures
# --------------------------------------------------------------------------------------
def test_entropy_is_one_for_uniform_weights_and_zero_for_one_hot():
    uniform = torch.full((3, 5, 16), 1 / 16)
    assert torch.allclose(normalised_entropy(uniform), torch.ones(3, 5))
    one_hot = torch.zeros(4, 10)
    one_hot[torch.arange(4), torch.tensor([0, 3, 9, 5])] = 1.0
    assert torch.allclose(normalised_entropy(one_hot), torch.zeros(4), atol=1e-6)
    half = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    assert normalised_entropy(half).item() == pytest.approx(math.log(2) / math.log(4))


def test_entropy_counts_only_valid_entries():
    valid = torch.tensor([True, True, True, False, False])
    w = torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0.0, 0.0]])
    assert normalised_entropy(w, valid).item() == pytest.approx(1.0)
    assert normalised_entropy(w).item() == pytest.approx(math.log(3) / math.log(5))
    with pytest.raises(ValueError, match="invalid"):
        normalised_entropy(torch.tensor([[0.5, 0.0, 0.0, 0.5, 0.0]]), valid)
    with pytest.raises(ValueError, match="at least 2"):
        normalised_entropy(torch.ones(3, 1))
    with pytest.raises(ValueError, match="sum to 1"):
        normalised_entropy(torch.full((2, 4), 0.5))


def test_cell_overlap_counts_the_covered_fraction_of_each_cell():
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.5, 0.5], [0.25, 0.0, 0.5, 0.5]])
    got = cell_box_overlap(boxes, (2, 2))
    assert torch.allclose(got, torch.tensor([[1.0, 1, 1, 1], [1, 0, 0, 0], [0.5, 0, 0, 0]]))
    with pytest.raises(ValueError, match="boxes"):
        cell_box_overlap(torch.zeros(4), (2, 2))


def test_uniform_attention_puts_the_boxs_share_of_the_image_in_it():
    torch.manual_seed(1)
    xy = torch.rand(6, 2) * 0.5
    boxes = torch.cat([xy, xy + torch.rand(6, 2) * 0.5], -1)  # (6, 4) inside the unit square
    uniform = torch.full((6, 3, 8 * 12), 1 / 96)  # (B, M, H*W)
    mass = map_mass_in_box(uniform, boxes, (8, 12))  # (6, 3)
    assert torch.allclose(mass, box_share(boxes)[:, None].expand(6, 3), atol=1e-6)
    on_one_cell = torch.zeros(1, 16)
    on_one_cell[0, 5] = 1.0  # row 1, column 1 of a 4 x 4 map: [0.25, 0.5]^2
    assert map_mass_in_box(on_one_cell, torch.tensor([[0.25, 0.25, 0.5, 0.5]]), (4, 4)).item() == pytest.approx(1)
    assert map_mass_in_box(on_one_cell, torch.tensor([[0.5, 0.5, 1.0, 1.0]]), (4, 4)).item() == pytest.approx(0)
    with pytest.raises(ValueError, match="weights must have shape"):
        map_mass_in_box(torch.zeros(2, 15), boxes[:2], (4, 4))


def test_level_shares_sum_each_levels_points_and_average_the_heads():
    w = torch.zeros(2, 3, 4)  # (M, L, P)
    w[0, 0] = 0.25  # head 0: all on level 0
    w[1, 1, :2] = 0.5  # head 1: all on level 1
    assert torch.allclose(level_shares(w), torch.tensor([0.5, 0.5, 0.0]))
    with pytest.raises(ValueError, match="M, L, P"):
        level_shares(torch.zeros(4, 4))


def test_pixel_distance_scales_each_axis_by_the_image_size():
    a = torch.tensor([[0.0, 0.0], [0.5, 0.5]])
    b = torch.tensor([0.5, 0.5])
    assert torch.allclose(pixel_distance(a, b, (100, 200)), torch.tensor([math.hypot(100, 50), 0.0]))
    with pytest.raises(ValueError, match="pairs"):
        pixel_distance(a[:, :1], b, (100, 200))


def test_points_mass_sums_the_weights_of_the_points_inside():
    box = torch.tensor([[0.2, 0.2, 0.6, 0.6]])
    loc = torch.rand(1, 4, 12, 2) * 0.4 + 0.2  # (B, M, K, 2) all inside
    w = torch.softmax(torch.randn(1, 4, 12), -1)
    assert torch.allclose(points_mass_in_box(loc, w, box), torch.ones(1, 4))
    outside = loc.clone()
    outside[..., :6, 0] = 0.9  # half the points leave the box
    assert torch.allclose(points_mass_in_box(outside, w, box), w[..., 6:].sum(-1))
    with pytest.raises(ValueError, match="locations"):
        points_mass_in_box(loc[..., 0], w, box)


# --------------------------------------------------------------------------------------
# reading the attention of a model
# --------------------------------------------------------------------------------------
def test_encoder_hook_returns_every_tokens_sampling_at_the_papers_initialisation():
    torch.manual_seed(0)
    model, _, _ = build_model("deformable", num_classes=5, **TINY)
    images, mask, _ = _batch()
    seen = encoder_sampling(model, images, mask)
    shapes = seen["spatial_shapes"]
    S, M, L, P = int(shapes.prod(1).sum()), 4, 4, 4
    assert seen["locations"].shape == (2, S, M, L, P, 2)
    assert seen["weights"].shape == (2, S, M, L, P)
    assert seen["level_start_index"].tolist() == [0, *shapes.prod(1).cumsum(0)[:-1].tolist()]
    # the unpadded first image: each token's own pixel centre
    assert torch.allclose(seen["reference_points"][:1], encoder_reference_points(shapes, torch.ones(1, L, 2)))
    # at initialisation every head looks along its ray, p + 1 pixels of each level out, with equal weights
    assert torch.allclose(seen["weights"], torch.full_like(seen["weights"], 1 / (L * P)))
    ref = seen["reference_points"][:, :, None, :, None, :]  # (N, S, 1, L, 1, 2)
    pixels = (seen["locations"] - ref) * shapes.flip(-1).float().view(1, 1, 1, L, 1, 2)  # offsets in pixels
    assert torch.allclose(pixels[0, 0, 0, 0], torch.tensor([[1.0, 0.0], [2, 0], [3, 0], [4, 0]]), atol=1e-4)
    # the outputs are the model's own
    with torch.no_grad():
        plain = model(images, mask)
    assert torch.equal(plain["pred_boxes"], seen["outputs"]["pred_boxes"])
    with pytest.raises(ValueError, match="layer"):
        encoder_sampling(model, images, mask, layer=2)


def test_token_index_finds_the_token_whose_pixel_holds_the_point():
    shapes = torch.tensor([[8, 12], [4, 6], [2, 3]])
    refs = encoder_reference_points(shapes, torch.ones(1, 3, 2))[0, :, 0]  # (S, 2) pixel centres
    for level in range(3):
        for x, y in ((0.0, 0.0), (0.51, 0.26), (0.99, 0.99), (1.0, 1.0)):
            i = token_index(shapes, level, x, y)
            Hl, Wl = shapes[level].tolist()
            assert abs(refs[i, 0] - x) <= 0.5 / Wl + 1e-6 and abs(refs[i, 1] - y) <= 0.5 / Hl + 1e-6
    assert token_index(shapes, 1, 0.0, 0.0) == 96
    with pytest.raises(ValueError, match="level"):
        token_index(shapes, 3, 0.5, 0.5)


def test_detr_cross_attention_is_a_distribution_over_the_unpadded_stride_32_map():
    torch.manual_seed(0)
    model, _, _ = build_model("detr", num_classes=5, **TINY)
    images, mask, _ = _batch()
    seen = detr_cross_attention(model, images, mask)
    assert seen["spatial_shape"] == (H // 32, W // 32)
    w = seen["weights"]  # (N, M, Lq, S)
    assert w.shape == (2, 4, 6, (H // 32) * (W // 32))
    assert torch.allclose(w.sum(-1), torch.ones(2, 4, 6), atol=1e-5)
    assert seen["padding_mask"][1].tolist() == [False, False, True, False, False, True]
    assert (w[1][..., seen["padding_mask"][1]] == 0).all()


@pytest.mark.parametrize("kind", ["deformable", "detr"])
def test_statistics_cover_every_matched_object(kind):
    torch.manual_seed(0)
    model, _, _ = build_model(kind, num_classes=5, **TINY, **({"detr_focal": True} if kind == "detr" else {}))
    images, mask, targets = _batch()
    stats = attention_statistics(model, images, mask, targets, batch_size=1)
    # three objects in the batch
    assert all(v.shape == (3,) for k, v in stats.items() if k != "level_share")
    assert ((stats["entropy"] >= 0) & (stats["entropy"] <= 1 + 1e-6)).all()
    assert ((stats["mass_in_box"] >= 0) & (stats["mass_in_box"] <= 1 + 1e-6)).all()
    assert torch.allclose(stats["box_share"], torch.tensor([0.2 * 0.3, 0.3 * 0.2, 0.4 * 0.4 * 64 / 96]))
    assert torch.allclose(stats["area"], torch.tensor([0.2 * W * 0.3 * H, 0.3 * W * 0.2 * H, 0.4 * 64 * 0.4 * H]))
    if kind == "deformable":  # the paper's initialisation: uniform weights over the L * P points
        assert torch.allclose(stats["entropy"], torch.ones(3), atol=1e-5)
        assert torch.allclose(stats["level_share"], torch.full((3, 4), 0.25))
        assert torch.allclose(stats["points_in_box"], stats["mass_in_box"])  # equal weights already
    else:
        assert "level_share" not in stats and "points_in_box" not in stats
    means = summarize(stats)
    assert means["queries"] == 3
    assert means["mass_over_uniform"] == pytest.approx(means["mass_in_box"] / means["box_share"])


def test_decoder_sampling_still_checks_its_layer():
    torch.manual_seed(0)
    model, _, _ = build_model("deformable", num_classes=5, **TINY)
    images, mask, _ = _batch()
    assert decoder_sampling(model, images, mask, layer=0)["locations"].shape == (2, 6, 4, 4, 4, 2)
    with pytest.raises(ValueError, match="layer"):
        decoder_sampling(model, images, mask, layer=-3)


def test_detect_batch_equals_one_big_batch():
    torch.manual_seed(0)
    model, _, post = build_model("deformable", num_classes=5, **TINY)
    images, mask, _ = _batch()
    sizes = torch.tensor([[H, W], [H, 64]])
    parts = detect_batch(model, post, images, mask, sizes, batch_size=1)
    with torch.no_grad():
        whole = post(model(images, mask), sizes)
    for a, b in zip(parts, whole):
        assert torch.allclose(a["boxes"], b["boxes"], atol=1e-4) and torch.equal(a["labels"], b["labels"])


# --------------------------------------------------------------------------------------
# recall per size bucket
# --------------------------------------------------------------------------------------
def test_recall_counts_one_to_one_matches_of_the_right_class():
    gt = [{"labels": torch.tensor([0, 1, 2]),
           "boxes": torch.tensor([[0.0, 0, 20, 20], [50, 50, 100, 100], [0, 100, 110, 210]])}]
    det = [{"scores": torch.tensor([0.9, 0.8, 0.7, 0.6]), "labels": torch.tensor([0, 0, 1, 2]),
            "boxes": torch.tensor([[1.0, 1, 20, 20], [0, 0, 20, 21], [80, 80, 130, 130], [0, 100, 110, 210]])}]
    got = recall_by_size(det, gt)
    # the small object is found once (the second detection cannot claim it again); the medium one's
    # detection overlaps it with IoU 0.09; the large one is found
    assert {b: (v["found"], v["total"]) for b, v in got.items()} == {"small": (1, 1), "medium": (0, 1),
                                                                    "large": (1, 1)}
    assert recall_by_size(det, gt, top_k=2)["large"]["found"] == 0  # the large one's detection ranks 4th
    wrong_class = [{**det[0], "labels": torch.tensor([3, 3, 3, 3])}]
    assert all(v["found"] == 0 for v in recall_by_size(wrong_class, gt).values())
    assert size_bucket(31 * 33) == "small" and size_bucket(96 * 96) == "medium" and size_bucket(97 * 96) == "large"
    with pytest.raises(ValueError, match="iou"):
        recall_by_size(det, gt, iou=0.0)
    with pytest.raises(ValueError, match="images"):
        recall_by_size(det, gt + gt)


def test_pixel_ground_truth_is_in_the_original_images_pixels():
    _, _, targets = _batch()
    gt = pixel_ground_truth(targets)
    assert torch.allclose(gt[0]["boxes"][0], torch.tensor([0.2 * W, 0.25 * H, 0.4 * W, 0.55 * H], dtype=torch.float64))
    assert torch.allclose(gt[1]["boxes"][0], torch.tensor([0.3 * 64, 0.3 * H, 0.7 * 64, 0.7 * H], dtype=torch.float64))


# --------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------
def test_sampling_grid_has_a_panel_per_query_and_level_with_every_heads_points():
    Q, M, L, P = 3, 4, 2, 5
    loc = torch.rand(Q, M, L, P, 2)
    w = torch.softmax(torch.randn(Q, M, L * P), -1).view(Q, M, L, P)
    boxes = torch.tensor([[1.0, 1, 10, 10]] * Q)
    fig = plot_sampling_grid(torch.rand(3, 32, 48), loc, w, torch.tensor([[8, 12], [4, 6]]),
                             reference_points=torch.rand(Q, 2), boxes=boxes, row_labels=["a", "b", "c"])
    panels = fig.axes[:-1]  # the last axes is the colour bar
    assert len(panels) == Q * L
    for ax in panels:
        sizes = [len(c.get_offsets()) for c in ax.collections if isinstance(c, PathCollection)]
        assert sorted(sizes) == [1, M * P]  # the reference point and the sampling points
        assert len(ax.patches) == 1
    assert [panels[i * L].get_ylabel() for i in range(Q)] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="row_labels"):
        plot_sampling_grid(torch.rand(3, 32, 48), loc, w, torch.tensor([[8, 12], [4, 6]]), row_labels=["a"])
    plt.close("all")


def test_grouped_bars_draw_one_bar_per_series_and_category():
    values = {"DETR": {"small": 0.1, "medium": 0.5, "large": 0.9}, "Deformable": {"small": 0.3, "medium": 0.6,
                                                                                  "large": 0.8}}
    ax = plot_grouped_bars(values, fmt="{:.1f}")
    assert sorted(round(p.get_height(), 6) for p in ax.patches) == sorted(v for d in values.values() for v in d.values())
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["DETR", "Deformable"]
    with pytest.raises(ValueError, match="categories"):
        plot_grouped_bars({"a": {"x": 1.0}, "b": {"y": 1.0}})
    plt.close("all")


def test_snapshots_are_a_groups_checkpoints_in_epoch_order(tmp_path):
    from ddetr_minimal.training import checkpoints

    entries = {f"{g}_s{s}_e{e:03d}": {"file": "x.pth", "group": g, "seed": s, "epoch": e, "of_epochs": 20}
               for g in ("detr", "deformable") for s in (0, 1) for e in (20, 0, 2, 10)}
    checkpoints.write_manifest(tmp_path, entries, {"command": "c", "commit": "x"})
    assert checkpoints.snapshots("detr", 1, tmp_path) == ["detr_s1_e000", "detr_s1_e002", "detr_s1_e010",
                                                          "detr_s1_e020"]
    assert checkpoints.final_checkpoint("deformable", 0, tmp_path) == "deformable_s0_e020"
    with pytest.raises(KeyError, match="refine"):
        checkpoints.snapshots("refine", 0, tmp_path)


def test_ground_truth_marks_exactly_the_small_objects():
    from ddetr_minimal.viz.detection import draw_ground_truth

    fig, ax = plt.subplots()
    draw_ground_truth(ax, torch.tensor([[0.0, 0, 31, 33], [0, 0, 32, 32], [10, 10, 20, 20]]))
    assert [p.get_edgecolor()[:3] for p in ax.patches] == [(1.0, 0, 0), (1.0, 1.0, 1.0), (1.0, 0, 0)]
    assert [t.get_text() for t in ax.texts] == ["small", "small"]
    plt.close("all")


def test_top_queries_are_the_best_scoring_with_their_boxes_in_pixels():
    from ddetr_minimal.models.inference import top_queries

    logits = torch.tensor([[[-5.0, 1.0], [3.0, -2.0], [0.0, 0.5]]])  # (N, Lq, num_classes)
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.25, 0.5, 0.5, 1.0], [0.1, 0.1, 0.1, 0.1]]])
    top = top_queries({"pred_logits": logits, "pred_boxes": boxes}, 2, (100, 200))
    assert top["queries"].tolist() == [1, 0] and top["labels"].tolist() == [0, 1]
    assert torch.allclose(top["boxes"][0], torch.tensor([0.0, 0, 100, 100]))
    with pytest.raises(ValueError, match="k must"):
        top_queries({"pred_logits": logits, "pred_boxes": boxes}, 4, (100, 200))


def test_over_checkpoints_measures_each_saved_epoch(tmp_path):
    from ddetr_minimal.measure.attention_stats import over_checkpoints
    from ddetr_minimal.training import checkpoints
    from ddetr_minimal.training.train import build_model_from_args, resolve_args

    args = resolve_args(["--model", "deformable", "--data-path", str(tmp_path), "--d-model", "32", "--n-heads", "2",
                         "--enc-layers", "1", "--dec-layers", "1", "--dim-feedforward", "64", "--num-queries", "8",
                         "--n-levels", "2", "--image-size", "160"])
    entries = {}
    for epoch in (0, 4):
        torch.manual_seed(epoch)
        model, _, _ = build_model_from_args(args, 5)
        if epoch:  # a "trained" model: attention weights no longer uniform
            for layer in model.transformer.decoder.layers:
                torch.nn.init.normal_(layer.cross_attn.attention_weights.weight, std=1.0)
        name = f"deformable_s0_e{epoch:03d}"
        entries[name] = {"file": f"{name}.pth", "group": "deformable", "seed": 0, "epoch": epoch, "of_epochs": 4}
        checkpoints.write_trained(tmp_path / f"{name}.pth", model.state_dict(), vars(args), list("abcde"),
                                  entries[name])
    checkpoints.write_manifest(tmp_path, entries, {"command": "c", "commit": "x"})
    images, mask, targets = _batch()
    rows = over_checkpoints(checkpoints.snapshots("deformable", 0, tmp_path), images, mask, targets, root=tmp_path,
                            with_stats=True)
    assert [r["fraction"] for r in rows] == [0.0, 1.0] and [r["queries"] for r in rows] == [3, 3]
    assert rows[0]["entropy"] == pytest.approx(1.0, abs=1e-5) and rows[1]["entropy"] < 0.99
    assert rows[1]["stats"]["level_share"].shape == (3, 2)
    assert "stats" not in over_checkpoints(["deformable_s0_e000"], images, mask, targets, root=tmp_path)[0]
