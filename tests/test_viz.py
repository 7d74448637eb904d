"""The plotting functions draw what they are given, with titles and axis labels, on small inputs."""
import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ddetr_minimal import viz
from ddetr_minimal.measure.cost import fit_exponent


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def assert_labelled(ax: Axes):
    assert isinstance(ax, Axes)
    assert ax.get_title(), "the axes has no title"
    assert ax.get_xlabel() and ax.get_ylabel(), "an axis has no label"
    assert ax.has_data(), "nothing was drawn"


# --------------------------------------------------------------------------------------
# fit_exponent
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("p,c", [(2.0, 3e-9), (1.0, 0.5), (0.5, 7.0), (-1.0, 2.0)])
def test_fit_exponent_recovers_known_power_laws(p, c):
    x = np.array([100, 300, 1000, 3000, 10000], dtype=float)
    got_p, got_c = fit_exponent(x, c * x ** p)
    assert got_p == pytest.approx(p, abs=1e-9)
    assert got_c == pytest.approx(c, rel=1e-6)


def test_fit_exponent_tolerates_noise():
    rng = np.random.default_rng(0)
    x = np.geomspace(100, 10000, 8)
    y = 1e-6 * x ** 2 * np.exp(rng.normal(0, 0.05, size=x.shape))  # 5% multiplicative noise
    assert fit_exponent(x, y)[0] == pytest.approx(2.0, abs=0.1)


@pytest.mark.parametrize("x,y,match", [
    ([1.0], [1.0], "at least 2"),
    ([1.0, 2.0], [1.0, -1.0], "positive"),
    ([1.0, 2.0, 3.0], [1.0, 2.0], "equal length"),
    ([2.0, 2.0], [1.0, 3.0], "distinct"),
])
def test_fit_exponent_rejects_bad_input(x, y, match):
    with pytest.raises(ValueError, match=match):
        fit_exponent(x, y)


# --------------------------------------------------------------------------------------
# Curves
# --------------------------------------------------------------------------------------
def test_plot_cost_curves_shows_fitted_exponents_beside_formula():
    hw = [256, 576, 1024, 2304]
    ax = viz.plot_cost_curves({"quadratic": (hw, [1e-8 * n ** 2 for n in hw]),
                               "linear": (hw, [1e-5 * n for n in hw])},
                              expected={"quadratic": 2, "linear": 1}, title="t", ylabel="time (s)")
    assert_labelled(ax)
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["quadratic: fitted exponent 2.00 (formula: 2)", "linear: fitted exponent 1.00 (formula: 1)"]
    # two measured curves and two dashed fits; the measured points are drawn where they were given
    assert len(ax.lines) == 4
    np.testing.assert_allclose(ax.lines[0].get_xdata(), hw)


def test_plot_cost_curves_fit_last_uses_only_the_largest_sizes():
    hw = [10, 100, 1000, 10000]
    y = [1.0, 1.0, 1000.0, 100000.0]  # flat, then quadratic
    ax = viz.plot_cost_curves({"s": (hw, y)}, fit_last=2)
    assert "fitted exponent 2.00" in ax.get_legend().get_texts()[0].get_text()


def test_plot_cost_curves_rejects_mismatched_series():
    with pytest.raises(ValueError, match="series"):
        viz.plot_cost_curves({"s": ([1, 2, 3], [1, 2])})
    with pytest.raises(ValueError, match="non-empty"):
        viz.plot_cost_curves({})


def test_plot_curves_draws_one_line_per_series_and_reference_lines():
    x = np.arange(10)
    ax = viz.plot_curves(x, {"a": x ** 2, "b": np.sqrt(x)}, title="curves", xlabel="step",
                         ylabel="loss", hlines={"bound": 3.0})
    assert_labelled(ax)
    assert [line.get_label() for line in ax.lines[:2]] == ["a", "b"]
    assert ax.lines[2].get_ydata()[0] == 3.0
    with pytest.raises(ValueError, match="shape"):
        viz.plot_curves(x, {"bad": np.arange(3)})


def _seed_curve(aps, every=1):
    """Per-epoch records with the loss every epoch and AP on every ``every``-th epoch."""
    return [{"epoch": e, "loss": 1.0 / e, **({"AP": ap} if e % every == 0 else {})}
            for e, ap in enumerate(aps, start=1)]


