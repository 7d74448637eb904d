"""Backbones (ResNet-50 with frozen BN, the small CNN) and the sine position embedding."""
import math
import urllib.error

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from ddetr_minimal.models.backbone import ResNetBackbone, SmallBackbone, build_backbone
from ddetr_minimal.models.build import build_model
from ddetr_minimal.models.position_encoding import PositionEmbeddingSine, sine_embed_boxes


def _padded_batch(h=96, w=128, valid=((96, 128), (64, 70))):
    torch.manual_seed(0)
    images = torch.randn(len(valid), 3, h, w)
    mask = torch.ones(len(valid), h, w, dtype=torch.bool)
    for b, (vh, vw) in enumerate(valid):
        mask[b, :vh, :vw] = False
    return images, mask


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return ResNetBackbone("resnet50").eval()


def test_resnet_strides_channels_and_masks(resnet):
    images, mask = _padded_batch()
    with torch.no_grad():
        features, masks = resnet(images, mask)
    assert resnet.strides == [8, 16, 32] and resnet.num_channels == [512, 1024, 2048]
    for f, m, s, c in zip(features, masks, resnet.strides, resnet.num_channels):
        assert f.shape == (2, c, 96 // s, 128 // s)
        assert m.shape == (2, 96 // s, 128 // s) and m.dtype == torch.bool
        # image 1 is valid on 64 x 70 pixels: the mask keeps that region (nearest resize)
        assert not m[0].any()
        assert not m[1, : 64 // s, : 70 // s].any()
        assert m[1, math.ceil(64 / s):, :].all() and m[1, :, math.ceil(70 / s):].all()


def test_resnet_uses_frozen_batch_norm_and_freezes_the_stem(resnet):
    kinds = {type(m) for m in resnet.modules()}
    assert FrozenBatchNorm2d in kinds and nn.BatchNorm2d not in kinds
    trainable = {n.split(".")[1] for n, p in resnet.named_parameters() if p.requires_grad}
    frozen = {n.split(".")[1] for n, p in resnet.named_parameters() if not p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}
    assert frozen == {"conv1", "layer1"}  # batch-norm statistics and affine terms are buffers
    all_frozen = ResNetBackbone("resnet50", train_backbone=False)
    assert not any(p.requires_grad for p in all_frozen.parameters())


def test_pretrained_weights_are_loaded_when_asked(monkeypatch):
    torch.manual_seed(123)
    reference = torchvision.models.resnet50(weights=None).state_dict()  # stands in for ImageNet weights
    calls = []

    def fake_download(url, **kwargs):
        calls.append(url)
        return {k: v.clone() for k, v in reference.items()}

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    net = ResNetBackbone("resnet50", pretrained=True)
    assert calls == [torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url]
    assert torch.equal(net.body.layer3[2].conv2.weight, reference["layer3.2.conv2.weight"])
    assert torch.equal(net.body.bn1.running_var, reference["bn1.running_var"])
    ResNetBackbone("resnet50", pretrained=False)
    assert len(calls) == 1  # no download unless asked


def test_failed_download_gives_a_clear_error(monkeypatch):
    def offline(url, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    url = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url
    with pytest.raises(RuntimeError) as info:
        build_model("deformable", num_classes=3, pretrained_backbone=True)
    msg = str(info.value)
    assert "ImageNet weights of resnet50" in msg and url in msg
    assert "name resolution" in msg and "pretrained_backbone=False" in msg


def test_small_backbone_interface():
    torch.manual_seed(0)
    net = SmallBackbone((8, 16, 24))
    images, mask = _padded_batch(70, 90, valid=((70, 90), (40, 50)))
    features, masks = net(images, mask)
    assert net.num_channels == [8, 16, 24] and net.strides == [8, 16, 32]
    for f, m, s, c in zip(features, masks, net.strides, net.num_channels):
        size = (math.ceil(70 / s), math.ceil(90 / s))
        assert f.shape == (2, c) + size and m.shape == (2,) + size
    assert masks[0][1, -1, -1] and not masks[0][1, 0, 0]


def test_backbone_rejects_bad_input():
    net = build_backbone("small")
    with pytest.raises(ValueError, match="images must be a tensor of shape"):
        net(torch.zeros(3, 32, 32), torch.zeros(1, 32, 32, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(1, 32, 32\)"):
        net(torch.zeros(1, 3, 32, 32), torch.zeros(1, 32, 32))
    with pytest.raises(TypeError, match="floating-point"):
        net(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), torch.zeros(1, 32, 32, dtype=torch.bool))
    with pytest.raises(ValueError, match="backbone must be"):
        build_backbone("vgg16")
    with pytest.raises(ValueError, match="num_channels must be three"):
        SmallBackbone((8, 16))


def test_sine_embedding_shape_range_and_padding_invariance():
    pe = PositionEmbeddingSine(16)
    mask = torch.zeros(2, 6, 10, dtype=torch.bool)
    mask[1, 4:, :] = True
    mask[1, :, 7:] = True
    pos = pe(mask)
    assert pos.shape == (2, 32, 6, 10) and pos.abs().max() <= 1
    # coordinates are normalised by the valid size: the padded image's valid part gets the
    # same embedding as an unpadded image of that size
    alone = pe(torch.zeros(1, 4, 7, dtype=torch.bool))
    torch.testing.assert_close(pos[1, :, :4, :7], alone[0])
    # first channel is sin of the y coordinate, (row + 1 - 0.5) / valid_rows * 2 pi
    rows = (torch.arange(4) + 0.5) / 4 * 2 * math.pi
    torch.testing.assert_close(alone[0, 0, :, 0], rows.sin(), atol=1e-5, rtol=0)
    # x channels start at 16; channel 17 is cos of the x coordinate at the first frequency
    cols = (torch.arange(7) + 0.5) / 7 * 2 * math.pi
    torch.testing.assert_close(alone[0, 17, 0, :], cols.cos(), atol=1e-5, rtol=0)


def test_sine_embedding_rejects_bad_input():
    with pytest.raises(ValueError, match="num_pos_feats must be a positive even integer"):
        PositionEmbeddingSine(15)
    with pytest.raises(ValueError, match="mask must be a bool tensor of shape"):
        PositionEmbeddingSine(8)(torch.zeros(1, 4, 4))


def test_box_sine_embedding():
    boxes = torch.zeros(2, 5, 4)  # sigmoid(0) = 0.5 for every coordinate
    emb = sine_embed_boxes(boxes, d_model=32)
    assert emb.shape == (2, 5, 64)
    assert torch.allclose(emb[..., 0], torch.full((2, 5), math.sin(math.pi)), atol=1e-6)
    assert torch.allclose(emb[..., 1], torch.full((2, 5), math.cos(math.pi)), atol=1e-6)
