"""Augmentations for the unpaired associative loss (paper 001, eq. 5; SPEC §2).

L_unpair contrasts two differently augmented views of one unpaired sample: SpecAugment (random
frequency and time masks) for sounds, SimCLR-style augmentations (random resized crop, flip,
colour jitter, grayscale, blur) for images. ``TwoViews`` turns an unpaired pool into a dataset
of such view pairs whose randomness is a pure function of (seed, epoch, index), so results do
not depend on DataLoader workers or on the global RNG.

Legend: B batch, C channels, F mel bins, T frames, S image side.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torchaudio
from torch import nn
from torch.utils.data import Dataset
from torchvision.transforms import v2

__all__ = ["SpecAugment", "TwoViews", "simclr_image_augment"]

Transform = Callable[[torch.Tensor], torch.Tensor]


class SpecAugment(nn.Module):
    """``num_masks`` frequency masks (width ~ U[0, freq_mask)) and as many time masks
    (width ~ U[0, time_mask)) on a log-mel spectrogram (Park et al., 2019).

    Masked bins are set to 0, which is the mean of the normalised log-mel (see
    ``methods.data.procedural.LOGMEL_MEAN``). A (C, F, T) input gets one random mask set per
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
    return v2.Compose([
        v2.RandomResizedCrop(image_size, scale=(0.2, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, sigma_max))], p=0.5),
        _ClampUnit(),
    ])


class TwoViews(Dataset):
    """Two independently augmented views of each sample of an unpaired pool.

    ``__getitem__(i)`` returns ``{out_key: view1, out_key + "_aug": view2, "index": i}``, both
    views made by ``transform`` from ``dataset[i][base_key]``. The augmentation randomness is
    seeded from (seed, epoch, index) on the CPU generator, whose state is saved and restored
    around the call, so a view depends neither on the worker that draws it nor on the global RNG,
    and the global RNG is left untouched (transforms must draw from the default CPU generator,
    as torchvision's and torchaudio's do). Call ``set_epoch`` before each epoch (before creating
    the DataLoader iterator, as with ``DistributedSampler``) to get fresh views.
    """

    def __init__(
        self,
        dataset: Dataset,
        base_key: str,
        out_key: str,
        transform: Transform,
        *,
        seed: int,
    ) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed: must be an integer >= 0, got {seed!r}")
        self.dataset = dataset
        self.base_key = base_key
        self.out_key = out_key
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch: must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def view_seed(self, index: int) -> int:
        """The torch seed of sample ``index``'s views in the current epoch."""
        ss = np.random.SeedSequence([self.seed, self.epoch, int(index)])
        return int(ss.generate_state(1, np.uint64)[0] >> 1)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        if self.base_key not in item:
            raise KeyError(f"base_key: {self.base_key!r} not in the dataset's items "
                           f"(keys: {sorted(item)})")
        x = item[self.base_key]
        # Fork the CPU generator by hand: torch.random.fork_rng + torch.manual_seed also visit
        # every accelerator backend and cost ~50x more than the augmentation's own draws.
        state = torch.get_rng_state()
        try:
            torch.default_generator.manual_seed(self.view_seed(index))
            view1 = self.transform(x)
            view2 = self.transform(x)
        finally:
            torch.set_rng_state(state)
        return {
            self.out_key: view1,
            f"{self.out_key}_aug": view2,
            "index": torch.tensor(int(index), dtype=torch.int64),
        }
