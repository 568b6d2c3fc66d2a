"""The procedural dataset and the augmentations: determinism, disjoint pools, shapes, shared
latent factors, config validation, and view pairs that are a pure function of
(seed, epoch, index)."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from methods.base import DataInfo
from methods.data import (
    CLASS_NAMES,
    POOLS,
    LogMel,
    ProceduralAV,
    DataConfig,
    SpecAugment,
    simclr_image_augment,
)

SMALL = DataConfig(
    paired_size=256,
    unpaired_sound_size=256,
    unpaired_image_size=256,
    train_size=256,
    test_size=256,
    val_size=256,
    transfer_train_size=256,
    transfer_test_size=256,
    cache_in_memory=False,
)
LABELLED = ("paired", "train", "test", "val", "transfer_train", "transfer_test")


@pytest.fixture(scope="module")
def av() -> ProceduralAV:
    return ProceduralAV(SMALL)


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.numpy().tobytes()).hexdigest()


def _assert_items_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --- determinism and disjointness ------------------------------------------------------------


@pytest.mark.parametrize("pool", POOLS)
def test_samples_are_a_pure_function_of_seed_pool_index(av: ProceduralAV, pool: str) -> None:
    fresh = ProceduralAV(SMALL)
    for i in (0, 7, 255):
        first = av.pool(pool)[i]
        _assert_items_equal(first, av.pool(pool)[i])
        _assert_items_equal(first, fresh.pool(pool)[i])


def test_cached_items_equal_generated_ones_and_are_not_shared() -> None:
    cached = ProceduralAV(dataclasses.replace(SMALL, cache_in_memory=True)).pool("paired")
    generated = ProceduralAV(SMALL).pool("paired")
    item = cached[3]
    item["image"].zero_()  # a caller editing its copy must not reach the cache
    _assert_items_equal(cached[3], generated[3])


def test_items_do_not_depend_on_pool_sizes(av: ProceduralAV) -> None:
    """A smaller pool is a prefix of a larger one (paired-data-volume ablations rely on it)."""
    bigger = ProceduralAV(dataclasses.replace(SMALL, paired_size=5000, unpaired_sound_size=9))
    _assert_items_equal(av.pool("paired")[17], bigger.pool("paired")[17])
    _assert_items_equal(av.pool("unpaired_sound")[8], bigger.pool("unpaired_sound")[8])


def test_seeds_give_different_samples(av: ProceduralAV) -> None:
    other = ProceduralAV(dataclasses.replace(SMALL, seed=1))
    for pool in ("paired", "unpaired_sound", "unpaired_image"):
        for key in ("image", "sound"):
            if key in av.pool(pool)[0]:
                assert not torch.equal(av.pool(pool)[0][key], other.pool(pool)[0][key])


def test_pools_are_disjoint(av: ProceduralAV) -> None:
    seen: dict[str, tuple[str, int]] = {}
    for pool in POOLS:
        ds = av.pool(pool)
        for i in range(200):
            item = ds[i]
            for key in ("image", "sound"):
                if key in item:
                    digest = _digest(item[key])
                    assert digest not in seen, f"{pool}[{i}].{key} repeats {seen[digest]}"
                    seen[digest] = (pool, i)


# --- shapes, keys, ranges --------------------------------------------------------------------


@pytest.mark.parametrize("pool", POOLS)
def test_item_layout(av: ProceduralAV, pool: str) -> None:
    c = SMALL
    ds = av.pool(pool)
    assert len(ds) == getattr(c, f"{pool}_size")
    item = ds[5]
    expected = {"unpaired_sound": {"sound", "index"}, "unpaired_image": {"image", "index"}}
    assert set(item) == expected.get(pool, {"image", "sound", "label", "index"})
    if "image" in item:
        img = item["image"]
        assert img.shape == (3, c.image_size, c.image_size) and img.dtype == torch.float32
        assert img.min() >= 0.0 and img.max() <= 1.0
    if "sound" in item:
        mel = item["sound"]
        assert mel.shape == (1, c.n_mels, c.n_frames) and mel.dtype == torch.float32
        assert torch.isfinite(mel).all()
    if "label" in item:
        assert item["label"].dtype == torch.int64 and item["label"].dim() == 0
        assert 0 <= int(item["label"]) < c.num_classes
    assert item["index"].dtype == torch.int64 and int(item["index"]) == 5


def test_default_collate_and_normalisation(av: ProceduralAV) -> None:
    batch = next(iter(DataLoader(av.pool("paired"), batch_size=64)))
    assert batch["image"].shape == (64, 3, SMALL.image_size, SMALL.image_size)
    assert batch["sound"].shape == (64, 1, SMALL.n_mels, SMALL.n_frames)
    assert batch["label"].shape == batch["index"].shape == (64,)
    # Fixed constants map the main domain's log-mels to roughly zero mean, unit variance.
    assert abs(float(batch["sound"].mean())) < 0.5
    assert 0.6 < float(batch["sound"].std()) < 1.5


def test_labels_balanced_and_classes_limited() -> None:
    av3 = ProceduralAV(dataclasses.replace(SMALL, num_classes=3))
    labels = [av3.label("train", i) for i in range(30)]
    assert sorted(labels) == [0] * 10 + [1] * 10 + [2] * 10
    assert {int(av3.pool("train")[i]["label"]) for i in range(12)} <= {0, 1, 2}
    assert len(CLASS_NAMES) == 10 and len(set(CLASS_NAMES)) == 10


def test_pool_errors(av: ProceduralAV) -> None:
    with pytest.raises(ValueError, match="pool: unknown pool 'valid'"):
        av.pool("valid")
    with pytest.raises(IndexError):
        av.pool("test")[SMALL.test_size]


def test_info(av: ProceduralAV) -> None:
    info = av.info()
    assert isinstance(info, DataInfo)
    assert (info.image_size, info.n_mels, info.n_frames) == (32, 40, 64)
    assert (info.num_classes, info.paired_size, info.unpaired_sound_size) == (10, 256, 256)
    assert (info.image_channels, info.sound_channels) == (3, 1)


def test_waveform_goes_through_the_same_front_end(av: ProceduralAV) -> None:
    wave_T = av.waveform("paired", 4)
    assert wave_T.shape == (SMALL.clip_samples,) and wave_T.dtype == torch.float32
    assert torch.equal(av.logmel(wave_T), av.pool("paired")[4]["sound"])


def test_logmel_crops_and_pads_to_n_frames() -> None:
    front = LogMel(sample_rate=8000, n_mels=40, n_frames=64, clip_seconds=2.0)
    for n in (300, 9000, 16000, 40000):
        assert front(torch.randn(n) * 0.1).shape == (1, 40, 64)
    assert front(torch.randn(2, 16000)).shape == (1, 40, 64)


# --- shared latent factors -------------------------------------------------------------------


def _within_class_ranks(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Ranks scaled to [0, 1] inside each class, so pooling removes class effects."""
    out = np.empty_like(x, dtype=np.float64)
    for c in np.unique(labels):
        m = labels == c
        out[m] = np.argsort(np.argsort(x[m])) / max(1, m.sum() - 1)
    return out


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_image_and_sound_share_instance_factors(av: ProceduralAV) -> None:
    """Object size in the image goes with loudness of the sound, within each class."""
    items = [av.pool("train")[i] for i in range(200)]
    labels = np.array([int(it["label"]) for it in items])
    img_N3SS = torch.stack([it["image"] for it in items])
    mel_N1FT = torch.stack([it["sound"] for it in items])
    # Object area: pixels far from the background colour (median of the border pixels).
    border = torch.cat([img_N3SS[:, :, 0], img_N3SS[:, :, -1], img_N3SS[:, :, :, 0],
                        img_N3SS[:, :, :, -1]], dim=2)
    background = border.median(dim=2).values[:, :, None, None]
    area = ((img_N3SS - background).abs().amax(1) > 0.2).float().mean((1, 2)).numpy()
    loudness = mel_N1FT.flatten(1).quantile(0.9, dim=1).numpy()
    rho = _spearman(_within_class_ranks(area, labels), _within_class_ranks(loudness, labels))
    assert rho > 0.2, rho
    # The factors themselves are exposed for analysis and drive both modalities.
    size = np.array([av.latents("train", i)["size"] for i in range(200)])
    assert _spearman(size, area) > 0.4
    assert _spearman(_within_class_ranks(size, labels), _within_class_ranks(loudness, labels)) > 0.4


