"""Multi-scale backbones: ResNet-50 with frozen batch norm, and a small CNN for toy data.

Both have the same interface::

    features, masks = backbone(images, mask)
    images (N, 3, H, W) float, mask (N, H, W) bool (True = padding)
    features[i] (N, num_channels[i], H / strides[i], W / strides[i]) for strides 8, 16, 32
    masks[i]    (N, H / strides[i], W / strides[i]) bool, the padding mask at that stride

Deformable DETR reads all three maps (C3, C4, C5 of the paper); DETR reads the last one.
The paper's fourth level (stride 64) is a 3x3 stride-2 convolution on C5. As in the official
implementation it belongs to the *input projection* of the detector
(:class:`ddetr_minimal.models.deformable_detr.InputProjection`), not to the backbone: it is a new
layer trained from scratch with GroupNorm like the other projections, and keeping it there
lets every backbone stay a plain feature extractor.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from ..ops.checks import shape_str


def check_images(images: torch.Tensor, mask: torch.Tensor) -> None:
    """Raise a clear error unless ``images`` is (N, 3, H, W) float and ``mask`` (N, H, W) bool."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        got = shape_str(images) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor of shape (N, 3, H, W), got {got}")
    if not images.is_floating_point():
        raise TypeError(f"images must be a floating-point tensor (ImageNet-normalised), got dtype {images.dtype}")
    N, _, H, W = images.shape
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (N, H, W):
        got = f"dtype {mask.dtype} and shape {shape_str(mask)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a bool tensor of shape ({N}, {H}, {W}) (True = padding), got {got}")


def downsample_mask(mask: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of a padding mask (N, H, W) to (N, h, w)."""
    return F.interpolate(mask[None].float(), size=size).to(torch.bool)[0]  # (N, h, w)


class ResNetBackbone(nn.Module):
    """torchvision's ResNet-50 with ``FrozenBatchNorm2d``, returning C3, C4, C5 (strides 8, 16, 32).

    Args:
        name: a torchvision ResNet with bottleneck blocks ("resnet50" or "resnet101").
        pretrained: load torchvision's ImageNet weights (IMAGENET1K_V1, the weights the paper
            started from). Needs the network or a filled torch hub cache; raises a
            ``RuntimeError`` that says what to do when the download fails.
        train_backbone: when False every backbone weight is frozen; when True only the stem
            and ``layer1`` are (as in DETR and Deformable DETR).
    """

    strides = [8, 16, 32]

    def __init__(self, name: str = "resnet50", pretrained: bool = False, train_backbone: bool = True):
        super().__init__()
        channels = {"resnet50": [512, 1024, 2048], "resnet101": [512, 1024, 2048]}
        if name not in channels:
            raise ValueError(f"name must be one of {sorted(channels)}, got {name!r}")
        self.num_channels = channels[name]
        body = getattr(torchvision.models, name)(weights=None, norm_layer=FrozenBatchNorm2d)
        if pretrained:
            load_imagenet_weights(body, name)
        body.fc = nn.Identity()  # classification head: unused, no parameters left behind
        self.body = body
        for pname, p in self.body.named_parameters():
            if not train_backbone or not pname.startswith(("layer2", "layer3", "layer4")):
                p.requires_grad_(False)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Returns ([C3, C4, C5], [mask3, mask4, mask5]); see the module docstring."""
        check_images(images, mask)
        b = self.body
        x = b.maxpool(b.relu(b.bn1(b.conv1(images))))  # (N, 64, H/4, W/4)
        c2 = b.layer1(x)  # (N, 256, H/4, W/4)
        c3 = b.layer2(c2)  # (N, 512, H/8, W/8)
        c4 = b.layer3(c3)  # (N, 1024, H/16, W/16)
        c5 = b.layer4(c4)  # (N, 2048, H/32, W/32)
        features = [c3, c4, c5]
        return features, [downsample_mask(mask, f.shape[-2:]) for f in features]


def load_imagenet_weights(body: nn.Module, name: str) -> None:
    """Load torchvision's ImageNet weights into ``body``, or explain why that was impossible."""
    weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
    try:
        state = torch.hub.load_state_dict_from_url(weights.url, progress=True, check_hash=True)
    except Exception as err:  # URLError, OSError, RuntimeError (hash mismatch), ...
        cache = torch.hub.get_dir()
        raise RuntimeError(
            f"could not download the ImageNet weights of {name} from {weights.url} "
            f"({type(err).__name__}: {err}). Connect to the internet, or copy the file "
            f"{weights.url.rsplit('/', 1)[-1]} into {cache}/checkpoints/, or build the model "
            "with pretrained_backbone=False (random initialisation)."
        ) from err
    body.load_state_dict(state)


def _conv_gn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    groups = min(8, c_out)
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(groups, c_out),
        nn.ReLU(inplace=True),
    )


class SmallBackbone(nn.Module):
    """A five-stage CNN (each stage a stride-2 conv + one stride-1 conv, GroupNorm, ReLU).

    Same interface as :class:`ResNetBackbone` with strides 8, 16, 32 and ``num_channels``
    (default 32, 64, 128); trained from scratch on toy data on a CPU in minutes.
    """

    strides = [8, 16, 32]

    def __init__(self, num_channels=(32, 64, 128), stem_channels: int = 16):
        super().__init__()
        if len(num_channels) != 3 or any(int(c) <= 0 for c in num_channels):
            raise ValueError(f"num_channels must be three positive integers (strides 8, 16, 32), got {num_channels!r}")
        self.num_channels = [int(c) for c in num_channels]
        c3, c4, c5 = self.num_channels
        self.stem = nn.Sequential(_conv_gn_relu(3, stem_channels, 2), _conv_gn_relu(stem_channels, stem_channels, 2))
        self.stage3 = nn.Sequential(_conv_gn_relu(stem_channels, c3, 2), _conv_gn_relu(c3, c3, 1))
        self.stage4 = nn.Sequential(_conv_gn_relu(c3, c4, 2), _conv_gn_relu(c4, c4, 1))
        self.stage5 = nn.Sequential(_conv_gn_relu(c4, c5, 2), _conv_gn_relu(c5, c5, 1))

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Returns ([C3, C4, C5], [mask3, mask4, mask5]) at strides 8, 16, 32."""
        check_images(images, mask)
        x = self.stem(images)  # (N, stem, H/4, W/4)
        c3 = self.stage3(x)  # (N, c3, H/8, W/8)
        c4 = self.stage4(c3)  # (N, c4, H/16, W/16)
        c5 = self.stage5(c4)  # (N, c5, H/32, W/32)
        features = [c3, c4, c5]
        return features, [downsample_mask(mask, f.shape[-2:]) for f in features]


def build_backbone(name: str = "resnet50", pretrained: bool = False, train_backbone: bool = True,
                   small_channels: Sequence[int] = (32, 64, 128)) -> nn.Module:
    """``"resnet50"`` / ``"resnet101"`` (:class:`ResNetBackbone`) or ``"small"`` (:class:`SmallBackbone`)."""
    if name == "small":
        if pretrained:
            raise ValueError("pretrained_backbone=True needs backbone='resnet50'; the small CNN has no pretrained weights")
        return SmallBackbone(small_channels)
    if name in ("resnet50", "resnet101"):
        return ResNetBackbone(name, pretrained=pretrained, train_backbone=train_backbone)
    raise ValueError(f"backbone must be 'resnet50', 'resnet101' or 'small', got {name!r}")
