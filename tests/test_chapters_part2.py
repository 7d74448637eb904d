"""Chapters 5-10 (the detector part of the book): static checks of the notebooks, and the
plotting functions they use from :mod:`ddetr_minimal.viz`.

The chapters are executed by the book build (tests/test_book.py); here we check what the
build would only report as a warning or not at all: every glued name the prose uses is glued by
the same notebook, every citation exists in the bibliography, every cross-reference points at a
page of the table of contents, and the notebooks are stored as the book expects.
"""
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nbformat  # noqa: E402
from sync_install_cells import install_cell, repository_url  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from ddetr_minimal.viz.curves import plot_bars, plot_metric_curves
from ddetr_minimal.viz.detection import plot_cost_matrix, plot_matching  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = ["ch05_model", "ch06_matching_losses", "ch07_training", "ch08_refinement_two_stage", "ch09_trained_models",
            "ch10_limitations"]
FIRST_CELL = install_cell(repository_url())  # the one _config.yml's repository gives


def notebook(name):
    return nbformat.read(ROOT / "book" / f"{name}.ipynb", as_version=4)


def markdown(nb):
    return "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")


def code(nb):
    return "\n".join(c.source for c in nb.cells if c.cell_type == "code")


def generated_markdown(nb):
    """Markdown the code builds at run time (cells showing Markdown(...) with roles in it)."""
    return "\n".join(re.findall(r'"([^"\n]*\{(?:cite|doc|glue:text)\}[^"\n]*)"', code(nb)))


@pytest.mark.parametrize("name", CHAPTERS)
def test_stored_as_the_book_expects(name):
    nb = notebook(name)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    cells = [c for c in nb.cells if c.cell_type == "code"]
    assert cells[0].source == FIRST_CELL, f"{name}: the first code cell must be the Colab install cell"
    assert all(not c.outputs and c.execution_count is None for c in cells), f"{name} stores outputs"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), f"{name}: no title"
    assert re.search(r"^from ddetr_minimal[. ]", code(nb), re.M), f"{name} does not import the package"


def test_chapters_are_a_part_of_the_toc_after_deformable_attention():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    captions = [p["caption"] for p in toc["parts"]]
    part = next(p for p in toc["parts"] if p["caption"] == "The detector")
    assert [c["file"] for c in part["chapters"]] == [f"book/{n}" for n in CHAPTERS]
    if "Deformable attention" in captions:
        assert captions.index("Deformable attention") < captions.index("The detector")
    assert captions.index("The detector") < captions.index("Back matter")


@pytest.mark.parametrize("name", CHAPTERS)
def test_every_glued_name_in_the_prose_is_glued_by_the_chapter(name):
    nb = notebook(name)
    used = set(re.findall(r"\{glue:text\}`([A-Za-z0-9_]+)", markdown(nb)))
    glued = set(re.findall(r"""glue\(\s*(?:f?["'])([A-Za-z0-9_]+)["']""", code(nb)))
    assert used, f"{name} glues no number into its prose"
    assert used <= glued, f"{name} uses {sorted(used - glued)} in its prose but never glues them"


@pytest.mark.parametrize("name", CHAPTERS)
def test_citations_exist_and_cross_references_resolve(name):
    nb = notebook(name)
    text = markdown(nb) + "\n" + generated_markdown(nb)
    keys = set(re.findall(r"^@\w+\{([^,]+),", (ROOT / "book" / "references.bib").read_text(), re.M))
    cited = {k.strip() for group in re.findall(r"\{cite\}`([^`]+)`", text) for k in group.split(",")}
    assert cited, f"{name} cites nothing"
    assert cited <= keys, f"{name} cites {sorted(cited - keys)}, missing from references.bib"
    toc_files = set(re.findall(r"file:\s*(\S+)", (ROOT / "_toc.yml").read_text()))
    for target in re.findall(r"\{doc\}`([^`<]+)`", text):
        assert f"book/{target}" in toc_files, f"{name} links to {target}, which is not in _toc.yml"


