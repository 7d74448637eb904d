"""Two-stage query selection on a padded batch: this package ranks only the valid encoder
tokens (:func:`ddetr_minimal.models.two_stage.select_proposals`); the official code (and
transformers) ranks the raw scores, where padding and border tokens, whose memory is zeroed,
all share one score and can fill the top k. Both are shown."""
import torch

from ddetr_minimal.models.build import build_model
from ddetr_minimal.models.two_stage import encoder_proposals, select_proposals

K = 12  # queries


def _model(padding_wins: bool):
    """A tiny two-stage model whose padding-token score is pushed above (or below) every valid one.

    Padding and border tokens enter the proposal head as LayerNorm(enc_output.bias): pointing
    that bias along (or against) the head's weight sets their shared score at will."""
    torch.manual_seed(0)
    model = build_model("deformable", num_classes=3, backbone="small", d_model=32, n_heads=2, enc_layers=1,
                        dec_layers=2, dim_feedforward=48, num_queries=K, n_points=2, with_box_refine=True,
                        two_stage=True, dropout=0.0, backend="torch")[0].eval()
    tr = model.transformer
    w = model.head(model.num_decoder_layers)[0].weight[0] * tr.enc_output_norm.weight  # (C,)
    with torch.no_grad():
        tr.enc_output.bias.copy_((8.0 if padding_wins else -8.0) * w / w.norm())
    return model


def _batch():
    torch.manual_seed(1)
    images = torch.randn(2, 3, 128, 160)
    mask = torch.zeros(2, 128, 160, dtype=torch.bool)
    mask[1, 96:, :] = True  # the second image is 96 x 112, padded
    mask[1, :, 112:] = True
    return images, mask


def _picks(model, images, mask):
    """(the package's selected tokens, the official ranking's, and which tokens are invalid), per image."""
    with torch.no_grad():
        out = model(images, mask, return_internals=True)
    tr = out["internals"]
    enc_boxes = tr.enc_boxes_unact  # (B, S, 4), +inf at padding and border tokens
    _, valid = encoder_proposals(tr.memory.padding_mask, tr.memory.spatial_shapes)  # (B, S)
    invalid = ~valid
    assert torch.equal(invalid, torch.isinf(enc_boxes[..., 0]))
    official = tr.enc_logits[..., 0].topk(K, dim=1).indices  # (B, K): raw scores, as the official code
    # the package's choice, read back from the decoder's first reference boxes: the sigmoid of the
    # selected proposals (a valid proposal's box is finite, so each identifies its token)
    first_ref = tr.references[0]  # (B, K, 4)
    boxes = enc_boxes.sigmoid()  # (B, S, 4)
    ours = torch.stack([(first_ref[b, :, None] - boxes[b, None]).abs().sum(-1).argmin(-1) for b in range(2)])  # (B, K)
    return ours, official, invalid


def test_padding_never_becomes_a_query_here_but_can_in_the_official_ranking():
    images, mask = _batch()
    ours, official, invalid = _picks(_model(padding_wins=True), images, mask)
    assert invalid[1].sum() > K and not invalid[0].any()  # only the second image has padding
    # on the unpadded image both rankings pick the same tokens
    assert torch.equal(ours[0].sort().values, official[0].sort().values)
    # on the padded one the official ranking fills every query with padding tokens, whose boxes are
    # sigmoid(inf) = (1, 1, 1, 1): queries that start as a degenerate box at the corner
    assert torch.gather(invalid, 1, official)[1].all()
    # this package ranks the valid tokens only
    assert not torch.gather(invalid, 1, ours).any()
    with torch.no_grad():
        ref = _model(padding_wins=True)(images, mask, return_internals=True)["internals"].references[0]
    assert torch.isfinite(ref).all() and (ref < 1).all()


def test_select_proposals_masks_before_ranking():
    """The function itself, on scores where two invalid tokens are the best."""
    scores = torch.tensor([[5.0, 0.1, 4.0, 0.3, 0.2]])  # (1, S)
    valid = torch.tensor([[False, True, False, True, True]])
    boxes = torch.arange(5.0)[None, :, None].expand(1, 5, 4).clone()  # (1, S, 4): box i is all i
    boxes[~valid] = float("inf")
    ours = select_proposals(scores, boxes, valid, num_queries=2)  # (1, 2, 4)
    official = torch.gather(boxes, 1, scores.topk(2, dim=1).indices[..., None].expand(-1, -1, 4))  # raw ranking
    assert ours[0, :, 0].tolist() == [3.0, 4.0]  # the two best valid tokens, best first
    assert torch.isinf(official).all()  # the official ranking picks the two invalid tokens
    assert not ours.requires_grad


def test_both_rankings_agree_when_no_invalid_token_scores_high():
    images, mask = _batch()
    ours, official, invalid = _picks(_model(padding_wins=False), images, mask)
    assert not torch.gather(invalid, 1, official).any()
    assert torch.equal(ours.sort(1).values, official.sort(1).values)
