"""Augmentations for the unpaired associative loss (paper 001, eq. 5; docs/spec.md §2).

L_unpair contrasts two differently augmented views of one unpaired sample: SpecAugment (random
frequency and time masks) for sounds, SimCLR-style augmentations (random resized crop, flip,
colour jitter, grayscale, blur) for images. These per-sample transforms are the reference
definitions; training applies their batched equivalents on the device
(``methods.data.batch_augment``), which tests compare against them.

Legend: B batch, C channels, F mel bins, T frames, S image side.
"""

from __future__ import annotations


import torch
import torchaudio
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:  # imported where used: torchvision's import costs seconds a config check does not need
    from torchvision.transforms import v2

__all__ = ["SpecAugment", "simclr_image_augment"]



class SpecAugment(nn.Module):
    """``num_masks`` frequency masks (width ~ U[0, freq_mask)) and as many time masks
    (width ~ U[0, time_mask)) on a log-mel spectrogram (Park et al., 2019).

    Masked bins are set to 0, which is the mean of the normalised log-mel (see
    ``methods.data.logmel.LOGMEL_MEAN``). A (C, F, T) input gets one random mask set per
    call; a (B, C, F, T) batch gets an independent set per sample.
    """

    def __init__(self, freq_mask: int, time_mask: int, num_masks: int = 2) -> None:
        super().__init__()
        for name, value in (("freq_mask", freq_mask), ("time_mask", time_mask),
                            ("num_masks", num_masks)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: must be an integer >= 0, got {value!r}")
        self.num_masks = num_masks
        self.freq = torchaudio.transforms.FrequencyMasking(freq_mask, iid_masks=True)
        self.time = torchaudio.transforms.TimeMasking(time_mask, iid_masks=True)

    def forward(self, mel_CFT: torch.Tensor) -> torch.Tensor:
        if mel_CFT.dim() not in (3, 4):
            raise ValueError(f"mel: expected (C, F, T) or (B, C, F, T), got {tuple(mel_CFT.shape)}")
        out = mel_CFT
        for _ in range(self.num_masks):
            out = self.time(self.freq(out))
        return out


class _ClampUnit(nn.Module):
    """Clamp to [0, 1]; resampling and blurring can overshoot by a rounding error."""

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return img.clamp(0.0, 1.0)


def simclr_image_augment(image_size: int) -> v2.Compose:
    """SimCLR's image augmentations (Chen et al., 2020), scaled to ``image_size``.

    Random resized crop (scale 0.2-1: small images lose too much below that), horizontal flip,
    colour jitter (0.4, 0.4, 0.4, 0.1) with p = 0.8, grayscale with p = 0.2, and Gaussian blur
    with p = 0.5 whose kernel is ~10 % of the side (odd, at least 3) and whose largest sigma is
    SimCLR's 2.0 at 224 px, scaled down with the side (at least 0.5). Operates on float
    (3, S, S) tensors in [0, 1] and returns the same.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size: must be an integer >= 8, got {image_size!r}")
    kernel = max(3, 2 * (int(0.1 * image_size) // 2) + 1)
    sigma_max = max(0.5, 2.0 * image_size / 224)
    from torchvision.transforms import v2

    return v2.Compose([
        v2.RandomResizedCrop(image_size, scale=(0.2, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, sigma_max))], p=0.5),
        _ClampUnit(),
    ])
