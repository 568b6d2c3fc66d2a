"""Convolutional encoders for images and log-mel spectrograms, built from torchvision parts.

BMA-Memory (paper 001, supp. Tables 6-7) uses a ResNet-18 for images and a ResNet-10 (one
BasicBlock per stage, one input channel) for sounds. torchvision's ``ResNet`` fixes the stage
widths at 64-128-256-512, so the encoder is composed here from torchvision's ``BasicBlock`` with
a ``base_width`` setting: 64 gives the paper's exact layers, 16 gives the CPU-sized ``tiny``
preset.

Legend: B batch, C channels, H/W height/width (for sounds: mel bins / frames), D feature size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, conv1x1

# Blocks per stage (conv2_x .. conv5_x).
RESNET_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "resnet10": (1, 1, 1, 1),
    "resnet18": (2, 2, 2, 2),
    "resnet34": (3, 4, 6, 3),
}


@dataclass(frozen=True)
class EncoderConfig:
    """One encoder's shape. ``base_width`` 64 is the paper; the output size is 8 * base_width."""

    arch: str = "resnet18"
    base_width: int = 64

    def __post_init__(self) -> None:
        if self.arch not in RESNET_LAYERS:
            raise ValueError(f"arch: unknown encoder {self.arch!r}; choose one of {sorted(RESNET_LAYERS)}")
        if self.base_width <= 0:
            raise ValueError(f"base_width: must be positive, got {self.base_width}")

    @property
    def out_dim(self) -> int:
        return 8 * self.base_width


class ResNetEncoder(nn.Module):
    """ResNet trunk: 7x7/2 conv stem, 3x3/2 max-pool, four BasicBlock stages, global average pool.

    ``forward`` returns the pooled feature f in R^{8*base_width}; ``forward_blocks`` also returns
    the pooled output of every stage (block1..block4) for per-block linear probes.
    """

    def __init__(self, cfg: EncoderConfig, *, in_channels: int) -> None:
        super().__init__()
        w = cfg.base_width
        self.out_dim = cfg.out_dim
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
        self._init_weights()

    @staticmethod
    def _make_stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or in_planes != planes:
            downsample = nn.Sequential(conv1x1(in_planes, planes, stride), nn.BatchNorm2d(planes))
        layers = [BasicBlock(in_planes, planes, stride=stride, downsample=downsample)]
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        # Same initialisation as torchvision's ResNet.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        h = self.stem(x_BCHW)
        for stage in self.stages:
            h = stage(h)
        return torch.flatten(self.pool(h), 1)

    def forward_blocks(self, x_BCHW: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pooled features after each stage, keyed block1..block4 (block4 equals ``forward``)."""
        out: dict[str, torch.Tensor] = {}
        h = self.stem(x_BCHW)
        for i, stage in enumerate(self.stages, start=1):
            h = stage(h)
            out[f"block{i}"] = torch.flatten(self.pool(h), 1)
        return out


def build_encoder(cfg: EncoderConfig, *, in_channels: int) -> ResNetEncoder:
    return ResNetEncoder(cfg, in_channels=in_channels)
