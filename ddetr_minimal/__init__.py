"""ddetr_minimal: a small, readable Deformable DETR (Zhu et al., ICLR 2021).

One concept per module; the book's chapters import them. See the README for the map.
"""
from .attention import (
    MultiHeadAttention,
    attention_flops,
    attention_memory,
    deformable_attention_flops,
    deformable_attention_memory,
    scaled_dot_product_attention,
)
from .backbone import ResNetBackbone, SmallBackbone, build_backbone
from .build import build_model
from .criterion import SetCriterion
from .deformable_attention import MSDeformAttn
from .deformable_detr import DeformableDETR
from .detr import DETR
from .matcher import HungarianMatcher
from .position_encoding import PositionEmbeddingSine
from .postprocess import PostProcess, to_coco_detections
from .pretrained import RELEASES, load_released
from .msda import BACKENDS, check_inputs, level_start_index_from_shapes, ms_deform_attn

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "DETR",
    "DeformableDETR",
    "HungarianMatcher",
    "PositionEmbeddingSine",
    "PostProcess",
    "RELEASES",
    "ResNetBackbone",
    "SetCriterion",
    "SmallBackbone",
    "build_backbone",
    "build_model",
    "load_released",
    "to_coco_detections",
    "MSDeformAttn",
    "MultiHeadAttention",
    "attention_flops",
    "attention_memory",
    "check_inputs",
    "deformable_attention_flops",
    "deformable_attention_memory",
    "level_start_index_from_shapes",
    "ms_deform_attn",
    "scaled_dot_product_attention",
]
