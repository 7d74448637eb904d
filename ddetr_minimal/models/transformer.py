"""The deformable transformer: encoder, decoder, reference points, box refinement, two-stage.

Encoder (paper Sec. 4.1). The input projections of all levels are flattened into one
sequence of ``S = sum_l H_l W_l`` tokens. Every token is a query *and* a value: it attends,
with multi-scale deformable attention, to ``P`` points per head and level around its own pixel
centre, its *reference point*. Reference points are normalised by the *valid* (unpadded)
part of each map, so that ``(0.5, 0.5)`` is the centre of the image and not of the padded
batch tensor.

Decoder. ``Lq`` object queries each carry a content vector ``tgt`` and a positional
``query_pos``; a linear layer + sigmoid turns ``query_pos`` into the query's reference point
(a 2-d point, the initial guess of the box centre). Every layer does self-attention among
the queries (vanilla multi-head attention), then deformable cross-attention into the encoder
memory around the reference point, then an FFN; all post-norm as in DETR.

Two options of the paper (Sec. 4.2):

* **iterative bounding-box refinement** -- each decoder layer's box head refines the
  previous layer's box (in inverse-sigmoid space) and the refined box, detached, becomes the
  next layer's 4-d reference (cross-attention then samples relative to the box size);
* **two-stage** -- the encoder output itself predicts a box at every pixel (relative to a
  pixel-centred proposal of size ``0.05 * 2^l``, :mod:`.two_stage`); the top-scoring ``Lq`` become the decoder's
  initial reference boxes and, through a sine embedding, its queries.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .attention import MultiHeadAttention
from .deformable_attention import MSDeformAttn
from ..ops.checks import level_start_index_from_shapes
from .heads import box_from_reference
from .position_encoding import sine_embed_boxes
from .two_stage import encoder_proposals, select_proposals


@dataclass
class Memory:
    """The encoder's output and the layout of its tokens."""

    tokens: torch.Tensor  # (N, S, C) one token per pixel of every level
    spatial_shapes: torch.Tensor  # (L, 2) as (H_l, W_l)
    level_start_index: torch.Tensor  # (L,)
    padding_mask: torch.Tensor  # (N, S) bool, True at padding
    valid_ratios: torch.Tensor  # (N, L, 2) unpadded fraction of each level, as (w, h)


@dataclass
class TransformerOutput:
    """What :class:`DeformableTransformer` returns."""

    states: torch.Tensor  # (num_decoder_layers, N, Lq, C) every decoder layer's output
    references: List[torch.Tensor]  # per decoder layer, (N, Lq, 2|4): what its boxes are relative to
    memory: Memory
    enc_logits: Optional[torch.Tensor] = None  # two-stage: (N, S, num_classes) proposal scores
    enc_boxes_unact: Optional[torch.Tensor] = None  # two-stage: (N, S, 4) proposals, inverse-sigmoid


def valid_ratios(mask: torch.Tensor) -> torch.Tensor:
    """Fraction of each map that is not padding: mask (N, H, W) -> (N, 2) as (w, h)."""
    _, H, W = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).float() / H  # (N,)
    valid_w = (~mask[:, 0, :]).sum(1).float() / W  # (N,)
    return torch.stack([valid_w, valid_h], -1)  # (N, 2)


def encoder_reference_points(spatial_shapes: torch.Tensor, ratios: torch.Tensor) -> torch.Tensor:
    """Pixel centres of every level, normalised by the valid size of the level.

    spatial_shapes (L, 2) as (H_l, W_l); ratios (N, L, 2) from :func:`valid_ratios`.
    Returns (N, S, L, 2): the point of each token, expressed in every level's coordinates.
    """
    points = []
    for lvl, (H, W) in enumerate(spatial_shapes.tolist()):
        ys = (torch.arange(H, dtype=torch.float32, device=ratios.device) + 0.5)  # (H,)
        xs = (torch.arange(W, dtype=torch.float32, device=ratios.device) + 0.5)  # (W,)
        y, x = torch.meshgrid(ys, xs, indexing="ij")  # (H, W) each
        y = y.reshape(1, -1) / (ratios[:, None, lvl, 1] * H)  # (N, H*W) in [0, 1] over the valid part
        x = x.reshape(1, -1) / (ratios[:, None, lvl, 0] * W)  # (N, H*W)
        points.append(torch.stack((x, y), -1))  # (N, H*W, 2)
    ref = torch.cat(points, 1)  # (N, S, 2)
    return ref[:, :, None] * ratios[:, None]  # (N, S, L, 2): same point, each level's valid frame