def test_seed_band_is_the_mean_and_sample_sd_at_the_shared_evaluated_epochs():
    curves = [_seed_curve([0.0, 0.1, 0.2, 0.3], every=2), _seed_curve([0.0, 0.3, 0.2, 0.5], every=2)]
    band = viz.seed_band(curves)
    assert band["n"] == 2 and band["epoch"].tolist() == [2, 4]
    np.testing.assert_allclose(band["mean"], [20.0, 40.0])
    np.testing.assert_allclose(band["sd"], [np.std([10, 30], ddof=1), np.std([30, 50], ddof=1)])
    one = viz.seed_band(curves[:1], scale=1.0)
    assert one["n"] == 1 and one["sd"].tolist() == [0.0, 0.0] and one["mean"].tolist() == [0.1, 0.3]
    # a seed evaluated at other epochs: only the epochs every seed has
    assert viz.seed_band([*curves, _seed_curve([0.1] * 4, every=4)])["epoch"].tolist() == [4]
    with pytest.raises(ValueError, match="no epoch with 'AP_S'"):
        viz.seed_band(curves, key="AP_S")
    with pytest.raises(ValueError, match="share no evaluated epoch"):
        viz.seed_band([_seed_curve([0.1, 0.2], every=2), [{"epoch": 1, "AP": 0.1}]])
    with pytest.raises(ValueError, match="non-empty list"):
        viz.seed_band([])


def test_plot_seed_bands_shades_mean_pm_sd_and_marks_each_lr_drop():
    several = viz.seed_band([_seed_curve([0.1, 0.2, 0.4]), _seed_curve([0.1, 0.4, 0.6])])
    single = viz.seed_band([_seed_curve([0.05, 0.1])])
    ax = viz.plot_seed_bands({"A": several, "B": single}, lr_drops={"A": 2, "B": 1}, hlines={"AP 5": 5.0},
                             title="bands")
    assert_labelled(ax)
    assert ax.get_xscale() == "log"
    mean_a, drop_a, mean_b, drop_b, threshold = ax.lines
    assert mean_a.get_label() == "A (2 seeds, mean ± sd)" and mean_b.get_label() == "B (1 seed)"
    np.testing.assert_allclose(mean_a.get_ydata(), several["mean"])
    assert drop_a.get_xdata()[0] == 2 and drop_a.get_color() == mean_a.get_color()
    assert drop_b.get_xdata()[0] == 1 and threshold.get_ydata()[0] == 5.0
    assert len(ax.collections) == 1  # a band for the seeds of A only
    lo, hi = ax.collections[0].get_paths()[0].vertices[:, 1].min(), ax.collections[0].get_paths()[0].vertices[:, 1].max()
    assert lo == pytest.approx((several["mean"] - several["sd"]).min()) and hi == pytest.approx(
        (several["mean"] + several["sd"]).max())
    assert ax.get_legend() is not None and viz.plot_seed_bands({"A": several}, legend=None).get_legend() is None
    with pytest.raises(ValueError, match="lr_drops names"):
        viz.plot_seed_bands({"A": several}, lr_drops={"C": 1})
    with pytest.raises(ValueError, match="lacks"):
        viz.plot_seed_bands({"A": {"epoch": [1]}})
    with pytest.raises(ValueError, match="non-empty"):
        viz.plot_seed_bands({})


# --------------------------------------------------------------------------------------
# Attention maps and entropy
# --------------------------------------------------------------------------------------
def test_plot_attention_map_reshapes_row_major():
    w = torch.zeros(12)
    w[1 * 4 + 3] = 1.0  # row 1, column 3 of a 3 x 4 map
    ax = viz.plot_attention_map(w, (3, 4), query_xy=(3, 1), title="one query")
    assert_labelled(ax)
    shown = ax.images[0].get_array()
    assert shown.shape == (3, 4) and shown[1, 3] == 1.0 and shown.sum() == 1.0


def test_plot_attention_map_over_an_image_and_bad_size():
    img = torch.rand(3, 30, 40)
    ax = viz.plot_attention_map(torch.rand(12).softmax(0), (3, 4), image=img, colorbar=False)
    assert len(ax.images) == 2  # the photograph and the attention on top
    with pytest.raises(ValueError, match="H\\*W"):
        viz.plot_attention_map(torch.rand(10), (3, 4))


