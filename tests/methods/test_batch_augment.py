"""Batched, device-side augmentations: each equals its per-sample definition (torchvision's and
torchaudio's transforms) given the same random parameters, draws those parameters with the same
distribution, and is a pure function of (seed, stream, epoch, index)."""

import math

import pytest
import torch
import torchvision.transforms as T
from torchvision.transforms.v2 import functional as TF

from methods.data.augment import SpecAugment
from methods.data.batch_augment import (
    BatchSimCLRAugment,
    BatchSpecAugment,
    PairedAugment,
    _blend,
    _crop_flip_grid,
    _rgb_to_gray,
    _shift_hue,
    hashed_uniform,
)
from methods.data.logmel import LOGMEL_STD
from orchestrator.config import resolve
from orchestrator.loaders import DeviceAugment


def test_hashed_uniform_is_a_pure_function_of_seed_stream_epoch_index() -> None:
    idx = torch.arange(50_000)
    u = hashed_uniform(3, 1, 0, idx, 4)
    assert u.shape == (50_000, 4) and u.min() >= 0 and u.max() < 1
    # Uniform on [0, 1): mean 1/2, variance 1/12, draws uncorrelated.
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    assert torch.corrcoef(u.T).fill_diagonal_(0).abs().max() < 0.02
    # A sample's draws do not depend on the rest of its batch, nor on the global RNG.
    torch.manual_seed(99)
    assert torch.equal(hashed_uniform(3, 1, 0, idx[[7, 3, 40_000]], 4), u[[7, 3, 40_000]])
    for other in ((4, 1, 0), (3, 2, 0), (3, 1, 1)):  # seed, stream, epoch each change the draws
        assert (hashed_uniform(*other, idx[:1000], 4) != u[:1000]).float().mean() > 0.99


def test_spec_masks_match_torchaudio_in_distribution() -> None:
    n = 4000
    mel = torch.ones(n, 1, 40, 64)
    for f_param, t_param in ((10, 0), (0, 16)):
        torch.manual_seed(0)
        ref = SpecAugment(f_param, t_param, num_masks=1)(mel)
        aug = BatchSpecAugment(f_param, t_param, num_masks=1)
        out = aug(mel, hashed_uniform(0, 0, 0, torch.arange(n), aug.draws()))
        for x in (ref, out):
            assert set(x.unique().tolist()) <= {0.0, 1.0}
        masked_ref, masked_out = (ref == 0).flatten(1).sum(1).float(), (out == 0).flatten(1).sum(1).float()
        # Width floor(U * param): mean (param - 1) / 2 bins (times the other axis' length).
        other = 64 if f_param else 40
        expected = ((f_param or t_param) - 1) / 2 * other
        se = masked_ref.std().item() / math.sqrt(n)
        assert abs(masked_ref.mean().item() - expected) < 4 * se
        assert abs(masked_out.mean().item() - expected) < 4 * se
        # Where the masks fall: the per-bin masking rate agrees along the masked axis.
        dim = 2 if f_param else 3
        rate_ref = (ref == 0).float().mean((0, 1, 5 - dim))
        rate_out = (out == 0).float().mean((0, 1, 5 - dim))
        assert (rate_ref - rate_out).abs().max() < 0.03


def test_crop_boxes_match_random_resized_crop_in_distribution() -> None:
    n = 20_000
    aug = BatchSimCLRAugment(32)
    box = aug.crop_boxes(hashed_uniform(1, 0, 0, torch.arange(n), aug.draws()), 32, 32)
    torch.manual_seed(0)
    ref = torch.tensor([T.RandomResizedCrop.get_params(torch.zeros(3, 32, 32), (0.2, 1.0), (3 / 4, 4 / 3))
                        for _ in range(n)], dtype=torch.float32)  # (top, left, height, width)
    assert torch.equal(box, box.round()) and (box[:, 2:] >= 1).all() and (box[:, :2] + box[:, 2:] <= 32).all()
    for stat in (lambda b: b[:, 2] * b[:, 3], lambda b: b[:, 3] / b[:, 2], lambda b: b[:, 0], lambda b: b[:, 1]):
        a, r = stat(box), stat(ref)
        se = r.std().item() * math.sqrt(2 / n)
        assert abs(a.mean().item() - r.mean().item()) < 4 * se
        assert abs(a.std().item() - r.std().item()) < 0.03 * r.std().item()


def test_each_batched_op_equals_torchvision_per_sample() -> None:
    g = torch.Generator().manual_seed(0)
    img = torch.rand(6, 3, 32, 32, generator=g)
    # Crop + resize (+ flip): torchvision's resized_crop (bilinear, half-pixel centres).
    box = torch.tensor([[0, 0, 32, 32], [3, 5, 20, 17], [10, 2, 15, 30], [0, 0, 32, 32], [1, 1, 9, 11], [4, 0, 28, 32]],
                       dtype=torch.float32)
    flip = torch.tensor([False, False, True, True, False, True])
    out = torch.nn.functional.grid_sample(img, _crop_flip_grid(box, flip, 32, 32, 32), mode="bilinear",
                                          padding_mode="border", align_corners=False)
    for i in range(6):
        t, l, h, w = (int(v) for v in box[i])
        ref = TF.resized_crop(img[i], t, l, h, w, [32, 32], antialias=False)
        ref = TF.horizontal_flip(ref) if flip[i] else ref
        assert torch.allclose(out[i], ref, atol=1e-5), i
    # Colour: brightness, contrast, saturation, hue with per-sample factors.
    f = torch.tensor([0.6, 0.9, 1.0, 1.2, 1.4, 0.75])
    hue = torch.tensor([-0.1, -0.03, 0.0, 0.02, 0.07, 0.1])
    for i in range(6):
        x = img[i : i + 1]
        assert torch.allclose((x * f[i]).clamp(0, 1)[0], TF.adjust_brightness(img[i], float(f[i])), atol=1e-6)
        contrast = _blend(x, _rgb_to_gray(x).mean((1, 2, 3), keepdim=True), f[i : i + 1])
        assert torch.allclose(contrast[0], TF.adjust_contrast(img[i], float(f[i])), atol=1e-5)
        assert torch.allclose(_blend(x, _rgb_to_gray(x), f[i : i + 1])[0],
                              TF.adjust_saturation(img[i], float(f[i])), atol=1e-5)
        assert torch.allclose(_shift_hue(x, hue[i : i + 1])[0], TF.adjust_hue(img[i], float(hue[i])), atol=1e-5)
    # Blur: torchvision's gaussian_blur with the same kernel size and sigma.
    aug = BatchSimCLRAugment(32)
    sigma = torch.tensor([0.1, 0.3, 0.5, 0.2, 0.45, 0.15])
    blurred = aug._blur(img, sigma)
    for i in range(6):
        ref = TF.gaussian_blur(img[i], [aug.kernel, aug.kernel], [float(sigma[i])] * 2)
        assert torch.allclose(blurred[i], ref, atol=1e-5), i


