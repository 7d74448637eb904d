"""Deformable DETR: backbone -> input projections -> deformable transformer -> class and box heads.

The model predicts, for each of ``Lq`` queries and every decoder layer, ``num_classes`` logits
(sigmoid / focal loss, no "no-object" class: a query that matches nothing is trained to say
"no" to every class) and a box ``(cx, cy, w, h)`` normalised to the unpadded image. Boxes
are predicted *relative to the query's reference point* in inverse-sigmoid space
(:func:`~.heads.box_from_reference`)::

    box = sigmoid(MLP(h) + [inverse_sigmoid(ref_xy), 0, 0])     (2-d reference)
    box = sigmoid(MLP(h) + inverse_sigmoid(ref_box))            (4-d reference: refinement, two-stage)

Without refinement the heads are shared by all decoder layers; with iterative refinement
each layer has its own (and two-stage adds one more pair for the encoder proposals).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .backbone import check_images, downsample_mask
from .heads import INITIAL_SIZE_LOGIT, MLP, box_from_reference, focal_bias_prior, predictions
from .position_encoding import PositionEmbeddingSine
from .transformer import DeformableTransformer

GROUP_NORM_GROUPS = 32  # GroupNorm(32) after every input projection, as in the paper


class InputProjection(nn.ModuleList):
    """Project backbone maps to ``d_model`` channels (1x1 conv + GroupNorm(32)) and add the
    extra coarser levels (3x3 stride-2 conv + GroupNorm(32)) the transformer asks for.

    With ``n_levels <= len(in_channels)`` the last ``n_levels`` backbone maps are used
    (``n_levels=1`` is the paper's single-scale model on C5). With more, the first extra
    level convolves C5 (stride 64) and every further one the level before it.
    """

    def __init__(self, in_channels: Sequence[int], d_model: int, n_levels: int):
        groups = math.gcd(GROUP_NORM_GROUPS, d_model)  # 32 for the paper's d_model=256
        n_backbone = min(n_levels, len(in_channels))
        used = list(in_channels)[len(in_channels) - n_backbone:]
        layers = [nn.Sequential(nn.Conv2d(c, d_model, 1), nn.GroupNorm(groups, d_model)) for c in used]
        c = in_channels[-1]
        for _ in range(n_levels - n_backbone):
            layers.append(nn.Sequential(nn.Conv2d(c, d_model, 3, stride=2, padding=1), nn.GroupNorm(groups, d_model)))
            c = d_model
        super().__init__(layers)
        self.n_backbone = n_backbone
        for proj in self:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)

    def forward(self, features: List[torch.Tensor], masks: List[torch.Tensor],
                image_mask: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """features/masks from the backbone, image_mask (N, H, W). Returns n_levels maps and masks."""
        features, masks = features[len(features) - self.n_backbone:], masks[len(masks) - self.n_backbone:]
        srcs = [proj(f) for proj, f in zip(self, features)]  # each (N, C, H_l, W_l)
        masks = list(masks)
        for i in range(self.n_backbone, len(self)):
            src = self[i](features[-1] if i == self.n_backbone else srcs[-1])  # (N, C, H_l, W_l)
            srcs.append(src)
            masks.append(downsample_mask(image_mask, src.shape[-2:]))  # (N, H_l, W_l)
        return srcs, masks


class DeformableDETR(nn.Module):
    """The detector. ``forward(images, mask)`` -> dict of predictions (see :meth:`forward`).

    Args:
        backbone: a module with the interface of :mod:`ddetr_minimal.models.backbone`.
        transformer: a :class:`DeformableTransformer`.
        num_classes: object classes (no background class; sigmoid outputs).
        num_queries: object queries Lq (and two-stage proposals).
        aux_loss: also return the predictions of every earlier decoder layer.
        with_box_refine: iterative bounding-box refinement (one head per decoder layer).
        two_stage: queries from the top-Q encoder proposals (needs ``transformer.two_stage``).
    """

    def __init__(self, backbone: nn.Module, transformer: DeformableTransformer, num_classes: int,
                 num_queries: int = 300, aux_loss: bool = True, with_box_refine: bool = False,
                 two_stage: bool = False):
        super().__init__()
        if two_stage != transformer.two_stage:
            raise ValueError(f"two_stage={two_stage} but the transformer was built with two_stage={transformer.two_stage}")
        d = transformer.d_model
        self.num_classes, self.num_queries = num_classes, num_queries
        self.aux_loss, self.with_box_refine, self.two_stage = aux_loss, with_box_refine, two_stage
        self.num_decoder_layers = len(transformer.decoder.layers)
        self.backbone = backbone
        self.position_embedding = PositionEmbeddingSine(d // 2, normalize=True, offset=-0.5)
        self.input_proj = InputProjection(backbone.num_channels, d, transformer.n_levels)
        self.transformer = transformer
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, 2 * d)  # (query_pos, tgt) of every query
        # one (class, box) head pair shared by all layers, or one per decoder layer (+1 for the proposals)
        num_head_pairs = self.num_decoder_layers + int(two_stage) if with_box_refine else 1
        self.class_embed = nn.ModuleList(nn.Linear(d, num_classes) for _ in range(num_head_pairs))
        self.bbox_embed = nn.ModuleList(MLP(d, d, 4, 3) for _ in range(num_head_pairs))
        self.reset_head_parameters()

    @torch.no_grad()
    def reset_head_parameters(self) -> None:
        """Class bias at the focal prior; box heads start at "no change" from the reference,
        and, for 2-d references, at width and height sigmoid(INITIAL_SIZE_LOGIT) ~ 0.12 of the image."""
        for head in self.class_embed:
            nn.init.constant_(head.bias, focal_bias_prior())
        for head in self.bbox_embed:
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)
        if not self.two_stage:
            # only the first layer's head sees a 2-d reference when refining
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], INITIAL_SIZE_LOGIT)

    def head(self, i: int) -> Tuple[nn.Module, nn.Module]:
        """(class head, box head) of decoder layer ``i``; ``i = num_decoder_layers`` is the proposal head."""
        j = i if self.with_box_refine else 0
        return self.class_embed[j], self.bbox_embed[j]

    def forward(self, images: torch.Tensor, mask: Optional[torch.Tensor] = None,
                return_internals: bool = False) -> Dict[str, object]:
        """images (N, 3, H, W), mask (N, H, W) bool with True at padding (None: no padding).

        Returns ``pred_logits`` (N, Lq, num_classes), ``pred_boxes`` (N, Lq, 4) as normalised
        (cx, cy, w, h), ``aux_outputs`` (one such dict per earlier decoder layer, when
        ``aux_loss``), and in two-stage ``enc_outputs`` (the proposals' logits and boxes).
        ``return_internals`` adds ``internals``: the :class:`~.transformer.TransformerOutput`.
        """
        if mask is None and isinstance(images, torch.Tensor) and images.dim() == 4:
            mask = torch.zeros(images.shape[0], *images.shape[2:], dtype=torch.bool, device=images.device)
        check_images(images, mask)
        features, masks = self.backbone(images, mask)
        srcs, masks = self.input_proj(features, masks, mask)  # n_levels maps (N, C, H_l, W_l)
        pos = [self.position_embedding(m).to(s.dtype) for s, m in zip(srcs, masks)]  # each (N, C, H_l, W_l)
        layers = range(self.num_decoder_layers)
        tr = self.transformer(
            srcs, masks, pos,
            query_embed=None if self.two_stage else self.query_embed.weight,
            box_heads=[self.head(i)[1] for i in layers] if self.with_box_refine else None,
            enc_heads=self.head(self.num_decoder_layers) if self.two_stage else None,
        )
        logits = [self.head(i)[0](tr.states[i]) for i in layers]  # each (N, Lq, num_classes)
        boxes = [box_from_reference(self.head(i)[1](tr.states[i]), tr.references[i]) for i in layers]  # (N, Lq, 4)
        out = predictions(logits, boxes, self.aux_loss)
        if self.two_stage:
            out["enc_outputs"] = {"pred_logits": tr.enc_logits, "pred_boxes": tr.enc_boxes_unact.sigmoid()}
        if return_internals:
            out["internals"] = tr
        return out
