"""The DETR baseline (Carion et al., 2020): one stride-32 map, a vanilla transformer, 100 queries.

The point of having it here is the side-by-side comparison of the paper. Everything except
the attention is shared with Deformable DETR: backbone, sine positions, box MLP, matcher,
losses, post-processing. The encoder's self-attention over all ``HW`` tokens costs
``O(H^2 W^2 C)``, which is why DETR only looks at the coarsest map.

DETR classifies with a softmax over ``num_classes + 1`` classes, the last being "no object", and
down-weights that class by 0.1 in the cross-entropy. The paper's fairer "DETR+" baseline
(``focal=True``) uses sigmoid outputs with focal loss and 300 queries, like Deformable DETR.
"""
from __future__ import annotations

import copy
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .attention import MultiHeadAttention
from .backbone import check_images
from .heads import MLP, focal_bias_prior, predictions
from .position_encoding import PositionEmbeddingSine


class EncoderLayer(nn.Module):
    """Self-attention over all pixels, then an FFN; post-norm."""

    def __init__(self, d_model=256, n_heads=8, d_ffn=2048, dropout=0.1):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, n_heads, dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1, self.linear2 = nn.Linear(d_model, d_ffn), nn.Linear(d_ffn, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src, pos, padding_mask):
        """src, pos (N, S, C); padding_mask (N, S) bool. Returns (N, S, C)."""
        q = k = src + pos
        attn, _ = self.self_attn(q, k, src, key_padding_mask=padding_mask)  # (N, S, C)
        src = self.norm1(src + self.dropout(attn))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout(ffn))


class DecoderLayer(nn.Module):
    """Self-attention among queries, cross-attention to every pixel, FFN; post-norm."""

    def __init__(self, d_model=256, n_heads=8, d_ffn=2048, dropout=0.1):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, n_heads, dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MultiHeadAttention(d_model, n_heads, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1, self.linear2 = nn.Linear(d_model, d_ffn), nn.Linear(d_ffn, d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt, query_pos, memory, pos, padding_mask):
        """tgt, query_pos (N, Lq, C); memory, pos (N, S, C); padding_mask (N, S). Returns (N, Lq, C)."""
        q = k = tgt + query_pos
        attn, _ = self.self_attn(q, k, tgt)  # (N, Lq, C)
        tgt = self.norm1(tgt + self.dropout(attn))
        attn, _ = self.cross_attn(tgt + query_pos, memory + pos, memory, key_padding_mask=padding_mask)  # (N, Lq, C)
        tgt = self.norm2(tgt + self.dropout(attn))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout(ffn))


class DETRTransformer(nn.Module):
    """DETR's encoder-decoder. The decoder starts from zeros; queries enter as ``query_pos``
    at every layer, and a final LayerNorm is applied to every layer's output."""

    def __init__(self, d_model=256, n_heads=8, enc_layers=6, dec_layers=6, dim_feedforward=2048, dropout=0.1):
        super().__init__()
        self.d_model = d_model
        enc = EncoderLayer(d_model, n_heads, dim_feedforward, dropout)
        dec = DecoderLayer(d_model, n_heads, dim_feedforward, dropout)
        self.encoder_layers = nn.ModuleList(copy.deepcopy(enc) for _ in range(enc_layers))
        self.decoder_layers = nn.ModuleList(copy.deepcopy(dec) for _ in range(dec_layers))
        self.decoder_norm = nn.LayerNorm(d_model)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src, mask, query_embed, pos):
        """src, pos (N, C, H, W); mask (N, H, W); query_embed (Lq, C). Returns hs (num_decoder_layers, N, Lq, C)."""
        N = src.shape[0]
        src = src.flatten(2).transpose(1, 2)  # (N, HW, C)
        pos = pos.flatten(2).transpose(1, 2)  # (N, HW, C)
        mask = mask.flatten(1)  # (N, HW)
        for layer in self.encoder_layers:
            src = layer(src, pos, mask)
        query_pos = query_embed[None].expand(N, -1, -1)  # (N, Lq, C)
        tgt = torch.zeros_like(query_pos)  # (N, Lq, C)
        hs = []
        for layer in self.decoder_layers:
            tgt = layer(tgt, query_pos, src, pos, mask)
            hs.append(self.decoder_norm(tgt))
        return torch.stack(hs)  # (num_decoder_layers, N, Lq, C)


class DETR(nn.Module):
    """DETR on the last (stride-32) backbone map.

    Args:
        backbone: a module with the interface of :mod:`ddetr_minimal.models.backbone`.
        transformer: a :class:`DETRTransformer`.
        num_classes: object classes. Softmax models output num_classes + 1 logits (last = no object).
        num_queries: object queries (100 in DETR, 300 in DETR+).
        aux_loss: also return every earlier decoder layer's predictions.
        focal: sigmoid outputs for focal loss (DETR+), num_classes logits with the prior bias.
    """

    def __init__(self, backbone: nn.Module, transformer: DETRTransformer, num_classes: int, num_queries: int = 100,
                 aux_loss: bool = True, focal: bool = False):
        super().__init__()
        d = transformer.d_model
        self.num_classes, self.num_queries, self.aux_loss, self.focal = num_classes, num_queries, aux_loss, focal
        self.backbone = backbone
        self.position_embedding = PositionEmbeddingSine(d // 2, normalize=True, offset=0.0)
        self.input_proj = nn.Conv2d(backbone.num_channels[-1], d, kernel_size=1)
        self.transformer = transformer
        self.query_embed = nn.Embedding(num_queries, d)
        self.class_embed = nn.Linear(d, num_classes if focal else num_classes + 1)
        self.bbox_embed = MLP(d, d, 4, 3)
        if focal:
            with torch.no_grad():
                nn.init.constant_(self.class_embed.bias, focal_bias_prior())

    def forward(self, images: torch.Tensor, mask: Optional[torch.Tensor] = None) -> Dict[str, object]:
        """images (N, 3, H, W), mask (N, H, W) bool (True = padding; None = no padding).

        Returns ``pred_logits`` (N, Lq, num_classes + 1), or (N, Lq, num_classes) with ``focal``, ``pred_boxes``
        (N, Lq, 4) normalised (cx, cy, w, h), and ``aux_outputs`` for earlier decoder layers.
        """
        if mask is None and isinstance(images, torch.Tensor) and images.dim() == 4:
            mask = torch.zeros(images.shape[0], *images.shape[2:], dtype=torch.bool, device=images.device)
        check_images(images, mask)
        features, masks = self.backbone(images, mask)
        src, m = features[-1], masks[-1]  # (N, C5, H/32, W/32), (N, H/32, W/32)
        pos = self.position_embedding(m).to(src.dtype)  # (N, C, H/32, W/32)
        hs = self.transformer(self.input_proj(src), m, self.query_embed.weight, pos)  # (num_decoder_layers, N, Lq, C)
        logits = self.class_embed(hs)  # (num_decoder_layers, N, Lq, num_classes[+1])
        boxes = self.bbox_embed(hs).sigmoid()  # (num_decoder_layers, N, Lq, 4)
        return predictions(logits, boxes, self.aux_loss)
