"""The views Multi-SSL's tasks take of a binaural scene (paper 004; ``methods/multissl.py`` says
which task uses which): a panorama's azimuth feature, the same turned by whole rotation steps
(rolled where that is exact, encoded otherwise), and two temporal slices of a clip.

Legend: B batch, C encoder width, R rotations (and azimuth bins), K the R angles k = 0 .. R-1,
H/W panorama height/width, F mel bins, T frames, L slice frames.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from methods.data.binaural import rotate_panorama
from methods.encoders import Encoder, EncoderConfig


def azimuth_feature(map_BCHW: torch.Tensor, bins: int) -> torch.Tensor:
    """(B, C, H, W) feature map -> (B, C, bins): height averaged away, width averaged into
    ``bins`` equal azimuth sectors (exact sectors when W is a multiple of ``bins``)."""
    return F.adaptive_avg_pool2d(map_BCHW, (1, bins)).squeeze(2)


def rolls_exactly(encoder: EncoderConfig, width: int, rotations: int) -> bool:
    """Whether turning a ``width``-column panorama by 360/R rolls the encoder's feature map by
    whole columns, exactly: circular width padding, and a step of W / R columns that is a
    multiple of the encoder's total stride (so W is too, and every layer's width divides)."""
    if encoder.padding != "circular" or width % rotations:
        return False
    return (width // rotations) % encoder.map_stride == 0


def rotated_azimuth_features(
    E_v: Encoder, x_BCHW: torch.Tensor, rotations: int, *, roll: bool
) -> torch.Tensor:
    """(B, K, C, R): the azimuth feature of panorama x turned by k·360/R, for k = 0 .. R-1.

    ``roll=True`` encodes x once and rolls its azimuth feature by k bins, which equals encoding
    ``rotate_panorama(x, k)`` only where ``rolls_exactly`` holds (``rotate_panorama`` rolls the
    columns by +k·W/R, so the map rolls by +k·W'/R and the bins by +k). ``roll=False`` encodes
    the R turned panoramas, in one batch of B·R so that all share BatchNorm statistics."""
    if roll:
        v_BCR = azimuth_feature(E_v.forward_map(x_BCHW), rotations)
        return torch.stack([torch.roll(v_BCR, shifts=k, dims=2) for k in range(rotations)], dim=1)
    x_KBCHW = torch.stack([rotate_panorama(x_BCHW, k, rotations) for k in range(rotations)])
    v_KBCR = azimuth_feature(E_v.forward_map(x_KBCHW.flatten(0, 1)), rotations).unflatten(0, x_KBCHW.shape[:2])
    return v_KBCR.transpose(0, 1)


def cut_slices(
    sound_BCFT: torch.Tensor, length: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two slices of L frames per clip at independent uniform start frames t1, t2, and the
    normalised gap δ = (t2 - t1) / (T - L) in [-1, 1]."""
    b, _, _, t = sound_BCFT.shape
    if not 0 < length < t:
        raise ValueError(f"gap_slice_frames: need 0 < L < T = {t} frames, got {length}")
    starts_2B = torch.randint(0, t - length + 1, (2, b), generator=generator).to(sound_BCFT.device)
    frames_L = torch.arange(length, device=sound_BCFT.device)
    slices = []
    for starts_B in starts_2B:
        idx_BL = starts_B[:, None] + frames_L[None, :]
        idx = idx_BL[:, None, None, :].expand(-1, sound_BCFT.shape[1], sound_BCFT.shape[2], -1)
        slices.append(torch.gather(sound_BCFT, 3, idx))
    gap_B = (starts_2B[1] - starts_2B[0]).to(sound_BCFT.dtype) / (t - length)
    return slices[0], slices[1], gap_B
