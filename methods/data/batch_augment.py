"""Batched augmentations on the training device, whose randomness is a pure function of
(seed, epoch, index).

The per-sample pipelines of ``methods.data.augment`` (torchvision's SimCLR transforms, torchaudio's
SpecAugment) run one sample at a time on the CPU: on two cores they cost more than the training
step they feed, and at the paper preset they cannot feed a GPU. The classes here apply the same
augmentations to a whole (B, C, H, W) batch with a handful of tensor operations, on whatever
device the batch lives on, and draw every random number from a counter-based hash of (seed,
stream, epoch, index, draw): a view depends neither on the batch it lands in, nor on the worker,
nor on the global RNG, so a resumed run draws exactly the views an uninterrupted one draws.

Distributions follow the per-sample definitions (tests compare them):

- ``BatchSpecAugment``: torchaudio's ``FrequencyMasking`` / ``TimeMasking`` with ``iid_masks``:
  width = u * mask_param, start = u' * (size - width), masked bins floor(start) <=
  i < floor(start) + floor(width), set to 0 (the normalised log-mel's mean); ``num_masks`` rounds.
- ``BatchSimCLRAugment``: torchvision's ``RandomResizedCrop`` (scale 0.2-1, ratio 3/4-4/3, ten
  tries then the whole image, integer crop boxes, bilinear resampling), horizontal flip, colour
  jitter (0.4, 0.4, 0.4, 0.1) with p = 0.8 in a random order per sample, grayscale with p = 0.2
  and a Gaussian blur with p = 0.5 (the kernel and sigma range of ``simclr_image_augment``).
  Resampling uses ``grid_sample`` with half-pixel centres, like torchvision's resize, without
  antialiasing (crops are never shrunk, so it is not needed).
- ``PairedAugment`` (the ``light`` recipe for paired data): an image shifted by up to 1/8 of its
  side with reflected borders and flipped with p = 0.5; a sound whose level changes by up to
  ± ``gain_db`` (a constant added to the normalised log-mel).

Legend: B batch, C channels, H/W height/width (F mel bins / T frames for sounds), K draws.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from methods.data.logmel import LOGMEL_STD

__all__ = [
    "BatchSimCLRAugment",
    "BatchSpecAugment",
    "PairedAugment",
    "hashed_uniform",
]

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (two multiply-xorshift rounds) on int64 tensors holding values in
    [0, 2**32); every product stays below 2**63, so no step overflows."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    return (x >> 16) ^ x


def hashed_uniform(seed: int, stream: int, epoch: int, index_B: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k) floats in [0, 1): draw j of sample ``index_B[b]`` is a pure function of (seed,
    stream, epoch, index, j), computed on ``index_B``'s device."""
    idx = index_B.long().reshape(-1, 1) & _M32
    draws = torch.arange(k, device=index_B.device, dtype=torch.int64).reshape(1, -1)
    h = _mix32(torch.full_like(idx, (int(seed) * 0x9E3779B1 + int(stream)) & _M32))
    h = _mix32(h ^ ((int(epoch) * 0x85EBCA6B) & _M32))
    h = _mix32(h ^ _mix32(idx))
    h = _mix32(h ^ _mix32(draws + 0x27D4EB2F))
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