def test_plot_entropy_bars_heights_and_maximum():
    ax = viz.plot_entropy_bars({"init": 5.0, "trained": 0.5}, max_entropy=math.log(256))
    assert_labelled(ax)
    assert [p.get_height() for p in ax.patches] == [5.0, 0.5]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["init", "trained"]
    assert ax.lines[0].get_ydata()[0] == pytest.approx(math.log(256))
    with pytest.raises(ValueError):
        viz.plot_entropy_bars({})


# --------------------------------------------------------------------------------------
# Bilinear interpolation
# --------------------------------------------------------------------------------------
def test_bilinear_weight_map_at_a_pixel_centre_is_one_hot():
    H, W = 4, 5
    w = viz.bilinear_weight_map(((2 + 0.5) / W, (1 + 0.5) / H), H, W)  # centre of row 1, column 2
    expected = torch.zeros(H, W, dtype=w.dtype)
    expected[1, 2] = 1.0
    torch.testing.assert_close(w, expected)


def test_bilinear_weight_map_matches_the_textbook_formula():
    H, W = 6, 6
    px, py = 2.3, 3.8  # continuous pixel coordinates
    w = viz.bilinear_weight_map(((px + 0.5) / W, (py + 0.5) / H), H, W)
    fx, fy = 0.3, 0.8
    assert w[3, 2].item() == pytest.approx((1 - fx) * (1 - fy))
    assert w[3, 3].item() == pytest.approx(fx * (1 - fy))
    assert w[4, 2].item() == pytest.approx((1 - fx) * fy)
    assert w[4, 3].item() == pytest.approx(fx * fy)
    assert (w != 0).sum() == 4 and w.sum().item() == pytest.approx(1.0)


def test_bilinear_weight_map_reads_zero_outside():
    # half a pixel left of the first centre: half the weight falls outside the map
    w = viz.bilinear_weight_map((0.0, 0.5 / 3), 3, 3)
    assert w.sum().item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="H"):
        viz.bilinear_weight_map((0.5, 0.5), 0, 3)


def test_plot_bilinear_neighbours_annotates_the_four_weights():
    ax = viz.plot_bilinear_neighbours((0.53, 0.36), 8, 8)
    assert_labelled(ax)
    texts = sorted(t.get_text() for t in ax.texts)
    assert texts == ["w=0.10", "w=0.16", "w=0.28", "w=0.46"]


