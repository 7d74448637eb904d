"""The deformable transformer: encoder, decoder, reference points, box refinement, two-stage.

Encoder (paper Sec. 4.1). The input projections of all levels are flattened into one
sequence of ``S = sum_l H_l W_l`` tokens. Every token is a query *and* a value: it attends,
with multi-scale deformable attention, to ``K`` points per level around its own pixel
centre, its *reference point*. Reference points are normalised by the *valid* (unpadded)
part of each map, so that ``(0.5, 0.5)`` is the centre of the image and not of the padded
batch tensor.

Decoder. ``N`` object queries each carry a content vector ``tgt`` and a positional
``query_pos``; a linear layer + sigmoid turns ``query_pos`` into the query's reference point
(a 2-d point, the initial guess of the box centre). Every layer does self-attention among
the queries (vanilla multi-head attention), then deformable cross-attention into the encoder
memory around the reference point, then an FFN; all post-norm as in DETR.

Two options of the paper (Sec. 4.2):

* **iterative bounding-box refinement** -- each decoder layer's box head refines the
  previous layer's box (in inverse-sigmoid space) and the refined box, detached, becomes the
  next layer's 4-d reference (cross-attention then samples relative to the box size);
* **two-stage** -- the encoder output itself predicts a box at every pixel (relative to a
  pixel-centred proposal of size ``0.05 * 2^l``); the top-scoring ``N`` become the decoder's
  initial reference boxes and, through a sine embedding, its queries.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .attention import MultiHeadAttention
from .deformable_attention import MSDeformAttn
from ..ops.checks import level_start_index_from_shapes
from .position_encoding import sine_embed_boxes


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """log(x / (1 - x)), clamped so that 0 and 1 stay finite."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def valid_ratios(mask: torch.Tensor) -> torch.Tensor:
    """Fraction of each map that is not padding: mask (B, H, W) -> (B, 2) as (w, h)."""
    _, H, W = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).float() / H  # (B,)
    valid_w = (~mask[:, 0, :]).sum(1).float() / W  # (B,)
    return torch.stack([valid_w, valid_h], -1)  # (B, 2)


def encoder_reference_points(spatial_shapes: torch.Tensor, ratios: torch.Tensor) -> torch.Tensor:
    """Pixel centres of every level, normalised by the valid size of the level.

    spatial_shapes (L, 2) as (H, W); ratios (B, L, 2) from :func:`valid_ratios`.
    Returns (B, S, L, 2): the point of each token, expressed in every level's coordinates.
    """
    points = []
    for lvl, (H, W) in enumerate(spatial_shapes.tolist()):
        ys = (torch.arange(H, dtype=torch.float32, device=ratios.device) + 0.5)  # (H,)
        xs = (torch.arange(W, dtype=torch.float32, device=ratios.device) + 0.5)  # (W,)
        y, x = torch.meshgrid(ys, xs, indexing="ij")  # (H, W) each
        y = y.reshape(1, -1) / (ratios[:, None, lvl, 1] * H)  # (B, H*W) in [0, 1] over the valid part
        x = x.reshape(1, -1) / (ratios[:, None, lvl, 0] * W)  # (B, H*W)
        points.append(torch.stack((x, y), -1))  # (B, H*W, 2)
    ref = torch.cat(points, 1)  # (B, S, 2)
    return ref[:, :, None] * ratios[:, None]  # (B, S, L, 2): same point, each level's valid frame


def _ffn(d_model: int, d_ffn: int) -> Tuple[nn.Linear, nn.Linear]:
    return nn.Linear(d_model, d_ffn), nn.Linear(d_ffn, d_model)


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
        """src, pos (B, S, C); reference_points (B, S, L, 2); padding_mask (B, S). Returns (B, S, C)."""
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout(attn))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout(ffn))


class DeformableEncoder(nn.Module):
    """A stack of :class:`DeformableEncoderLayer`; every token's reference is its own pixel."""

    def __init__(self, layer: DeformableEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    def forward(self, src, pos, spatial_shapes, level_start_index, ratios, padding_mask):
        """src, pos (B, S, C); ratios (B, L, 2); padding_mask (B, S). Returns the memory (B, S, C)."""
        reference_points = encoder_reference_points(spatial_shapes, ratios)  # (B, S, L, 2)
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
        """tgt, query_pos (B, Q, C); reference_points (B, Q, L, 2|4); memory (B, S, C). Returns (B, Q, C)."""
        q = k = tgt + query_pos
        attn, _ = self.self_attn(q, k, tgt)  # (B, Q, C)
        tgt = self.norm1(tgt + self.dropout(attn))
        attn = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index,
                               padding_mask)  # (B, Q, C)
        tgt = self.norm2(tgt + self.dropout(attn))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout(ffn))