class BatchSpecAugment:
    """SpecAugment on a (B, C, F, T) batch: ``num_masks`` rounds of one frequency mask and one
    time mask per sample and channel (torchaudio's iid masks), width ~ U[0, mask_param)."""

    def __init__(self, freq_mask: int, time_mask: int, num_masks: int = 2) -> None:
        for name, value in (("freq_mask", freq_mask), ("time_mask", time_mask), ("num_masks", num_masks)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: must be an integer >= 0, got {value!r}")
        self.freq_mask, self.time_mask, self.num_masks = freq_mask, time_mask, num_masks

    def draws(self) -> int:
        return 4 * self.num_masks

    def __call__(self, mel_BCFT: torch.Tensor, u_BK: torch.Tensor) -> torch.Tensor:
        """Masks from the uniforms ``u_BK`` (K >= ``draws()``, shared by all channels' masks in
        turn: channel c uses its own offset into the draws)."""
        if mel_BCFT.dim() != 4:
            raise ValueError(f"mel: expected (B, C, F, T), got {tuple(mel_BCFT.shape)}")
        b, c, f, t = mel_BCFT.shape
        u_BCK = u_BK.reshape(b, 1, -1) if c == 1 else u_BK.reshape(b, c, -1)
        keep = torch.ones_like(mel_BCFT, dtype=torch.bool)
        pos_f = torch.arange(f, device=mel_BCFT.device).view(1, 1, f, 1)
        pos_t = torch.arange(t, device=mel_BCFT.device).view(1, 1, 1, t)
        for r in range(self.num_masks):
            for j, (param, size, pos) in enumerate(((self.freq_mask, f, pos_f), (self.time_mask, t, pos_t))):
                width = u_BCK[:, :, 4 * r + 2 * j] * param
                start = u_BCK[:, :, 4 * r + 2 * j + 1] * (size - width)
                lo = start.long()
                hi = lo + width.long()
                shape = (b, u_BCK.shape[1], 1, 1)
                keep &= ~((pos >= lo.view(shape)) & (pos < hi.view(shape)))
        return mel_BCFT * keep


def _rgb_to_gray(img_B3HW: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, as torchvision's rgb_to_grayscale; (B, 1, H, W)."""
    r, g, b = img_B3HW.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _blend(a: torch.Tensor, b: torch.Tensor, ratio_B: torch.Tensor) -> torch.Tensor:
    return (ratio_B.view(-1, 1, 1, 1) * a + (1 - ratio_B.view(-1, 1, 1, 1)) * b).clamp(0, 1)


def _shift_hue(img_B3HW: torch.Tensor, shift_B: torch.Tensor) -> torch.Tensor:
    """RGB -> HSV, hue += shift (mod 1), HSV -> RGB, as torchvision's adjust_hue per sample.

    HSV -> RGB uses the closed form channel_n = v - v s clamp(min(k, 4 - k), 0, 1) with
    k = (n + 6 h) mod 6 and n = 5, 3, 1 for R, G, B (no six-way table)."""
    maxc, arg = img_B3HW.max(1)  # ties go to the first channel, as in torchvision (r, then g)
    cr = maxc - img_B3HW.min(1).values
    r, g, b = img_B3HW.unbind(1)
    # Hue in sixths: (g - b) / cr from red, 2 + (b - r) / cr from green, 4 + (r - g) / cr from blue.
    num = torch.stack([g - b, b - r, r - g], 1).gather(1, arg.unsqueeze(1)).squeeze(1)
    safe_cr = torch.where(cr > 0, cr, torch.ones_like(cr))
    h = torch.fmod((num / safe_cr + 2.0 * arg) / 6.0 + 1.0, 1.0)
    h6 = torch.fmod(h + shift_B.view(-1, 1, 1) + 1.0, 1.0) * 6.0
    # v s = max * (max - min) / max = max - min.
    out = [maxc - cr * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)
           for k in (torch.fmod(h6 + n, 6.0) for n in (5.0, 3.0, 1.0))]
    return torch.stack(out, 1)


def _crop_flip_grid(box_B4: torch.Tensor, flip_B: torch.Tensor, size: int, h_in: int, w_in: int,
                    *, clamp: bool = True) -> torch.Tensor:
    """Sampling grid (B, size, size, 2) that resizes the box (top, left, height, width in input
    pixels) of every sample to ``size`` x ``size`` with half-pixel centres, mirrored where
    ``flip_B``. With ``clamp``, sample positions stay within the box's pixel centres, as when the
    crop is cut out first and then resized (torchvision's resized_crop). The grid is separable:
    x depends on the output column only, y on the row."""
    top, left, hh, ww = (t.unsqueeze(1) for t in box_B4.unbind(1))
    # Output pixel centre p in [0, size) -> input pixel coordinate, then grid_sample's [-1, 1].
    p = (torch.arange(size, device=box_B4.device, dtype=box_B4.dtype) + 0.5).unsqueeze(0) / size
    p_x = torch.where(flip_B.unsqueeze(1), 1.0 - p, p)
    x = left + p_x * ww - 0.5  # (B, size) input pixel coordinates
    y = top + p * hh - 0.5
    if clamp:
        x = torch.maximum(torch.minimum(x, left + ww - 1), left)
        y = torch.maximum(torch.minimum(y, top + hh - 1), top)
    gx = (2 * x + 1) / w_in - 1
    gy = (2 * y + 1) / h_in - 1
    b = box_B4.shape[0]
    return torch.stack([gx.unsqueeze(1).expand(b, size, size), gy.unsqueeze(2).expand(b, size, size)], -1)


class BatchSimCLRAugment:
    """SimCLR's augmentations on a (B, 3, S, S) batch in [0, 1] (module docstring)."""

    TRIES = 10
    # Draws per sample: crop (area, aspect, top, left per try), flip, jitter gate, 4 factors,
    # 4 order keys, grayscale gate, blur gate, sigma.
    DRAWS = 4 * TRIES + 1 + 1 + 4 + 4 + 1 + 1 + 1

    def __init__(self, image_size: int, *, scale: tuple[float, float] = (0.2, 1.0)) -> None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"image_size: must be an integer >= 8, got {image_size!r}")
        self.size = image_size
        self.scale = scale
        self.ratio = (3 / 4, 4 / 3)
        self.kernel = max(3, 2 * (int(0.1 * image_size) // 2) + 1)
        self.sigma = (0.1, max(0.5, 2.0 * image_size / 224))

    def draws(self) -> int:
        return self.DRAWS

    def crop_boxes(self, u_BK: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """RandomResizedCrop.get_params, batched: (B, 4) top, left, height, width in pixels."""
        n = self.TRIES
        area = h * w
        target = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * u_BK[:, :n])
        log_r = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        aspect = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * u_BK[:, n : 2 * n])
        ww = torch.round(torch.sqrt(target * aspect))
        hh = torch.round(torch.sqrt(target / aspect))
        ok = (ww > 0) & (ww <= w) & (hh > 0) & (hh <= h)
        first = torch.where(ok.any(1), ok.float().argmax(1), torch.full_like(ok[:, 0], n, dtype=torch.long))
        has = first < n
        pick = first.clamp(max=n - 1).unsqueeze(1)
        ww = torch.where(has, ww.gather(1, pick).squeeze(1), torch.full_like(ww[:, 0], float(w)))
        hh = torch.where(has, hh.gather(1, pick).squeeze(1), torch.full_like(hh[:, 0], float(h)))
        # Position: randint(0, size - crop + 1) from the chosen try's own draws.
        top = torch.floor(u_BK[:, 2 * n : 3 * n].gather(1, pick).squeeze(1) * (h - hh + 1))
        left = torch.floor(u_BK[:, 3 * n : 4 * n].gather(1, pick).squeeze(1) * (w - ww + 1))
        top = torch.where(has, top, torch.zeros_like(top))
        left = torch.where(has, left, torch.zeros_like(left))
        return torch.stack([top, left, hh, ww], 1)

    def __call__(self, img_B3HW: torch.Tensor, u_BK: torch.Tensor) -> torch.Tensor:
        b, _, h, w = img_B3HW.shape
        n = self.TRIES
        u_BK = u_BK.to(img_B3HW.dtype)
        box = self.crop_boxes(u_BK, h, w)
        o = 4 * n
        flip = u_BK[:, o] < 0.5
        grid = _crop_flip_grid(box, flip, self.size, h, w)
        x = F.grid_sample(img_B3HW, grid, mode="bilinear", padding_mode="border", align_corners=False)
        x = self._color_jitter(x, u_BK[:, o + 1 : o + 10])
        gray = u_BK[:, o + 10] < 0.2
        x = torch.where(gray.view(-1, 1, 1, 1), _rgb_to_gray(x).expand_as(x), x)
        blur = u_BK[:, o + 11] < 0.5
        sigma = self.sigma[0] + (self.sigma[1] - self.sigma[0]) * u_BK[:, o + 12]
        x = torch.where(blur.view(-1, 1, 1, 1), self._blur(x, sigma), x)
        return x.clamp(0.0, 1.0)

    def _color_jitter(self, x: torch.Tensor, u_B9: torch.Tensor) -> torch.Tensor:
        """ColorJitter(0.4, 0.4, 0.4, 0.1) with p = 0.8: brightness, contrast, saturation and hue
        in a random order per sample (the order keys' argsort). At each of the four positions
        every op runs only on the samples that apply it there."""
        apply = u_B9[:, 0] < 0.8
        factors = 0.6 + 0.8 * u_B9[:, 1:4]  # brightness, contrast, saturation in [0.6, 1.4]
        hue = -0.1 + 0.2 * u_B9[:, 4]
        order = u_B9[:, 5:9].argsort(1)  # (B, 4): op applied at each position
        out = x.clone()
        for pos in range(4):
            for op in range(4):
                sel = torch.nonzero(apply & (order[:, pos] == op)).squeeze(1)
                if sel.numel() == 0:
                    continue
                y = out.index_select(0, sel)
                if op == 0:
                    y = (y * factors.index_select(0, sel)[:, 0].view(-1, 1, 1, 1)).clamp(0, 1)
                elif op == 1:
                    y = _blend(y, _rgb_to_gray(y).mean((1, 2, 3), keepdim=True), factors.index_select(0, sel)[:, 1])
                elif op == 2:
                    y = _blend(y, _rgb_to_gray(y), factors.index_select(0, sel)[:, 2])
                else:
                    y = _shift_hue(y, hue.index_select(0, sel))
                out.index_copy_(0, sel, y)
        return out

    def _blur(self, x: torch.Tensor, sigma_B: torch.Tensor) -> torch.Tensor:
        """Per-sample separable Gaussian blur with reflected borders (torchvision's padding)."""
        b, c, h, w = x.shape
        k = self.kernel
        half = (k - 1) / 2
        pos = torch.linspace(-half, half, k, device=x.device, dtype=x.dtype)
        kern_BK = torch.exp(-0.5 * (pos.view(1, -1) / sigma_B.view(-1, 1)) ** 2)
        kern_BK = kern_BK / kern_BK.sum(1, keepdim=True)
        weight = kern_BK.repeat_interleave(c, 0)  # (B*C, k)
        y = F.pad(x.reshape(1, b * c, h, w), (k // 2, k // 2, k // 2, k // 2), mode="reflect")
        y = F.conv2d(y, weight.view(b * c, 1, 1, k), groups=b * c)
        y = F.conv2d(y, weight.view(b * c, 1, k, 1), groups=b * c)
        return y.view(b, c, h, w)


class PairedAugment:
    """The ``light`` augmentation of paired data: images shifted by up to ``max_shift`` of their
    side (reflected borders) and flipped with p = 0.5; sounds louder or quieter by up to
    ± ``gain_db`` dB. Neither changes what an image and its sound share (the class, the object),
    and both stop a method from telling 'which pair' by exact pixels or exact level."""

    DRAWS = 4

    def __init__(self, *, max_shift: float = 0.125, gain_db: float = 6.0) -> None:
        if not 0 <= max_shift < 0.5:
            raise ValueError(f"max_shift: must be in [0, 0.5), got {max_shift}")
        if not 0 <= gain_db <= 40:
            raise ValueError(f"gain_db: must be in [0, 40], got {gain_db}")
        self.max_shift, self.gain_db = max_shift, gain_db

    def image(self, img_BCHW: torch.Tensor, u_BK: torch.Tensor) -> torch.Tensor:
        b, _, h, w = img_BCHW.shape
        u_BK = u_BK.to(img_BCHW.dtype)
        sh, sw = round(self.max_shift * h), round(self.max_shift * w)
        dy = torch.floor(u_BK[:, 0] * (2 * sh + 1)) - sh
        dx = torch.floor(u_BK[:, 1] * (2 * sw + 1)) - sw
        box = torch.stack([dy, dx, torch.full_like(dy, float(h)), torch.full_like(dx, float(w))], 1)
        grid = _crop_flip_grid(box, u_BK[:, 2] < 0.5, h, h, w, clamp=False) if h == w else None
        if grid is None:
            raise ValueError(f"image: PairedAugment expects square images, got {h}x{w}")
        return F.grid_sample(img_BCHW, grid, mode="nearest", padding_mode="reflection", align_corners=False)

    def sound(self, mel_BCFT: torch.Tensor, u_BK: torch.Tensor) -> torch.Tensor:
        gain_db = (2 * u_BK[:, 3].to(mel_BCFT.dtype) - 1) * self.gain_db
        # Power scales by 10^(g/10): the natural log-mel moves by g ln(10) / 10, then / LOGMEL_STD.
        return mel_BCFT + (gain_db * math.log(10) / 10 / LOGMEL_STD).view(-1, 1, 1, 1)
