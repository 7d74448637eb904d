"""Two-stage Deformable DETR (paper, Sec. 4.2): queries chosen from the encoder's own proposals.

Every encoder token proposes one box, centred on its pixel, of size ``0.05 * 2^l`` on level
``l`` (:func:`encoder_proposals`). A class head scores the tokens and a box head refines their
proposals; the ``num_queries`` best-scoring tokens (:func:`select_proposals`) give the decoder
its initial reference boxes, and, through a sine embedding, its queries.

Ranking differs from the official code in one respect: tokens that are padding, or whose
proposal touches the image border, are masked to ``-inf`` *before* the ranking here, so on a
padded batch they are never chosen. The official implementation ranks the raw scores, where a
padding token can win (its proposal is then ``inf``); ``tests/test_two_stage.py`` shows both
on a padded batch.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .heads import inverse_sigmoid

PROPOSAL_BASE_SIZE = 0.05  # proposal width and height on the finest level; doubles per level
PROPOSAL_BORDER = (0.01, 0.99)  # proposals with any coordinate outside this are not used


def encoder_proposals(padding_mask: torch.Tensor, spatial_shapes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """One proposal per token, normalised by the valid (unpadded) part of its level.

    padding_mask (N, S) bool, True at padding; spatial_shapes (L, 2) as (H_l, W_l).
    Returns ``proposals`` (N, S, 4) as (cx, cy, w, h) in inverse-sigmoid space, and ``valid``
    (N, S) bool: False where the token is padding or its proposal leaves :data:`PROPOSAL_BORDER`.
    """
    N = padding_mask.shape[0]
    proposals, start = [], 0
    for lvl, (H, W) in enumerate(spatial_shapes.tolist()):
        mask_l = padding_mask[:, start:start + H * W].view(N, H, W)  # (N, H, W)
        valid_h = (~mask_l[:, :, 0]).sum(1)  # (N,)
        valid_w = (~mask_l[:, 0, :]).sum(1)  # (N,)
        ys = torch.arange(H, dtype=torch.float32, device=padding_mask.device)  # (H,)
        xs = torch.arange(W, dtype=torch.float32, device=padding_mask.device)  # (W,)
        y, x = torch.meshgrid(ys, xs, indexing="ij")  # (H, W) each
        size = torch.stack([valid_w, valid_h], -1).view(N, 1, 1, 2)  # (N, 1, 1, 2)
        centre = (torch.stack([x, y], -1)[None] + 0.5) / size  # (N, H, W, 2)
        wh = torch.full_like(centre, PROPOSAL_BASE_SIZE * 2.0 ** lvl)  # (N, H, W, 2)
        proposals.append(torch.cat([centre, wh], -1).view(N, H * W, 4))  # (N, H*W, 4)
        start += H * W
    proposals = torch.cat(proposals, 1)  # (N, S, 4)
    low, high = PROPOSAL_BORDER
    valid = ((proposals > low) & (proposals < high)).all(-1) & ~padding_mask  # (N, S)
    proposals = inverse_sigmoid(proposals).masked_fill(~valid[..., None], float("inf"))  # (N, S, 4)
    return proposals, valid


def select_proposals(scores: torch.Tensor, boxes_unact: torch.Tensor, valid: torch.Tensor,
                     num_queries: int) -> torch.Tensor:
    """The ``num_queries`` best boxes: scores (N, S), boxes_unact (N, S, 4), valid (N, S).

    Invalid tokens (padding, or a proposal on the image border) are masked to ``-inf`` first,
    so they are never chosen. This differs from the official code and from transformers, which
    rank the raw scores: there every invalid token has the same score (its memory is zeroed),
    and on a padded batch they can fill the top k with boxes at ``inf`` (sigmoid 1, a degenerate
    box in the corner). The two choices agree whenever no invalid token outscores the k-th
    valid one; border tokens exist on unpadded images too (on the finest levels of a large
    image), so this is a property of the weights, not of the batch. ``tests/test_two_stage.py``
    shows both rankings on a padded batch.

    Returns the chosen boxes (N, k, 4) in inverse-sigmoid space, detached: the decoder refines
    them but does not train the proposal head through them.
    """
    score = scores.masked_fill(~valid, float("-inf"))  # (N, S)
    k = min(num_queries, score.shape[1])
    top = torch.topk(score, k, dim=1).indices  # (N, k)
    return torch.gather(boxes_unact, 1, top[..., None].expand(-1, -1, 4)).detach()  # (N, k, 4)
