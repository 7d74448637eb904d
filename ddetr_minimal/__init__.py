"""ddetr_minimal: a small, readable Deformable DETR (Zhu et al., ICLR 2021).

The sub-packages follow the order in which data flows and the book teaches:

* :mod:`ddetr_minimal.ops` -- the op ``ms_deform_attn``: its input checks, the ``loop`` and
  ``torch`` backends, the CuPy kernel wrapper and the kernel's CPU emulation (chapters 2-4);
* :mod:`ddetr_minimal.models` -- attention modules, position encoding, backbones, the
  deformable transformer, Deformable DETR and DETR, matcher, criterion, post-processing,
  :func:`build_model` and :func:`load_released` (chapters 1-3, 5, 6, 8);
* :mod:`ddetr_minimal.datasets` -- the toy generator, COCO-layout loading, transforms and COCO
  evaluation (chapter 7);
* :mod:`ddetr_minimal.training` -- the training engine, the command lines, backbone pretraining and
  the recorded experiment (chapters 7, 8);
* :mod:`ddetr_minimal.measure` -- timing, memory, cost counters and fits, provenance of records,
  the benchmarks and attention statistics (chapters 1, 2, 4, 9, 10);
* :mod:`ddetr_minimal.viz` -- the plots, one module per topic (every chapter).

Commands: ``python -m ddetr_minimal <command>`` (``python -m ddetr_minimal --help`` lists them).
"""
from .models.build import build_model
from .models.deformable_attention import MSDeformAttn
from .models.released import load_released
from .ops.checks import level_start_index_from_shapes
from .ops.msda import ms_deform_attn

__version__ = "0.2.0"

__all__ = ["ms_deform_attn", "level_start_index_from_shapes", "MSDeformAttn", "build_model", "load_released"]