def _ffn(d_model: int, d_ffn: int) -> Tuple[nn.Linear, nn.Linear]:
    return nn.Linear(d_model, d_ffn), nn.Linear(d_ffn, d_model)


def _ffn_block(layer: nn.Module, x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """The feed-forward sub-layer of ``layer``, with its residual and post-norm."""
    ffn = layer.linear2(layer.dropout(F.relu(layer.linear1(x))))
    return norm(x + layer.dropout(ffn))


class LayerStack(nn.Module):
    """``num_layers`` independent copies of ``layer``, run in turn by the subclass's forward."""

    def __init__(self, layer: nn.Module, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))


class DeformableEncoderLayer(nn.Module):
    """Deformable self-attention over all levels, then an FFN (post-norm)."""

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, n_levels=4, n_heads=8, n_points=4, backend="auto"):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, backend=backend)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1, self.linear2 = _ffn(d_model, d_ffn)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask):
        """src, pos (N, S, C); reference_points (N, S, L, 2); padding_mask (N, S). Returns (N, S, C)."""
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout(attn))
        return _ffn_block(self, src, self.norm2)


class DeformableEncoder(LayerStack):
    """A stack of :class:`DeformableEncoderLayer`; every token's reference is its own pixel."""

    def forward(self, src, pos, spatial_shapes, level_start_index, ratios, padding_mask):
        """src, pos (N, S, C); ratios (N, L, 2); padding_mask (N, S). Returns the memory (N, S, C)."""
        reference_points = encoder_reference_points(spatial_shapes, ratios)  # (N, S, L, 2)
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return src


class DeformableDecoderLayer(nn.Module):
    """Self-attention among queries, deformable cross-attention into the memory, FFN (post-norm)."""

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, n_levels=4, n_heads=8, n_points=4, backend="auto"):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, n_heads, dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, backend=backend)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1, self.linear2 = _ffn(d_model, d_ffn)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt, query_pos, reference_points, memory, spatial_shapes, level_start_index, padding_mask):
        """tgt, query_pos (N, Lq, C); reference_points (N, Lq, L, 2|4); memory (N, S, C). Returns (N, Lq, C)."""
        q = k = tgt + query_pos
        attn, _ = self.self_attn(q, k, tgt)  # (N, Lq, C)
        tgt = self.norm1(tgt + self.dropout(attn))
        attn = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index,
                               padding_mask)  # (N, Lq, C)
        tgt = self.norm2(tgt + self.dropout(attn))
        return _ffn_block(self, tgt, self.norm3)


class DeformableDecoder(LayerStack):
    """A stack of :class:`DeformableDecoderLayer` with optional iterative box refinement."""

    def forward(self, tgt, query_pos, reference_points, memory, spatial_shapes, level_start_index, ratios,
                padding_mask, box_heads: Optional[Sequence[nn.Module]] = None):
        """Run every layer; returns the states (num_layers, N, Lq, C) and the references, one
        (N, Lq, 2|4) per layer.

        ``references[i]`` is the reference (normalised to the valid image) that layer ``i``
        attended around, and the one its box prediction is relative to. With ``box_heads``
        (one per layer) each layer refines it with :func:`~.heads.box_from_reference`, detached
        so that each layer's box head is trained on its own step only.
        """
        states, references = [], []
        for i, layer in enumerate(self.layers):
            references.append(reference_points)
            scale = ratios if reference_points.shape[-1] == 2 else torch.cat([ratios, ratios], -1)  # (N, L, 2|4)
            ref_input = reference_points[:, :, None] * scale[:, None]  # (N, Lq, L, 2|4) in each level's frame
            tgt = layer(tgt, query_pos, ref_input, memory, spatial_shapes, level_start_index, padding_mask)
            states.append(tgt)
            if box_heads is not None:
                reference_points = box_from_reference(box_heads[i](tgt), reference_points).detach()  # (N, Lq, 4)
        # with refinement from a 2-d start, the first reference is a point and the others boxes
        return torch.stack(states), references  # (num_layers, N, Lq, C), num_layers x (N, Lq, 2|4)


