"""Convolutional encoders for images and log-mel spectrograms, built from torchvision parts.

BMA-Memory (paper 001, supp. Tables 6-7) uses a ResNet-18 for images and a ResNet-10 (one
BasicBlock per stage, one input channel) for sounds. torchvision's ``ResNet`` fixes the stage
widths at 64-128-256-512, so the encoder is composed here from torchvision's ``BasicBlock`` with
a ``base_width`` setting: 64 gives the paper's exact layers, 16 gives the CPU-sized ``tiny``
preset.

L3 (paper 003, after Arandjelovic & Zisserman's L3-Net) uses a VGG-style trunk for both
modalities (``arch="vgg"``), with the same ``base_width`` setting and the same output size.

``padding="circular"`` is for 360° panoramas (Multi-SSL, paper 004): every spatial convolution
and padded max-pool wraps around along the width (azimuth; column 0 neighbours column W - 1) and
pads the height with zeros (the top and bottom of a panorama are not neighbours, so
``nn.Conv2d(padding_mode="circular")``, which wraps both axes, is not used). The encoder is then
exactly equivariant to turning the panorama: rolling the input by s columns rolls
``forward_map`` by s / ``map_stride`` columns whenever s is a multiple of ``map_stride`` and the
width is too. With the default zero padding the borders of the strip are not neighbours and the
feature map of a turned panorama is not a roll of the original's.

Legend: B batch, C channels, H/W height/width (for sounds: mel bins / frames), D feature size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Blocks per stage (conv2_x .. conv5_x).
RESNET_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "resnet10": (1, 1, 1, 1),
    "resnet18": (2, 2, 2, 2),
    "resnet34": (3, 4, 6, 3),
}
# Non-residual trunks; each has four stages like the ResNets, so per-block probes apply to all.
PLAIN_ARCHS: tuple[str, ...] = ("vgg",)
ENCODER_ARCHS: tuple[str, ...] = (*RESNET_LAYERS, *PLAIN_ARCHS)
# ResNet stems: "imagenet" is the papers' 7x7/2 conv + 3x3/2 max-pool (input / 4); "small" is the
# 3x3/1 conv without max-pool that small-image SSL work uses on 32-px inputs (SimCLR's CIFAR
# variant), which keeps stage 4 at input / 8 instead of input / 32 (4x4 rather than 1x1 at 32 px).
STEMS: tuple[str, ...] = ("imagenet", "small")
# "zeros": PyTorch's zero padding on both axes. "circular": wrap around along the width (a 360°
# panorama's azimuth), zeros along the height.
PADDINGS: tuple[str, ...] = ("zeros", "circular")

# The encoders of avlab's presets (each method's PRESETS): width 16 on two CPU cores (tiny,
# small), the papers' width 64 (paper). Written in full so that a run file that changes one field
# of an encoder keeps the preset's other fields.
TINY_ENCODERS = {
    "image_encoder": {"arch": "resnet18", "base_width": 16},
    "sound_encoder": {"arch": "resnet10", "base_width": 16},
}
# The small preset's: the tiny encoders with the small stem on the image side. At 32 px the
# ImageNet stem leaves stage 4 at 1x1; with the small stem BMA-Memory's L_pair reaches image
# linear 0.905 instead of 0.402 at the same budget (3 seeds; benchmarks/RESULTS-history.md, "The small
# stem at the small preset"). Sounds (40 x 64 log-mel) keep the ImageNet stem.
SMALL_ENCODERS = {**TINY_ENCODERS, "image_encoder": {**TINY_ENCODERS["image_encoder"], "stem": "small"}}
PAPER_ENCODERS = {
    "image_encoder": {"arch": "resnet18", "base_width": 64},
    "sound_encoder": {"arch": "resnet10", "base_width": 64},
}


@dataclass(frozen=True)
class EncoderConfig:
    """One encoder's shape. ``base_width`` 64 is the paper; the output size is 8 * base_width.

    ``arch`` is a ResNet (``resnet10`` / ``resnet18`` / ``resnet34``) or ``vgg`` (L3's trunk);
    every arch ends in a stage of 8 * base_width channels. ``padding`` is ``zeros`` or
    ``circular`` (wrap around along the width only, for 360° panoramas; see the module
    docstring). Both paddings have the same parameters and state_dict keys.
    """

    arch: str = "resnet18"
    base_width: int = 64
    stem: str = "imagenet"
    padding: str = "zeros"

    def __post_init__(self) -> None:
        if self.arch not in ENCODER_ARCHS:
            raise ValueError(f"arch: unknown encoder {self.arch!r}; choose one of {sorted(ENCODER_ARCHS)}")
        if self.stem not in STEMS:
            raise ValueError(f"stem: unknown stem {self.stem!r}; choose one of {list(STEMS)}")
        if self.base_width <= 0:
            raise ValueError(f"base_width: must be positive, got {self.base_width}")
        if self.padding not in PADDINGS:
            raise ValueError(f"padding: unknown padding {self.padding!r}; choose one of {list(PADDINGS)}")

    @property
    def out_dim(self) -> int:
        return 8 * self.base_width

    @property
    def map_stride(self) -> int:
        """Input pixels per ``forward_map`` column (and row): 32 for a ResNet with the
        ``imagenet`` stem, 8 with the ``small`` stem, 16 for ``vgg`` (which has no stem)."""
        if self.arch in PLAIN_ARCHS:
            return 16
        return 8 if self.stem == "small" else 32


def _hw(value: int | tuple[int, ...]) -> tuple[int, int]:
    """A layer's (height, width) setting from an int or a pair."""
    if isinstance(value, int):
        return value, value
    h, w = value
    return h, w


class WidthCircularConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose ``padding`` wraps around along the width and is zero along the height.

    Same parameters, hyperparameters and state_dict keys as the ``nn.Conv2d`` it stands for; only
    the padding of ``forward`` differs.
    """

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        p_h, p_w = self.padding  # ints: built by ``from_conv`` from a conv with numeric padding
        x_BCHW = F.pad(x_BCHW, (p_w, p_w, 0, 0), mode="circular")
        x_BCHW = F.pad(x_BCHW, (0, 0, p_h, p_h))
        return F.conv2d(x_BCHW, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> WidthCircularConv2d:
        """The width-circular twin of ``conv``, sharing its parameters (no RNG is drawn, so an
        encoder built from one seed has the same weights with either padding)."""
        if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            raise ValueError(f"padding: expected a zero-padded conv with numeric padding, got {conv}")
        new = torch.nn.utils.skip_init(
            cls, conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
            device=conv.weight.device, dtype=conv.weight.dtype,
        )
        new.weight = conv.weight
        new.bias = conv.bias
        return new

    def extra_repr(self) -> str:
        return super().extra_repr() + ", padding: circular along width, zeros along height"


class WidthCircularMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` whose ``padding`` wraps around along the width; along the height it pads
    with -inf, as ``nn.MaxPool2d`` does (padding never wins the max)."""

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        p_h, p_w = _hw(self.padding)
        x_BCHW = F.pad(x_BCHW, (p_w, p_w, 0, 0), mode="circular")
        x_BCHW = F.pad(x_BCHW, (0, 0, p_h, p_h), value=float("-inf"))
        return F.max_pool2d(x_BCHW, self.kernel_size, self.stride, 0, self.dilation, self.ceil_mode,
                            self.return_indices)

    @classmethod
    def from_pool(cls, pool: nn.MaxPool2d) -> WidthCircularMaxPool2d:
        if pool.ceil_mode:
            raise ValueError("padding: circular padding does not support ceil_mode max-pools")
        return cls(pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.return_indices, pool.ceil_mode)


def wrap_width(module: nn.Module) -> None:
    """Make, in place, every padded convolution and max-pool in ``module`` pad circularly along
    the width (zeros / -inf along the height). Unpadded layers (the 1x1 downsampling convs, VGG's
    2x2/2 max-pools) have nothing to wrap and stay as they are."""
    for name, child in module.named_children():
        if type(child) is nn.Conv2d:
            if any(_hw(child.padding)):
                setattr(module, name, WidthCircularConv2d.from_conv(child))
        elif type(child) is nn.MaxPool2d:
            if any(_hw(child.padding)):
                setattr(module, name, WidthCircularMaxPool2d.from_pool(child))
        else:
            wrap_width(child)


def init_conv_bn(module: nn.Module) -> None:
    """torchvision's ResNet initialisation: Kaiming-normal convolutions, BatchNorm at (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


class ResNetEncoder(nn.Module):
    """ResNet trunk: a stem (7x7/2 conv + 3x3/2 max-pool, or the ``small`` 3x3/1 conv), four
    BasicBlock stages, global average pool; ``padding="circular"`` wraps every 3x3 / 7x7 conv
    and the stem's max-pool around the width.

    ``forward`` returns the pooled feature f in R^{8*base_width}; ``forward_blocks`` also returns
    the pooled output of every stage (block1..block4) for per-block linear probes.
    """

    def __init__(self, cfg: EncoderConfig, *, in_channels: int) -> None:
        super().__init__()
        if cfg.arch not in RESNET_LAYERS:
            raise ValueError(f"arch: ResNetEncoder builds {sorted(RESNET_LAYERS)}, got {cfg.arch!r}")
        w = cfg.base_width
        self.cfg = cfg
        self.out_dim = cfg.out_dim
        if cfg.stem == "small":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, w, kernel_size=3, stride=1, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, w, kernel_size=7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            )
        stages: list[nn.Module] = []
        in_planes = w
        for i, blocks in enumerate(RESNET_LAYERS[cfg.arch]):
            planes = w * 2**i
            stride = 1 if i == 0 else 2
            stages.append(self._make_stage(in_planes, planes, blocks, stride))
            in_planes = planes
        self.stages = nn.ModuleList(stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        if cfg.padding == "circular":
            wrap_width(self)
        self._init_weights()

    @staticmethod
    def _make_stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        # Imported here: torchvision's import (it loads torch._dynamo) costs about 2.5 s on two
        # cores, which a command that only resolves configs does not need to pay.
        from torchvision.models.resnet import BasicBlock, conv1x1

        downsample = None
        if stride != 1 or in_planes != planes:
            downsample = nn.Sequential(conv1x1(in_planes, planes, stride), nn.BatchNorm2d(planes))
        layers = [BasicBlock(in_planes, planes, stride=stride, downsample=downsample)]
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        init_conv_bn(self)

    def forward_map(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map (B, 8 * base_width, H / 32, W / 32) (H / 8, W / 8 with the
        small stem; the divisor is ``EncoderConfig.map_stride``), before pooling."""
        h = self.stem(x_BCHW)
        for stage in self.stages:
            h = stage(h)
        return h

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.forward_map(x_BCHW)), 1)

    def forward_blocks(self, x_BCHW: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pooled features after each stage, keyed block1..block4 (block4 equals ``forward``)."""
        out: dict[str, torch.Tensor] = {}
        h = self.stem(x_BCHW)
        for i, stage in enumerate(self.stages, start=1):
            h = stage(h)
            out[f"block{i}"] = torch.flatten(self.pool(h), 1)
        return out


class VGGEncoder(nn.Module):
    """VGG-style trunk of L3 (paper 003 §3.1, Fig. 1): four stages of [conv3x3-BN-ReLU] x 2 and a
    2x2/2 max-pool, widths base_width * (1, 2, 4, 8), then a global max-pool to 8 * base_width.

    The global pool is a max, as in L3-Net, whose vision and audio subnetworks max-pool their last
    conv maps (14x14 for a 224x224 image) to one 512-d vector each. ``forward_blocks`` returns
    each stage's (B, C, H, W) feature map unpooled, so that the per-block probes apply their own
    protocol's pooling (a global average for AVID's, as for the ResNets' stage outputs) rather
    than L3's max. ``padding="circular"`` wraps the 3x3 convs around the width (the 2x2/2
    max-pools have no padding).
    """

    def __init__(self, cfg: EncoderConfig, *, in_channels: int) -> None:
        super().__init__()
        if cfg.arch not in PLAIN_ARCHS:
            raise ValueError(f"arch: VGGEncoder builds {PLAIN_ARCHS}, got {cfg.arch!r}")
        w = cfg.base_width
        self.cfg = cfg
        self.out_dim = cfg.out_dim
        stages: list[nn.Module] = []
        c_in = in_channels
        for i in range(4):
            c_out = w * 2**i
            stages.append(self._make_stage(c_in, c_out))
            c_in = c_out
        self.stages = nn.ModuleList(stages)
        self.pool = nn.AdaptiveMaxPool2d(1)
        if cfg.padding == "circular":
            wrap_width(self)
        self._init_weights()

    @staticmethod
    def _make_stage(c_in: int, c_out: int) -> nn.Sequential:
        # No conv bias: the BatchNorm after each conv has its own shift.
        return nn.Sequential(
            nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )

    def _init_weights(self) -> None:
        init_conv_bn(self)

    def forward_map(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map (B, 8 * base_width, H / 16, W / 16), before pooling."""
        h = x_BCHW
        for stage in self.stages:
            h = stage(h)
        return h

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.forward_map(x_BCHW)), 1)

    def forward_blocks(self, x_BCHW: torch.Tensor) -> dict[str, torch.Tensor]:
        """Feature maps (B, C, H, W) after each stage (after its max-pool), keyed block1..block4;
        the global max-pool of block4 is ``forward``."""
        out: dict[str, torch.Tensor] = {}
        h = x_BCHW
        for i, stage in enumerate(self.stages, start=1):
            h = stage(h)
            out[f"block{i}"] = h
        return out


Encoder = ResNetEncoder | VGGEncoder


def build_encoder(cfg: EncoderConfig, *, in_channels: int) -> Encoder:
    if cfg.arch in PLAIN_ARCHS:
        return VGGEncoder(cfg, in_channels=in_channels)
    return ResNetEncoder(cfg, in_channels=in_channels)