class DeformableDecoder(nn.Module):
    """A stack of :class:`DeformableDecoderLayer` with optional iterative box refinement."""

    def __init__(self, layer: DeformableDecoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.num_layers = num_layers

    def forward(self, tgt, query_pos, reference_points, memory, spatial_shapes, level_start_index, ratios,
                padding_mask, box_heads: Optional[Sequence[nn.Module]] = None):
        """Run every layer; returns hs (D, B, Q, C) and ``references``, a list of D tensors (B, Q, 2|4).

        ``references[l]`` is the reference (normalised to the valid image) that layer ``l``
        attended around, and the one its box prediction is relative to. With ``box_heads``
        (one per layer) each layer refines it: ``ref <- sigmoid(head(out) + inverse_sigmoid(ref))``,
        detached so that each layer's box head is trained on its own step only.
        """
        hs, references = [], []
        for lid, layer in enumerate(self.layers):
            references.append(reference_points)
            if reference_points.shape[-1] == 4:
                scale = torch.cat([ratios, ratios], -1)  # (B, L, 4)
            else:
                scale = ratios  # (B, L, 2)
            ref_input = reference_points[:, :, None] * scale[:, None]  # (B, Q, L, 2|4) in each level's frame
            tgt = layer(tgt, query_pos, ref_input, memory, spatial_shapes, level_start_index, padding_mask)
            hs.append(tgt)
            if box_heads is not None:
                delta = box_heads[lid](tgt)  # (B, Q, 4)
                if reference_points.shape[-1] == 4:
                    new_ref = (delta + inverse_sigmoid(reference_points)).sigmoid()  # (B, Q, 4)
                else:
                    centre = (delta[..., :2] + inverse_sigmoid(reference_points)).sigmoid()  # (B, Q, 2)
                    new_ref = torch.cat([centre, delta[..., 2:].sigmoid()], -1)  # (B, Q, 4)
                reference_points = new_ref.detach()
        # with refinement from a 2-d start, the first reference is a point and the others boxes
        return torch.stack(hs), references  # (D, B, Q, C), D x (B, Q, 2|4)


class DeformableTransformer(nn.Module):
    """Deformable encoder + decoder, level embeddings, query reference points, two-stage proposals.

    Args:
        d_model, n_heads, enc_layers, dec_layers, dim_feedforward, dropout: transformer sizes.
        n_levels, n_points: feature levels L and sampling points K per head and level.
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

        srcs, pos_embeds: lists of (B, C, H_l, W_l); masks: list of (B, H_l, W_l).
        Returns src (B, S, C), pos (B, S, C), mask (B, S), spatial_shapes (L, 2),
        level_start_index (L,), ratios (B, L, 2).
        """
        if not (len(srcs) == len(masks) == len(pos_embeds) == self.n_levels):
            raise ValueError(
                f"expected {self.n_levels} levels of srcs, masks and pos_embeds, "
                f"got {len(srcs)}, {len(masks)} and {len(pos_embeds)}")
        src_flat, pos_flat, mask_flat, shapes = [], [], [], []
        for lvl, (src, mask, pos) in enumerate(zip(srcs, masks, pos_embeds)):
            shapes.append(src.shape[-2:])
            src_flat.append(src.flatten(2).transpose(1, 2))  # (B, H*W, C)
            pos_flat.append(pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))  # (B, H*W, C)
            mask_flat.append(mask.flatten(1))  # (B, H*W)
        device = srcs[0].device
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=device)  # (L, 2)
        ratios = torch.stack([valid_ratios(m) for m in masks], 1)  # (B, L, 2)
        src = torch.cat(src_flat, 1)  # (B, S, C)
        pos = torch.cat(pos_flat, 1)  # (B, S, C)
        mask = torch.cat(mask_flat, 1)  # (B, S)
        return src, pos, mask, spatial_shapes, level_start_index_from_shapes(spatial_shapes), ratios

    def encoder_proposals(self, memory, mask_flat, spatial_shapes):
        """Two-stage: one proposal per memory token, centred on its pixel, of size 0.05 * 2^l.

        Returns the transformed memory (B, S, C) and the proposals (B, S, 4) in
        inverse-sigmoid space, ``+inf`` where a token is padding or its proposal is outside
        (0.01, 0.99) (a centre on the image border); the transformed memory is zero there
        and such tokens are not selected as queries.
        """
        B = memory.shape[0]
        proposals, start = [], 0
        for lvl, (H, W) in enumerate(spatial_shapes.tolist()):
            mask_l = mask_flat[:, start:start + H * W].view(B, H, W)  # (B, H, W)
            valid_h = (~mask_l[:, :, 0]).sum(1)  # (B,)
            valid_w = (~mask_l[:, 0, :]).sum(1)  # (B,)
            ys = torch.arange(H, dtype=torch.float32, device=memory.device)
            xs = torch.arange(W, dtype=torch.float32, device=memory.device)
            y, x = torch.meshgrid(ys, xs, indexing="ij")  # (H, W)
            grid = torch.stack([x, y], -1)  # (H, W, 2)
            size = torch.stack([valid_w, valid_h], -1).view(B, 1, 1, 2)  # (B, 1, 1, 2)
            centre = (grid[None] + 0.5) / size  # (B, H, W, 2)
            wh = torch.full_like(centre, 0.05 * 2.0 ** lvl)  # (B, H, W, 2)
            proposals.append(torch.cat([centre, wh], -1).view(B, H * W, 4))  # (B, H*W, 4)
            start += H * W
        proposals = torch.cat(proposals, 1)  # (B, S, 4)
        ok = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True) & ~mask_flat[..., None]  # (B, S, 1)
        proposals = inverse_sigmoid(proposals).masked_fill(~ok, float("inf"))  # (B, S, 4)
        out = memory.masked_fill(~ok, 0.0)  # (B, S, C)
        return self.enc_output_norm(self.enc_output(out)), proposals

    def forward(self, srcs: List[torch.Tensor], masks: List[torch.Tensor], pos_embeds: List[torch.Tensor],
                query_embed: Optional[torch.Tensor] = None, box_heads: Optional[Sequence[nn.Module]] = None,
                enc_heads: Optional[Tuple[nn.Module, nn.Module]] = None) -> Dict[str, torch.Tensor]:
        """Encode the levels and decode the queries.

        query_embed: (Q, 2C) learned queries, split into (query_pos, tgt); ignored in two-stage.
        box_heads: one box MLP per decoder layer for iterative refinement, or None.
        enc_heads: (class_head, box_head) predicting proposals from the memory (two-stage).
        Returns a dict with ``hs`` (D, B, Q, C), ``references`` (D tensors (B, Q, 2|4)), the encoder
        ``memory`` (B, S, C) with its ``spatial_shapes``, ``level_start_index``, ``mask`` and
        ``valid_ratios``, and in two-stage ``enc_logits`` (B, S, K) and ``enc_boxes_unact`` (B, S, 4).
        """
        src, pos, mask_flat, spatial_shapes, level_start_index, ratios = self.flatten(srcs, masks, pos_embeds)
        memory = self.encoder(src, pos, spatial_shapes, level_start_index, ratios, mask_flat)  # (B, S, C)
        B, _, C = memory.shape
        out = {"memory": memory, "spatial_shapes": spatial_shapes, "level_start_index": level_start_index,
               "mask": mask_flat, "valid_ratios": ratios}

        if self.two_stage:
            if enc_heads is None:
                raise ValueError("two_stage=True needs enc_heads=(class_head, box_head) for the encoder proposals")
            enc_memory, proposals = self.encoder_proposals(memory, mask_flat, spatial_shapes)
            enc_logits = enc_heads[0](enc_memory)  # (B, S, K)
            enc_boxes_unact = enc_heads[1](enc_memory) + proposals  # (B, S, 4)
            # rank by the first logit (the proposals are trained class-agnostically, label 0);
            # invalid tokens, whose proposal is +inf, are never chosen
            score = enc_logits[..., 0].masked_fill(torch.isinf(proposals[..., 0]), float("-inf"))  # (B, S)
            k = min(self.num_queries, score.shape[1])
            top = torch.topk(score, k, dim=1).indices  # (B, k)
            top_boxes = torch.gather(enc_boxes_unact, 1, top[..., None].expand(-1, -1, 4)).detach()  # (B, k, 4)
            reference_points = top_boxes.sigmoid()  # (B, k, 4)
            query = self.pos_trans_norm(self.pos_trans(sine_embed_boxes(top_boxes, C)))  # (B, k, 2C)
            query_pos, tgt = torch.split(query, C, dim=2)  # (B, k, C) each
            out.update(enc_logits=enc_logits, enc_boxes_unact=enc_boxes_unact)
        else:
            if query_embed is None:
                raise ValueError("query_embed of shape (Q, 2*d_model) is needed unless two_stage=True")
            query_pos, tgt = torch.split(query_embed, C, dim=1)  # (Q, C) each
            query_pos = query_pos[None].expand(B, -1, -1)  # (B, Q, C)
            tgt = tgt[None].expand(B, -1, -1)  # (B, Q, C)
            reference_points = self.reference_points(query_pos).sigmoid()  # (B, Q, 2)

        hs, references = self.decoder(tgt, query_pos, reference_points, memory, spatial_shapes, level_start_index,
                                      ratios, mask_flat, box_heads=box_heads)
        out.update(hs=hs, references=references)
        return out