# --- config validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seed", -2),
        ("image_size", 8),
        ("sample_rate", 100),
        ("clip_seconds", 0.0),
        ("n_mels", 4),
        ("n_frames", 4),
        ("n_frames", 5000),
        ("num_classes", 1),
        ("num_classes", 11),
        ("paired_size", 0),
        ("unpaired_sound_size", -1),
        ("test_size", 0),
        ("val_size", -1),
        ("cache_in_memory", "yes"),
        ("image_size", 32.0),
        ("train_size", True),
    ],
)
def test_config_errors_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"^{field}: "):
        DataConfig(**{field: value})


def test_config_accepts_presets_and_empty_unpaired_pools() -> None:
    DataConfig(image_size=224, sample_rate=16000, n_mels=150, n_frames=200)
    cfg = DataConfig(unpaired_sound_size=0, unpaired_image_size=0, num_classes=2)
    assert len(ProceduralAV(cfg).pool("unpaired_sound")) == 0


# --- augmentations ---------------------------------------------------------------------------


def test_specaugment_masks_with_zero() -> None:
    torch.manual_seed(0)
    mel = torch.randn(1, 40, 64) + 5.0  # no zeros before masking
    out = SpecAugment(freq_mask=10, time_mask=16, num_masks=2)(mel)
    assert out.shape == mel.shape
    assert (out == 0).any() and torch.equal(out[out != 0], mel[out != 0])
    batch = SpecAugment(10, 16)(torch.randn(8, 1, 40, 64) + 5.0)
    masked = (batch == 0).flatten(1).sum(1)
    assert masked.unique().numel() > 1  # each sample gets its own masks
    with pytest.raises(ValueError, match="freq_mask"):
        SpecAugment(-1, 4)


def test_image_augment_keeps_shape_and_range() -> None:
    torch.manual_seed(0)
    aug = simclr_image_augment(32)
    img = torch.rand(3, 32, 32)
    outs = [aug(img) for _ in range(8)]
    for out in outs:
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
        assert out.min() >= 0.0 and out.max() <= 1.0
    assert not torch.equal(outs[0], outs[1])
    assert simclr_image_augment(224)(torch.rand(3, 224, 224)).shape == (3, 224, 224)