class DeformableTransformer(nn.Module):
    """Deformable encoder + decoder, level embeddings, query reference points, two-stage proposals.

    Args:
        d_model, n_heads, enc_layers, dec_layers, dim_feedforward, dropout: transformer sizes.
        n_levels, n_points: feature levels L and sampling points P per head and level.
        two_stage: generate queries from encoder proposals instead of learned embeddings.
        num_queries: number of proposals kept in two-stage mode.
        backend: op backend of every :class:`MSDeformAttn`.
    """

    def __init__(self, d_model=256, n_heads=8, enc_layers=6, dec_layers=6, dim_feedforward=1024, dropout=0.1,
                 n_levels=4, n_points=4, two_stage=False, num_queries=300, backend="auto"):
        super().__init__()
        self.d_model, self.n_levels, self.two_stage, self.num_queries = d_model, n_levels, two_stage, num_queries
        self.encoder = DeformableEncoder(
            DeformableEncoderLayer(d_model, dim_feedforward, dropout, n_levels, n_heads, n_points, backend), enc_layers)
        self.decoder = DeformableDecoder(
            DeformableDecoderLayer(d_model, dim_feedforward, dropout, n_levels, n_heads, n_points, backend), dec_layers)
        self.level_embed = nn.Parameter(torch.empty(n_levels, d_model))  # e_l of the paper
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(2 * d_model, 2 * d_model)
            self.pos_trans_norm = nn.LayerNorm(2 * d_model)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Xavier for every matrix, the paper's init for deformable attention, N(0, 1) level embeddings."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        if not self.two_stage:
            nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)

    def flatten(self, srcs, masks, pos_embeds):
        """Flatten the levels into one sequence and add the level embeddings.

        srcs, pos_embeds: lists of (N, C, H_l, W_l); masks: list of (N, H_l, W_l).
        Returns src (N, S, C), pos (N, S, C), mask (N, S), spatial_shapes (L, 2),
        level_start_index (L,), ratios (N, L, 2).
        """
        if not (len(srcs) == len(masks) == len(pos_embeds) == self.n_levels):
            raise ValueError(
                f"expected {self.n_levels} levels of srcs, masks and pos_embeds, "
                f"got {len(srcs)}, {len(masks)} and {len(pos_embeds)}")
        src_flat, pos_flat, mask_flat, shapes = [], [], [], []
        for lvl, (src, mask, pos) in enumerate(zip(srcs, masks, pos_embeds)):
            shapes.append(src.shape[-2:])
            src_flat.append(src.flatten(2).transpose(1, 2))  # (N, H*W, C)
            pos_flat.append(pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))  # (N, H*W, C)
            mask_flat.append(mask.flatten(1))  # (N, H*W)
        device = srcs[0].device
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=device)  # (L, 2)
        ratios = torch.stack([valid_ratios(m) for m in masks], 1)  # (N, L, 2)
        src = torch.cat(src_flat, 1)  # (N, S, C)
        pos = torch.cat(pos_flat, 1)  # (N, S, C)
        mask = torch.cat(mask_flat, 1)  # (N, S)
        return src, pos, mask, spatial_shapes, level_start_index_from_shapes(spatial_shapes), ratios

    def two_stage_queries(self, memory: Memory, enc_heads: Tuple[nn.Module, nn.Module]):
        """Score and refine one proposal per encoder token, keep the best ``num_queries``.

        Returns the decoder's (tgt, query_pos, reference boxes), each (N, Lq, C|C|4), and the
        proposals' logits (N, S, num_classes) and boxes (N, S, 4, inverse-sigmoid) for the loss.
        """
        C = memory.tokens.shape[-1]
        proposals, valid = encoder_proposals(memory.padding_mask, memory.spatial_shapes)  # (N, S, 4), (N, S)
        tokens = self.enc_output_norm(self.enc_output(memory.tokens.masked_fill(~valid[..., None], 0.0)))
        enc_logits = enc_heads[0](tokens)  # (N, S, num_classes)
        enc_boxes_unact = enc_heads[1](tokens) + proposals  # (N, S, 4)
        # rank by the first class's logit: the proposals are trained class-agnostically, as label 0
        top_boxes = select_proposals(enc_logits[..., 0], enc_boxes_unact, valid, self.num_queries)  # (N, Lq, 4)
        query = self.pos_trans_norm(self.pos_trans(sine_embed_boxes(top_boxes, C)))  # (N, Lq, 2C)
        query_pos, tgt = torch.split(query, C, dim=2)  # (N, Lq, C) each
        return tgt, query_pos, top_boxes.sigmoid(), enc_logits, enc_boxes_unact

    def learned_queries(self, query_embed: torch.Tensor, batch: int):
        """Learned queries (Lq, 2C), split into content and position; each position predicts
        the query's 2-d reference point. Returns tgt, query_pos (N, Lq, C) and points (N, Lq, 2)."""
        C = query_embed.shape[1] // 2
        query_pos, tgt = torch.split(query_embed, C, dim=1)  # (Lq, C) each
        query_pos = query_pos[None].expand(batch, -1, -1)  # (N, Lq, C)
        tgt = tgt[None].expand(batch, -1, -1)  # (N, Lq, C)
        return tgt, query_pos, self.reference_points(query_pos).sigmoid()  # ..., (N, Lq, 2)

    def forward(self, srcs: List[torch.Tensor], masks: List[torch.Tensor], pos_embeds: List[torch.Tensor],
                query_embed: Optional[torch.Tensor] = None, box_heads: Optional[Sequence[nn.Module]] = None,
                enc_heads: Optional[Tuple[nn.Module, nn.Module]] = None) -> TransformerOutput:
        """Encode the levels and decode the queries.

        query_embed: (Lq, 2C) learned queries, split into (query_pos, tgt); ignored in two-stage.
        box_heads: one box MLP per decoder layer for iterative refinement, or None.
        enc_heads: (class_head, box_head) predicting proposals from the memory (two-stage).
        """
        src, pos, mask, spatial_shapes, level_start_index, ratios = self.flatten(srcs, masks, pos_embeds)
        tokens = self.encoder(src, pos, spatial_shapes, level_start_index, ratios, mask)  # (N, S, C)
        memory = Memory(tokens, spatial_shapes, level_start_index, mask, ratios)
        enc_logits = enc_boxes_unact = None
        if self.two_stage:
            if enc_heads is None:
                raise ValueError("two_stage=True needs enc_heads=(class_head, box_head) for the encoder proposals")
            tgt, query_pos, reference_points, enc_logits, enc_boxes_unact = self.two_stage_queries(memory, enc_heads)
        else:
            if query_embed is None:
                raise ValueError("query_embed of shape (Lq, 2*d_model) is needed unless two_stage=True")
            tgt, query_pos, reference_points = self.learned_queries(query_embed, tokens.shape[0])
        states, references = self.decoder(tgt, query_pos, reference_points, tokens, spatial_shapes,
                                          level_start_index, ratios, mask, box_heads=box_heads)
        return TransformerOutput(states, references, memory, enc_logits, enc_boxes_unact)
