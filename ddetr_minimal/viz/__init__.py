"""The plots the chapters show, one module per topic. Every function draws on an Axes (or a new
Figure) and returns it; ``from ddetr_minimal import viz`` then ``viz.plot_...``.

* :mod:`.common` -- the sample photograph, tables, and the helpers the others share;
* :mod:`.curves` -- cost against size on log-log axes, training and metric curves, mean +- sd
  bands over seeds, bars and grouped bars;
* :mod:`.attention` -- one query's attention map (vanilla or deformable), entropies against the
  uniform maximum;
* :mod:`.sampling` -- bilinear neighbours, deformable sampling points on an image, per level, and
  queries by levels (the paper's appendix figure);
* :mod:`.kernel` -- the kernel's thread layout and its benchmark;
* :mod:`.detection` -- boxes, ground truth with small objects marked, the matching cost matrix and
  the matched pairs;
* :mod:`.architecture` -- the block diagram of a built model, traced from one forward pass.
"""
from .architecture import plot_architecture, trace_architecture
from .attention import plot_attention_map, plot_deformable_map, plot_entropy_bars
from .common import glue, sample_photo, show_table, use_book_style
from .curves import (
    plot_bars,
    plot_cost_curves,
    plot_curves,
    plot_grouped_bars,
    plot_metric_curves,
    plot_seed_bands,
    seed_band,
)
from .detection import draw_boxes, draw_ground_truth, plot_cost_matrix, plot_matching
from .kernel import plot_kernel_benchmark, plot_thread_ownership
from .sampling import (
    bilinear_weight_map,
    plot_bilinear_neighbours,
    plot_sampling_grid,
    plot_sampling_levels,
    plot_sampling_points,
)

__all__ = [
    "bilinear_weight_map", "plot_architecture", "trace_architecture", "draw_boxes", "draw_ground_truth", "plot_attention_map", "plot_deformable_map", "plot_bars", "plot_bilinear_neighbours",
    "plot_cost_curves", "plot_cost_matrix", "plot_curves", "plot_grouped_bars", "plot_entropy_bars", "plot_kernel_benchmark",
    "plot_matching", "plot_metric_curves", "plot_sampling_grid", "plot_sampling_levels", "plot_sampling_points", "plot_seed_bands",
    "seed_band",
    "plot_thread_ownership", "sample_photo", "show_table", "glue", "use_book_style",
]
