"""Deformable DETR (plain, box refinement, two-stage) and DETR / DETR+: shapes, gradients,
reference points, padding, parameter counts and argument checks."""
import pytest
import torch

from ddetr_minimal.models.build import build_model
from ddetr_minimal.models.deformable_attention import MSDeformAttn
from ddetr_minimal.models.transformer import (
    DeformableTransformer,
    encoder_reference_points,
    valid_ratios,
)

TINY = dict(backbone="small", d_model=32, n_heads=4, enc_layers=2, dec_layers=3, dim_feedforward=64,
            num_queries=7, dropout=0.0)
H, W, K = 64, 96, 5
VARIANTS = {
    "plain": dict(model="deformable"),
    "refine": dict(model="deformable", with_box_refine=True),
    "two_stage": dict(model="deformable", two_stage=True),
    "refine_two_stage": dict(model="deformable", with_box_refine=True, two_stage=True),
    "detr": dict(model="detr"),
    "detr_plus": dict(model="detr", detr_focal=True),
}


def _batch():
    torch.manual_seed(0)
    images = torch.randn(2, 3, H, W)
    mask = torch.zeros(2, H, W, dtype=torch.bool)
    mask[1, 48:, :] = True
    mask[1, :, 64:] = True
    targets = [
        {"labels": torch.tensor([1, 4]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
        {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ]
    return images, mask, targets


@pytest.mark.parametrize("name", list(VARIANTS))
def test_output_shapes(name):
    torch.manual_seed(0)
    model, criterion, post = build_model(num_classes=K, **VARIANTS[name], **TINY)
    images, mask, targets = _batch()
    out = model(images, mask)
    n_logits = K + 1 if name == "detr" else K
    assert out["pred_logits"].shape == (2, 7, n_logits)
    assert out["pred_boxes"].shape == (2, 7, 4)
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    assert len(out["aux_outputs"]) == TINY["dec_layers"] - 1
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (2, 7, n_logits) and aux["pred_boxes"].shape == (2, 7, 4)
    if "two_stage" in name:
        # one proposal per token of the 4 levels: strides 8, 16, 32, 64 of a 64 x 96 image
        S = 8 * 12 + 4 * 6 + 2 * 3 + 1 * 2
        assert out["enc_outputs"]["pred_logits"].shape == (2, S, K)
        assert out["enc_outputs"]["pred_boxes"].shape == (2, S, 4)
    else:
        assert "enc_outputs" not in out
    losses = criterion(out, targets)
    assert set(losses) == set(criterion.weight_dict)
    assert torch.isfinite(criterion.total_loss(losses))
    results = post(out, torch.tensor([[H, W], [48, 64]]))
    assert len(results) == 2 and results[1]["boxes"].shape[-1] == 4


def test_default_query_counts_and_aux_switch():
    for kw, q in ((dict(model="detr"), 100), (dict(model="detr", detr_focal=True), 300), (dict(), 300)):
        model, _, _ = build_model(num_classes=K, **kw, **{k: v for k, v in TINY.items() if k != "num_queries"})
        assert model.num_queries == q
    model, criterion, _ = build_model(num_classes=K, aux_loss=False, **TINY)
    images, mask, _ = _batch()
    assert "aux_outputs" not in model(images, mask)
    assert set(criterion.weight_dict) == {"loss_ce", "loss_bbox", "loss_giou"}


def test_single_scale_model_uses_the_stride_32_map():
    model, _, _ = build_model(num_classes=K, n_levels=1, **TINY)
    images, mask, _ = _batch()
    out = model(images, mask, return_internals=True)
    assert out["internals"].memory.spatial_shapes.tolist() == [[2, 3]]
    assert out["pred_boxes"].shape == (2, 7, 4)


def test_gradients_reach_sampling_offsets_and_reference_points():
    torch.manual_seed(0)
    model, criterion, _ = build_model(num_classes=K, **TINY)
    images, mask, targets = _batch()
    criterion.total_loss(criterion(model(images, mask), targets)).backward()
    tr = model.transformer
    for attn in [l.self_attn for l in tr.encoder.layers] + [l.cross_attn for l in tr.decoder.layers]:
        assert attn.sampling_offsets.weight.grad.abs().sum() > 0  # zero-initialised, but learns
        assert attn.attention_weights.weight.grad.abs().sum() > 0
    assert tr.reference_points.weight.grad.abs().sum() > 0
    assert model.input_proj[3][0].weight.grad.abs().sum() > 0  # the stride-64 level
    assert model.query_embed.weight.grad.abs().sum() > 0
    # the encoder's positions (level embeddings) only steer the offsets and weights, whose
    # projections start at zero: no gradient at step 0, a gradient once they have moved
    assert tr.level_embed.grad.abs().sum() == 0
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    model.zero_grad()
    criterion.total_loss(criterion(model(images, mask), targets)).backward()
    assert tr.level_embed.grad.abs().sum() > 0


def test_reference_point_gradient_flows_through_the_sampling():
    """Moving a reference point moves where the values are read: d(out)/d(ref) is not zero."""
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    shapes = torch.tensor([[6, 8], [3, 4]])
    start = torch.tensor([0, 48])
    value = torch.randn(1, 60, 16)
    ref = torch.rand(1, 5, 2, 2, requires_grad=True)
    attn(torch.randn(1, 5, 16), ref, value, shapes, start).sum().backward()
    assert ref.grad.abs().sum() > 0


def test_refinement_detaches_the_references_between_layers():
    torch.manual_seed(0)
    model, _, _ = build_model(num_classes=K, with_box_refine=True, **TINY)
    with torch.no_grad():  # the box heads start at "no change"; make them change something
        for head in model.bbox_embed:
            head.layers[-1].weight.normal_(std=0.1)
    images, mask, _ = _batch()
    refs = model(images, mask, return_internals=True)["internals"].references
    assert refs[0].shape[-1] == 2 and refs[0].requires_grad  # learned from the query embedding
    assert all(r.shape[-1] == 4 and not r.requires_grad for r in refs[1:])
    assert not torch.allclose(refs[1], refs[2])  # every layer refines


def test_encoder_reference_points_are_pixel_centres_of_the_valid_image():
    shapes = torch.tensor([[4, 6], [2, 3]])
    mask4 = torch.zeros(1, 4, 6, dtype=torch.bool)
    mask4[0, :, 3:] = True  # half of the width is padding
    mask2 = torch.zeros(1, 2, 3, dtype=torch.bool)
    mask2[0, :, 2:] = True  # valid ratio 2/3 at the coarser level
    ratios = torch.stack([valid_ratios(mask4), valid_ratios(mask2)], 1)  # (1, 2, 2)
    torch.testing.assert_close(ratios[0], torch.tensor([[0.5, 1.0], [2 / 3, 1.0]]))
    ref = encoder_reference_points(shapes, ratios)  # (1, 24 + 6, 2, 2)
    assert ref.shape == (1, 30, 2, 2)
    # token (row 1, col 2) of level 0, read in level 0's own (padded) frame: its pixel centre
    torch.testing.assert_close(ref[0, 1 * 6 + 2, 0], torch.tensor([2.5 / 6, 1.5 / 4]))
    # read in level 1's frame: the same fraction of the valid image (x 2.5/3 of the valid width)
    torch.testing.assert_close(ref[0, 1 * 6 + 2, 1], torch.tensor([2.5 / 3 * 2 / 3, 1.5 / 4]))


def test_padding_does_not_change_the_transformer_output():
    """Whatever the padded pixels contain, the valid tokens' memory and the queries' outputs are the same."""
    torch.manual_seed(0)
    tr = DeformableTransformer(d_model=16, n_heads=2, enc_layers=2, dec_layers=2, dim_feedforward=32, dropout=0.0,
                               n_levels=2, n_points=2, num_queries=5).eval()
    masks = [torch.zeros(1, 6, 8, dtype=torch.bool), torch.zeros(1, 3, 4, dtype=torch.bool)]
    masks[0][:, :, 6:] = True
    masks[1][:, :, 3:] = True
    srcs = [torch.randn(1, 16, 6, 8), torch.randn(1, 16, 3, 4)]
    pos = [torch.randn(1, 16, 6, 8), torch.randn(1, 16, 3, 4)]
    garbage = [s.masked_fill(m[:, None], 0) + 100 * torch.randn_like(s) * m[:, None] for s, m in zip(srcs, masks)]
    query = torch.randn(5, 32)
    a = tr(srcs, masks, pos, query_embed=query)
    b = tr(garbage, masks, pos, query_embed=query)
    valid = ~a.memory.padding_mask[0]
    torch.testing.assert_close(a.memory.tokens[0, valid], b.memory.tokens[0, valid])
    torch.testing.assert_close(a.states, b.states)


def test_parameter_count_matches_the_paper():
    """The paper (Table 1) reports 40M parameters for Deformable DETR with ResNet-50.

    Our count, exactly, with COCO's 91 class ids:
      ResNet-50 without its fc layer (frozen-BN statistics are buffers)       23,454,912
      input projections: 1x1 convs 512/1024/2048 -> 256, 3x3 s2 conv 2048 -> 256,
        GroupNorm(32) after each                                                5,639,168
      encoder: 6 x (MSDeformAttn 230,272 + FFN 525,568 + 2 LayerNorms 1,024)    4,541,184
      decoder: 6 x (self-attn 263,168 + MSDeformAttn 230,272 + FFN 525,568
        + 3 LayerNorms 1,536)                                                   6,123,264
      level embeddings 4 x 256 + reference-point linear 256 x 2 + 2                 1,538
      query embeddings 300 x 512, class head 256 x 91 + 91, box MLP 132,612       309,599
                                                                      total    40,069,665
    MSDeformAttn: offsets 256 x (8 heads x 4 levels x 4 points x 2) + 256, weights
    256 x 128 + 128, value and output projections 2 x (256 x 256 + 256).
    """
    model, _, _ = build_model("deformable", num_classes=91)
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(model.backbone) == 23_454_912
    assert count(model.input_proj) == 5_639_168
    assert count(model.transformer.encoder) == 4_541_184
    assert count(model.transformer.decoder) == 6_123_264
    assert count(model) == 40_069_665
    # DETR (R50, 6+6 layers, FFN 2048, 100 queries, 92 logits): 41M in the paper's Table 1
    detr, _, _ = build_model("detr", num_classes=91)
    assert count(detr) == 41_524_768


def test_build_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="model must be one of"):
        build_model("yolo", num_classes=3)
    with pytest.raises(ValueError, match="options of model='deformable'"):
        build_model("detr", num_classes=3, two_stage=True, backbone="small")
    with pytest.raises(ValueError, match="num_classes must be a positive integer, got 0"):
        build_model(num_classes=0, backbone="small")
    with pytest.raises(ValueError, match="d_model must be divisible by n_heads"):
        build_model(num_classes=3, backbone="small", d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="backbone must be"):
        build_model(num_classes=3, backbone="resnet18")
    model, _, _ = build_model(num_classes=3, **TINY)
    with pytest.raises(ValueError, match="images must be a tensor of shape"):
        model(torch.zeros(3, 32, 32))