# --------------------------------------------------------------------------------------
# Sampling points
# --------------------------------------------------------------------------------------
def _sampling(Lq=2, M=3, L=2, K=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    loc = torch.rand(Lq, M, L, K, 2, generator=g)  # (Lq, M, L, K, 2)
    w = torch.rand(Lq, M, L * K, generator=g).softmax(-1).view(Lq, M, L, K)  # (Lq, M, L, K)
    return loc, w


def test_plot_sampling_points_places_points_in_image_pixels():
    loc, w = _sampling()
    img = torch.rand(3, 40, 60)  # H = 40, W = 60
    ax = viz.plot_sampling_points(img, loc, w, reference_points=torch.rand(2, 2), title="points")
    assert_labelled(ax)
    head0 = ax.collections[0].get_offsets()
    expected = loc[:, 0].reshape(-1, 2).numpy() * np.array([60, 40])
    np.testing.assert_allclose(head0, expected, rtol=1e-6)
    assert len(ax.collections) == 3 + 1  # one per head and the reference points


def test_plot_sampling_points_one_level_and_chosen_heads():
    loc, w = _sampling()
    ax = viz.plot_sampling_points(np.zeros((10, 10, 3)), loc, w, level=1, heads=[2])
    assert len(ax.collections) == 1
    assert len(ax.collections[0].get_offsets()) == 2 * 4  # Lq * K points of level 1
    with pytest.raises(ValueError, match="level"):
        viz.plot_sampling_points(np.zeros((10, 10)), loc, level=2)
    with pytest.raises(ValueError, match="locations"):
        viz.plot_sampling_points(np.zeros((10, 10)), loc[0])
    with pytest.raises(ValueError, match="weights"):
        viz.plot_sampling_points(np.zeros((10, 10)), loc, w[:, :2])


def test_plot_sampling_levels_one_panel_per_level():
    loc, w = _sampling(L=3)
    shapes = torch.tensor([[8, 12], [4, 6], [2, 3]])
    fig = viz.plot_sampling_levels(torch.rand(3, 32, 48), loc, shapes, w, reference_points=torch.rand(2, 3, 2))
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 3
    for l, ax in enumerate(fig.axes):
        assert_labelled(ax)
        assert f"{shapes[l, 0].item()} x {shapes[l, 1].item()}" in ax.get_title()
        assert ax.images[0].get_array().shape[:2] == tuple(shapes[l].tolist())  # the image at that level
    with pytest.raises(ValueError, match="spatial_shapes"):
        viz.plot_sampling_levels(torch.rand(3, 32, 48), loc, shapes[:2])


# --------------------------------------------------------------------------------------
# Boxes and the photograph
# --------------------------------------------------------------------------------------
def test_draw_boxes_converts_formats_and_labels():
    _, ax = plt.subplots()
    boxes = torch.tensor([[50.0, 40.0, 20.0, 10.0], [10.0, 10.0, 4.0, 6.0]])  # cx, cy, w, h
    viz.draw_boxes(ax, boxes, labels=[1, 0], scores=[0.9, 0.4], box_format="cxcywh",
                   class_names=["cat", "dog"], title="detections")
    rects = ax.patches
    assert len(rects) == 2
    assert rects[0].get_xy() == (40.0, 35.0) and rects[0].get_width() == 20.0 and rects[0].get_height() == 10.0
    assert sorted(t.get_text() for t in ax.texts) == ["cat 0.40", "dog 0.90"]
    assert ax.get_title() == "detections"


def test_draw_boxes_rejects_bad_input():
    _, ax = plt.subplots()
    with pytest.raises(ValueError, match="boxes"):
        viz.draw_boxes(ax, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="labels"):
        viz.draw_boxes(ax, torch.zeros(2, 4), labels=[1])
    with pytest.raises(TypeError, match="ax"):
        viz.draw_boxes(None, torch.zeros(2, 4))
    viz.draw_boxes(ax, torch.zeros(0, 4))  # nothing to draw is fine
    assert len(ax.patches) == 0


def test_sample_photo():
    img = viz.sample_photo((48, 40))
    assert img.shape == (3, 48, 40) and img.dtype == torch.float32
    assert 0.0 <= img.min() and img.max() <= 1.0 and img.std() > 0.05
    assert viz.sample_photo().shape == (3, 600, 512)
    with pytest.raises(ValueError, match="size"):
        viz.sample_photo((0, 10))


def test_architecture_diagram_follows_the_model():
    from ddetr_minimal import build_model
    from ddetr_minimal.viz.architecture import plot_architecture, trace_architecture

    model, _, _ = build_model(num_classes=5, backbone="small", d_model=32, n_heads=4, enc_layers=2, dec_layers=3,
                              dim_feedforward=64, num_queries=7, n_levels=3, backend="torch")
    stages = trace_architecture(model.eval(), torch.randn(2, 3, 64, 96))
    names = [s.name for s in stages]
    assert names == ["Images", "Backbone", "Input projections", "Deformable encoder", "Deformable decoder",
                     "Class and box heads"]
    by_name = {s.name: s for s in stages}
    assert by_name["Input projections"].outputs == [(2, 32, 8, 12), (2, 32, 4, 6), (2, 32, 2, 3)]
    assert by_name["Deformable encoder"].outputs == [(2, 8 * 12 + 4 * 6 + 2 * 3, 32)]
    assert by_name["Deformable decoder"].outputs == [(3, 2, 7, 32)]
    assert by_name["Class and box heads"].outputs == [(2, 7, 5), (2, 7, 4)]
    assert by_name["Deformable encoder"].parameters == sum(p.numel() for p in model.transformer.encoder.parameters())
    fig = plot_architecture(stages)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert any("3 layers" in t for t in texts) and any("(2, 7, 5)" in t for t in texts)
    with pytest.raises(TypeError, match="must be a DeformableDETR"):
        trace_architecture(torch.nn.Linear(2, 2), torch.randn(1, 3, 8, 8))


def _figures_of_every_plot():
    """One figure from every plotting function that makes its own, on small inputs."""
    L, M, P = 4, 3, 2
    loc, w = torch.rand(2, M, L, P, 2), torch.rand(2, M, L, P).softmax(-1)
    shapes = torch.tensor([[8, 12], [4, 6], [2, 3], [1, 2]])
    yield "plot_cost_curves", viz.plot_cost_curves({"a": ([16, 64, 256], [1.0, 4.0, 16.0])}).figure
    yield "plot_curves", viz.plot_curves(np.arange(5), {"a": np.arange(5.0)}).figure
    yield "plot_metric_curves", viz.plot_metric_curves({"run": ([1, 2, 3], [0.1, 0.2, 0.3])}).figure
    band = viz.seed_band([[{"epoch": 1, "AP": 0.1}, {"epoch": 2, "AP": 0.3}]] * 2)
    yield "plot_seed_bands", viz.plot_seed_bands({"run": band}, lr_drops={"run": 1.5}, hlines={"AP 5": 5}).figure
    yield "plot_bars", viz.plot_bars({"a": 1.0, "b": 2.0}).figure
    yield "plot_attention_map", viz.plot_attention_map(torch.rand(12).softmax(0), (3, 4)).figure
    yield "plot_entropy_bars", viz.plot_entropy_bars({"a": 1.0, "b": 2.0}).figure
    yield "plot_deformable_map", viz.plot_deformable_map(
        torch.rand(12).softmax(0), (3, 4), torch.rand(2, 2), torch.rand(2), (0.5, 0.5), (1, 1)).figure
    yield "plot_bilinear_neighbours", viz.plot_bilinear_neighbours((0.53, 0.36), 8, 8).figure
    yield "plot_sampling_points", viz.plot_sampling_points(torch.rand(3, 32, 48), loc, w).figure
    yield "plot_sampling_levels", viz.plot_sampling_levels(torch.rand(3, 32, 48), loc, shapes, w)
    yield "plot_cost_matrix", viz.plot_cost_matrix(np.random.rand(8, 5), [0, 1], [1, 0]).figure
    yield "plot_thread_ownership", viz.plot_thread_ownership(2, 2, 40)
    yield "plot_sampling_grid", viz.plot_sampling_grid(torch.rand(3, 32, 48), loc, w, shapes,
                                                       row_labels=["small circle", "large ring"], title="t")
    yield "plot_grouped_bars", viz.plot_grouped_bars({"a": {"x": 1.0, "y": 2.0}, "b": {"x": 2.0, "y": 1.0}}).figure


@pytest.mark.parametrize("index", range(14))
def test_every_plot_fits_the_column_with_legible_text(index):
    from ddetr_minimal.viz.common import legibility_problems

    name, fig = list(_figures_of_every_plot())[index]
    assert legibility_problems(fig) == [], name
    plt.close("all")


def test_legibility_problems_flags_wide_figures_and_tiny_text():
    from ddetr_minimal.viz.common import legibility_problems

    fig, ax = plt.subplots(figsize=(13.6, 4))  # shown at half size in the column
    ax.text(0.5, 0.5, "tiny", fontsize=12)  # 6 pt once shrunk
    problems = legibility_problems(fig)
    assert any("13.60 in wide" in p for p in problems) and any("'tiny' is 6.0 pt" in p for p in problems)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.set_title("fine", fontsize=9)
    ax.tick_params(labelsize=8)
    assert legibility_problems(fig) == []
    plt.close("all")


def test_plot_deformable_map_marks_points_reference_and_target():
    w = torch.zeros(12)
    w[5] = 1.0
    loc, pw = torch.tensor([[0.4, 0.5], [0.6, 0.5]]), torch.tensor([0.25, 0.75])
    ax = viz.plot_deformable_map(w, (3, 4), loc, pw, reference_xy=(0.25, 0.5), target_xy=(1, 1))
    assert_labelled(ax)
    labels = ax.get_legend_handles_labels()[1]
    assert sorted(labels) == ["reference point", "sampling points", "target pixel"]
    points = ax.collections[0].get_offsets()
    np.testing.assert_allclose(points, [[1.1, 1.0], [1.9, 1.0]])  # x * W - 0.5, y * H - 0.5
    with pytest.raises(ValueError, match="point_weights"):
        viz.plot_deformable_map(w, (3, 4), loc, pw[:1], reference_xy=(0.25, 0.5))