def test_simclr_views_keep_range_and_differ_per_view_and_epoch() -> None:
    aug = BatchSimCLRAugment(32)
    img = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    idx = torch.arange(64)
    a = aug(img, hashed_uniform(0, 5, 0, idx, aug.draws()))
    assert a.shape == img.shape and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, aug(img, hashed_uniform(0, 5, 0, idx, aug.draws())))
    assert not torch.equal(a, aug(img, hashed_uniform(0, 6, 0, idx, aug.draws())))
    assert not torch.equal(a, aug(img, hashed_uniform(0, 5, 1, idx, aug.draws())))
    # Grayscale (p = 0.2) and colour jitter (p = 0.8) show up at about their rates.
    big = torch.rand(2000, 3, 8, 8)
    out = BatchSimCLRAugment(8)(big, hashed_uniform(0, 5, 0, torch.arange(2000), aug.draws()))
    gray = ((out[:, 0] - out[:, 1]).abs().amax((1, 2)) < 1e-6) & ((out[:, 1] - out[:, 2]).abs().amax((1, 2)) < 1e-6)
    assert 0.15 < gray.float().mean() < 0.25


def test_paired_augment_shifts_flips_and_changes_level_only() -> None:
    aug = PairedAugment()
    img = torch.rand(256, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    u = hashed_uniform(0, 1, 0, torch.arange(256), aug.DRAWS)
    out = aug.image(img, u)
    assert out.shape == img.shape
    # Every output pixel is an input pixel of the same channel (a shift with reflected borders).
    for i in range(0, 256, 37):
        assert set(out[i].flatten().tolist()) <= set(img[i].flatten().tolist())
    assert (out != img).flatten(1).any(1).float().mean() > 0.8
    mel = torch.randn(256, 1, 40, 64)
    s = aug.sound(mel, u)
    delta = (s - mel).flatten(1)
    assert torch.allclose(delta, delta[:, :1].expand_as(delta), atol=1e-5)  # one constant per clip
    bound = 6.0 * math.log(10) / 10 / LOGMEL_STD
    assert delta.abs().max() <= bound + 1e-6 and delta.abs().max() > 0.8 * bound
    with pytest.raises(ValueError, match="gain_db"):
        PairedAugment(gain_db=-1)


def test_device_augment_views_depend_on_seed_epoch_index_only() -> None:
    cfg = resolve({}, preset="tiny", overrides=["train.paired_augment=light", "seed=3"])
    augment = DeviceAugment(cfg)
    g = torch.Generator().manual_seed(0)
    raw = {"sound": torch.randn(16, 1, 40, 64, generator=g), "index": torch.arange(100, 116)}
    views = augment.unpaired_views("usound", raw, epoch=2)
    assert not torch.equal(views["usound"], views["usound_aug"])
    # The same samples in another order and another batch give the same views.
    perm = torch.randperm(16, generator=g)
    again = augment.unpaired_views("usound", {k: v[perm] for k, v in raw.items()}, epoch=2)
    assert torch.equal(again["usound"], views["usound"][perm])
    assert not torch.equal(augment.unpaired_views("usound", raw, epoch=3)["usound"], views["usound"])
    paired = {"image": torch.rand(16, 3, 32, 32, generator=g), "sound": raw["sound"], "index": raw["index"]}
    out = augment.paired_batch(paired, epoch=0)
    assert not torch.equal(out["image"], paired["image"]) and not torch.equal(out["sound"], paired["sound"])
    plain = DeviceAugment(resolve({}, preset="tiny"))
    assert plain.paired_batch(paired, epoch=0) is paired


def test_color_jitter_applies_each_samples_ops_in_its_own_order() -> None:
    """The batched jitter equals torchvision's four adjustments applied to each sample in the
    order its draws give, with its factors (or untouched when its p = 0.8 gate is off)."""
    aug = BatchSimCLRAugment(16)
    img = torch.rand(40, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    u = hashed_uniform(0, 9, 0, torch.arange(40), 9)
    out = aug._color_jitter(img, u)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(40):
        ref = img[i]
        if u[i, 0] < 0.8:
            factors = [float(0.6 + 0.8 * u[i, 1 + j]) for j in range(3)] + [float(-0.1 + 0.2 * u[i, 4])]
            for op in u[i, 5:9].argsort().tolist():
                ref = ops[op](ref, factors[op])
        assert torch.allclose(out[i], ref, atol=1e-5), i
