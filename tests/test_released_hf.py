"""Hugging Face checkpoints: a transformers model with random weights, saved with
``save_pretrained``, loads into ours and computes the same detections on a padded batch."""
import json

import pytest
import torch

from ddetr_minimal.models import released
from ddetr_minimal.models.released import load_released, read_released

transformers = pytest.importorskip("transformers", reason="transformers is the reference implementation here")
DeformableDetrConfig = transformers.DeformableDetrConfig
DeformableDetrForObjectDetection = transformers.DeformableDetrForObjectDetection

VARIANTS = {"plain": (False, False), "refine": (True, False), "two_stage": (True, True)}


def _hf_model(refine, two_stage, seed=0, num_labels=5):
    cfg = DeformableDetrConfig(
        use_timm_backbone=True, use_pretrained_backbone=False, backbone="resnet50", d_model=64,
        encoder_layers=2, decoder_layers=2, encoder_ffn_dim=96, decoder_ffn_dim=96, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_n_points=2, decoder_n_points=2, num_queries=10,
        two_stage_num_proposals=10, num_labels=num_labels, with_box_refine=refine, two_stage=two_stage,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    torch.manual_seed(seed)
    model = DeformableDetrForObjectDetection(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # move every tensor off its initial value (zeros, ones, shared constants)
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            noise = torch.randn(t.shape, generator=g)
            if name.endswith("running_var"):
                t.mul_((0.2 * noise).exp())  # stays positive
            else:
                t.add_(0.05 * noise)
    return model


def _padding_loses(model):
    """Two-stage: padding and border tokens carry memory 0, so their proposal score is one constant,
    w . LayerNorm(enc_output.bias) + c. Point the bias against w so that constant is below the
    valid tokens' scores; transformers' raw ranking then picks the same tokens as ours."""
    m = model.model
    w = model.model.decoder.class_embed[-1].weight[0] * m.enc_output_norm.weight  # (C,)
    with torch.no_grad():
        m.enc_output.bias.copy_(-8.0 * w / w.norm())
    return model


def _padded_batch():
    """Two images of different sizes padded into one tensor, with transformers' pixel_mask (1 = pixel)."""
    torch.manual_seed(5)
    sizes = [(96, 128), (72, 104)]
    images = torch.zeros(2, 3, 96, 128)
    pixel_mask = torch.zeros(2, 96, 128, dtype=torch.long)
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = torch.randn(3, h, w)
        pixel_mask[i, :h, :w] = 1
    return images, pixel_mask


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hugging_face_checkpoint_gives_the_same_detections(variant, tmp_path):
    refine, two_stage = VARIANTS[variant]
    theirs = _hf_model(refine, two_stage)
    if two_stage:
        _padding_loses(theirs)
    theirs.save_pretrained(tmp_path)
    ours, _, _ = load_released(path=str(tmp_path), backend="torch")
    images, pixel_mask = _padded_batch()
    with torch.no_grad():
        expected = theirs(pixel_values=images, pixel_mask=pixel_mask)
        got = ours(images, pixel_mask == 0)
    if two_stage:
        # transformers ranks the raw proposal scores (as the official code does), this package
        # ranks valid tokens only: the two agree when no padding or border token makes the top k
        top = expected.enc_outputs_class[..., 0].topk(10, dim=1).indices  # (B, k)
        chosen = torch.gather(expected.enc_outputs_coord_logits[..., 0], 1, top)  # (B, k)
        assert torch.isfinite(chosen).all(), "a padding token is among transformers' top proposals"
    assert got["pred_logits"].shape == expected.logits.shape == (2, 10, 5)
    torch.testing.assert_close(got["pred_logits"], expected.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["pred_boxes"], expected.pred_boxes, rtol=1e-5, atol=1e-6)
    # and the outputs are not trivially equal: another random model differs
    other = _hf_model(refine, two_stage, seed=3)
    with torch.no_grad():
        assert not torch.allclose(other(pixel_values=images, pixel_mask=pixel_mask).logits, expected.logits, atol=1e-2)