def test_bibliography_has_no_duplicate_keys():
    keys = re.findall(r"^@\w+\{([^,]+),", (ROOT / "book" / "references.bib").read_text(), re.M)
    assert len(keys) == len(set(keys)), sorted(k for k in set(keys) if keys.count(k) > 1)


# --------------------------------------------------------------------------------------
# The plotting functions the chapters use
# --------------------------------------------------------------------------------------
def test_cost_matrix_outlines_exactly_the_matched_cells():
    cost = torch.tensor([[1.0, 5.0], [0.5, 2.0], [3.0, 0.1]])
    ax = plot_cost_matrix(cost, rows=[1, 2], cols=[0, 1], row_labels=["a", "b", "c"], col_labels=["x", "y"])
    outlined = sorted((round(p.get_y() + 0.5), round(p.get_x() + 0.5)) for p in ax.patches if isinstance(p, Rectangle))
    assert outlined == [(1, 0), (2, 1)]
    assert sorted(t.get_text() for t in ax.texts) == sorted(f"{v:.2f}" for v in cost.flatten().tolist())
    plt.close("all")


def test_cost_matrix_rejects_bad_input():
    with pytest.raises(ValueError, match="cost"):
        plot_cost_matrix(torch.zeros(3))
    with pytest.raises(ValueError, match="row_labels"):
        plot_cost_matrix(torch.zeros(3, 2), row_labels=["a"])
    with pytest.raises(ValueError, match="same length"):
        plot_cost_matrix(torch.zeros(3, 2), rows=[0, 1], cols=[0])
    plt.close("all")


def test_matching_links_each_matched_pair_centre_to_centre():
    fig, ax = plt.subplots()
    gt = torch.tensor([[0.0, 0, 10, 10], [20, 20, 40, 40]])
    pred = torch.tensor([[22.0, 18, 42, 38], [50, 50, 60, 60], [1, 1, 9, 11]])
    plot_matching(ax, gt, pred, pred_idx=[2, 0], gt_idx=[0, 1])
    links = [ln for ln in ax.lines if len(ln.get_xdata()) == 2]
    ends = sorted((tuple(ln.get_xdata()), tuple(ln.get_ydata())) for ln in links)
    assert ends == sorted([((5.0, 5.0), (6.0, 5.0)), ((32.0, 30.0), (28.0, 30.0))])
    assert sum(isinstance(p, Rectangle) for p in ax.patches) == len(gt) + len(pred)
    with pytest.raises(ValueError, match="out of range"):
        plot_matching(ax, gt, pred, pred_idx=[3], gt_idx=[0])
    with pytest.raises(TypeError, match="Axes"):
        plot_matching(None, gt, pred, [0], [0])
    plt.close("all")


def test_metric_curves_accept_runs_with_different_epochs():
    ax = plot_metric_curves({"a": ([1, 2, 3], [0.1, 0.2, 0.3]), "b": (np.arange(1, 11), np.linspace(0, 1, 10))})
    assert [len(line.get_xdata()) for line in ax.lines] == [3, 10]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b"]
    with pytest.raises(ValueError, match="equal 1-D shape"):
        plot_metric_curves({"a": ([1, 2], [0.1])})
    with pytest.raises(ValueError, match="non-empty"):
        plot_metric_curves({})
    plt.close("all")


@pytest.mark.parametrize("horizontal", [False, True])
def test_bars_show_their_values(horizontal):
    values = {"backbone": 700.0, "encoder": 2100.0, "decoder": 300.0}
    ax = plot_bars(values, horizontal=horizontal, fmt="{:.0f} ms")
    sizes = sorted(p.get_width() if horizontal else p.get_height() for p in ax.patches)
    assert sizes == sorted(values.values())
    assert sorted(t.get_text() for t in ax.texts) == sorted(f"{v:.0f} ms" for v in values.values())
    with pytest.raises(ValueError, match="non-empty"):
        plot_bars({})
    plt.close("all")
