"""One factory for both detectors: ``build_model(...) -> (model, criterion, postprocessor)``.

Every size is a keyword argument, so the same call builds the paper's model
(ResNet-50, d=256, 6+6 layers, 300 queries) and a toy one that trains on a CPU, e.g.::

    build_model("deformable", num_classes=3, backbone="small", d_model=64, enc_layers=2,
                dec_layers=2, dim_feedforward=128, num_queries=50)
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

from torch import nn

from ..ops.checks import check_positive_ints
from .backbone import build_backbone
from .criterion import SetCriterion
from .deformable_detr import DeformableDETR
from .detr import DETR, DETRTransformer
from .matcher import HungarianMatcher
from .postprocess import PostProcess
from .transformer import DeformableTransformer

MODELS = ("deformable", "detr")


def build_model(model: str = "deformable", *, num_classes: int, backbone: str = "resnet50",
                pretrained_backbone: bool = False, train_backbone: bool = True, with_box_refine: bool = False,
                two_stage: bool = False, d_model: int = 256, n_heads: int = 8, enc_layers: int = 6,
                dec_layers: int = 6, dim_feedforward: Optional[int] = None, dropout: float = 0.1,
                num_queries: Optional[int] = None, n_levels: int = 4, n_points: int = 4, aux_loss: bool = True,
                detr_focal: bool = False, backend: str = "auto", small_channels: Sequence[int] = (32, 64, 128),
                cost_class: Optional[float] = None, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                loss_ce: Optional[float] = None, loss_bbox: float = 5.0, loss_giou: float = 2.0,
                eos_coef: float = 0.1, focal_alpha: float = 0.25, num_select: int = 100
                ) -> Tuple[nn.Module, SetCriterion, PostProcess]:
    """Build a detector with its matching criterion and post-processor.

    Args:
        model: "deformable" (Deformable DETR) or "detr" (the DETR baseline).
        num_classes: object classes (contiguous labels 0..num_classes-1; 91 for COCO's category ids).
        backbone: "resnet50" (frozen-BN ResNet-50) or "small" (a small CNN for toy data).
        pretrained_backbone: load ImageNet weights into the ResNet (needs the network).
        train_backbone: train ResNet stages 2-4 (False freezes the whole backbone).
        with_box_refine, two_stage: the paper's two Deformable DETR variants.
        d_model, n_heads, enc_layers, dec_layers, dropout: transformer sizes.
        dim_feedforward: FFN width; None gives 1024 (Deformable DETR) or 2048 (DETR).
        num_queries: None gives 300 (Deformable DETR, DETR+) or 100 (DETR).
        n_levels, n_points: feature levels and sampling points (Deformable DETR).
        aux_loss: supervise every decoder layer.
        detr_focal: "DETR+": focal loss, sigmoid outputs, 300 queries by default.
        backend: multi-scale deformable attention backend ("auto", "torch", "loop", "cupy").
        small_channels: channels of the small backbone at strides 8, 16, 32.
        cost_class, cost_bbox, cost_giou: matcher weights (class: 2 focal, 1 softmax by default).
        loss_ce, loss_bbox, loss_giou: loss weights (ce: 2 focal, 1 softmax by default).
        eos_coef: no-object weight of DETR's cross-entropy.
        focal_alpha: focal-loss alpha (loss and matcher).
        num_select: detections kept per image by the post-processor (sigmoid models).
    """
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    check_positive_ints(num_classes=num_classes, d_model=d_model, n_heads=n_heads, enc_layers=enc_layers,
              dec_layers=dec_layers, n_levels=n_levels, n_points=n_points)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    deformable = model == "deformable"
    if not deformable and (with_box_refine or two_stage):
        raise ValueError("with_box_refine and two_stage are options of model='deformable', not of 'detr'")
    if deformable and detr_focal:
        raise ValueError("detr_focal switches the DETR baseline to focal loss; model='deformable' always uses it")
    focal = deformable or detr_focal
    if dim_feedforward is None:
        dim_feedforward = 1024 if deformable else 2048
    if num_queries is None:
        num_queries = 300 if focal else 100
    check_positive_ints(dim_feedforward=dim_feedforward, num_queries=num_queries)

    net = build_backbone(backbone, pretrained_backbone, train_backbone, small_channels)

    if deformable:
        transformer = DeformableTransformer(d_model, n_heads, enc_layers, dec_layers, dim_feedforward, dropout,
                                            n_levels, n_points, two_stage=two_stage, num_queries=num_queries,
                                            backend=backend)
        net = DeformableDETR(net, transformer, num_classes, num_queries, aux_loss=aux_loss,
                             with_box_refine=with_box_refine, two_stage=two_stage)
    else:
        transformer = DETRTransformer(d_model, n_heads, enc_layers, dec_layers, dim_feedforward, dropout)
        net = DETR(net, transformer, num_classes, num_queries, aux_loss=aux_loss, focal=detr_focal)

    default_class = 2.0 if focal else 1.0
    matcher = HungarianMatcher(default_class if cost_class is None else cost_class, cost_bbox, cost_giou,
                               focal=focal, focal_alpha=focal_alpha)
    weights = {"loss_ce": default_class if loss_ce is None else loss_ce, "loss_bbox": loss_bbox,
               "loss_giou": loss_giou}
    criterion = SetCriterion(num_classes, matcher, weights, focal=focal, eos_coef=eos_coef, focal_alpha=focal_alpha,
                             aux_layers=dec_layers - 1 if aux_loss else 0, two_stage=two_stage)
    return net, criterion, PostProcess(num_select=num_select, focal=focal)
