"""Binaural procedural scenes: rotation of the panorama is rotation of the scene, interaural
differences follow the formulas and flip under mirroring, events change over time, and the
dataset's items, determinism, pools and config checks."""

from __future__ import annotations

import dataclasses
import hashlib
import math

import numpy as np
import pytest
import torch

from methods.data import (
    POOLS,
    BinauralScenes,
    ProceduralAV,
    DataConfig,
    Scene,
    SceneObject,
    binaural_render,
    build_dataset,
    rotate_panorama,
)
from methods.data.binaural import interaural_differences

SMALL = DataConfig(
    binaural=True,
    paired_size=64,
    unpaired_sound_size=64,
    unpaired_image_size=64,
    train_size=64,
    test_size=64,
    val_size=64,
    transfer_train_size=64,
    transfer_test_size=64,
    cache_in_memory=False,
)
W = SMALL.panorama_width
H = SMALL.image_size


@pytest.fixture(scope="module")
def scenes() -> BinauralScenes:
    return BinauralScenes(SMALL)


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.numpy().tobytes()).hexdigest()


def _three_objects(main_az: float, domain: str = "main") -> Scene:
    """A scene with the main object on the column grid and two off-grid others."""
    return Scene(
        objects=(
            SceneObject(2, main_az, size=0.8, brightness=0.7, texture=0.3),
            SceneObject(4, 101.3, size=0.3, level_db=-8.0),
            SceneObject(7, 313.9, size=0.5, level_db=-11.0),
        ),
        domain=domain,
        offset=30 * 360.0 / W,
        seed=(7, 1),
    )


# --- rotation --------------------------------------------------------------------------------


def test_rotate_panorama_is_a_circular_shift_and_batches_match_per_sample_rolls() -> None:
    img_BCHW = torch.rand(5, 3, 4, 16)
    for rotations in (2, 4, 8):
        step = 16 // rotations
        for k in range(-1, rotations + 1):
            expected = torch.roll(img_BCHW[0], k * step, dims=-1)
            assert torch.equal(rotate_panorama(img_BCHW[0], k, rotations), expected)
            assert torch.equal(rotate_panorama(img_BCHW[0], torch.tensor(k), rotations), expected)
        k_B = torch.tensor([0, 1, rotations - 1, 3, -2])
        batched = rotate_panorama(img_BCHW, k_B, rotations)
        for b in range(5):
            assert torch.equal(batched[b], torch.roll(img_BCHW[b], int(k_B[b]) * step, dims=-1))
    # Content moves right: column 0 goes to column W / R.
    row = torch.arange(8.0).view(1, 1, 8)
    assert rotate_panorama(row, 1, 4)[0, 0].tolist() == [6, 7, 0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="^rotations: panorama width 16 is not a multiple of 3"):
        rotate_panorama(img_BCHW, 1, 3)
    with pytest.raises(ValueError, match="^k: "):
        rotate_panorama(img_BCHW, torch.tensor([1, 2]), 4)


@pytest.mark.parametrize("rotations", [2, 4, 8])
@pytest.mark.parametrize("domain", ["main", "other", "transfer"])
def test_rotating_the_scene_is_rotating_the_panorama(
    scenes: BinauralScenes, rotations: int, domain: str
) -> None:
    theta = 37 * 360.0 / W  # on the column grid
    scene = _three_objects(theta, domain)
    img, mask = scenes.render_image(scene)
    for k in range(1, rotations):
        turned = scene.rotated(k * 360.0 / rotations)
        assert turned.main.azimuth == pytest.approx((theta + k * 360.0 / rotations) % 360.0)
        img_k, mask_k = scenes.render_image(turned)
        torch.testing.assert_close(img_k, rotate_panorama(img, k, rotations), atol=1e-5, rtol=0)
        assert torch.equal(mask_k, rotate_panorama(mask, k, rotations))


def test_dataset_scenes_rotate_exactly(scenes: BinauralScenes) -> None:
    for i in range(4):
        scene = scenes.scene("paired", i)
        img, mask = scenes.render_image(scene)
        img_k, mask_k = scenes.render_image(scene.rotated(3 * 360.0 / 8))
        torch.testing.assert_close(img_k, rotate_panorama(img, 3, 8), atol=1e-5, rtol=0)
        assert torch.equal(mask_k, rotate_panorama(mask, 3, 8))


def test_a_single_objects_mask_lies_around_its_column(scenes: BinauralScenes) -> None:
    """A single object's mask lies within half a tile of its column, and follows it."""
    for theta_col in (0, 20, 64, 127):
        scene = Scene((SceneObject(5, theta_col * 360.0 / W, size=0.6),), seed=(3,))
        _, mask = scenes.render_image(scene)
        cols = torch.nonzero(mask[0].amax(0)).flatten()
        assert len(cols) > 0
        # Circular distance of every foreground column from the object's column position.
        dist = (cols.double() + 0.5 - theta_col + W / 2) % W - W / 2
        assert dist.abs().max() <= H / 2
        assert abs(float(dist.mean())) < H / 8


# --- interaural differences ------------------------------------------------------------------


def _xcorr_lag(left: np.ndarray, right: np.ndarray) -> float:
    """Lag tau (samples, parabolic interpolation) maximising sum_t left(t) right(t - tau)."""
    c = np.fft.irfft(np.fft.rfft(left) * np.conj(np.fft.rfft(right)), n=len(left))
    i = int(np.argmax(c))
    y0, y1, y2 = c[i - 1], c[i], c[(i + 1) % len(c)]
    lag = i + 0.5 * (y0 - y2) / (y0 - 2 * y1 + y2)
    return lag - len(c) if lag > len(c) / 2 else lag


@pytest.mark.parametrize("theta", [0.0, 20.0, 90.0, 135.0, 180.0, 200.0, 270.0, 333.0])
def test_mirrored_azimuth_swaps_the_ears(theta: float) -> None:
    x_T = np.random.default_rng(0).standard_normal(4000).astype(np.float32)
    out = binaural_render(x_T, theta, 8000)
    mirrored = binaural_render(x_T, (360.0 - theta) % 360.0, 8000)
    assert out.shape == (2, 4000) and out.dtype == np.float32
    np.testing.assert_allclose(mirrored, out[::-1], atol=1e-7, rtol=0)
    if theta in (0.0, 180.0):
        assert np.array_equal(out[0], out[1])


@pytest.mark.parametrize("theta", [30.0, 90.0, 135.0, 250.0, 300.0])
def test_measured_itd_and_ild_follow_the_formulas(theta: float) -> None:
    sr = 48000  # ITD up to ~12 samples: resolvable by cross-correlation
    # Noise below 4 kHz: a broad correlation peak, which parabolic interpolation locates to
    # ~0.01 samples (white noise's sinc-shaped peak biases it by ~0.1).
    x_Z = np.fft.rfft(np.random.default_rng(1).standard_normal(sr // 2))
    x_Z[np.fft.rfftfreq(sr // 2, 1.0 / sr) > 4000.0] = 0.0
    x_T = np.fft.irfft(x_Z, n=sr // 2)
    left, right = binaural_render(x_T, theta, sr)
    s = math.sin(math.radians(theta))
    itd_samples = 0.0875 / 343.0 * s * sr
    lag = _xcorr_lag(left, right)
    assert np.sign(lag) == np.sign(s)
    assert lag == pytest.approx(itd_samples, abs=0.02)
    ild_db = 10 * math.log10(np.sum(right**2) / np.sum(left**2))
    assert np.sign(ild_db) == np.sign(s)
    assert ild_db == pytest.approx(10.0 * s, abs=0.05)
    itd, ild = interaural_differences(theta)
    assert float(itd) == pytest.approx(itd_samples / sr) and float(ild) == pytest.approx(10 * s)


def test_whole_sample_itd_is_a_circular_shift_of_each_ear() -> None:
    """Closed form: an ITD of 4 samples at 90 degrees puts the left ear 2 samples late and the
    right one 2 samples early, scaled by 10 ** (-+ILD / 40)."""
    sr, c = 8000, 343.0
    x_T = np.random.default_rng(2).standard_normal(1000)
    out = binaural_render(x_T, 90.0, sr, head_radius=4 / sr * c, speed_of_sound=c, max_ild_db=6.0)
    np.testing.assert_allclose(out[0], 10 ** (-6 / 40) * np.roll(x_T, 2), atol=1e-5)
    np.testing.assert_allclose(out[1], 10 ** (6 / 40) * np.roll(x_T, -2), atol=1e-5)


def test_scene_sound_is_louder_on_the_side_of_the_main_object(scenes: BinauralScenes) -> None:
    for seed in range(3):
        right = Scene((SceneObject(1, 90.0, size=0.8),), seed=(seed,))
        left = dataclasses.replace(right, objects=(SceneObject(1, 270.0, size=0.8),))
        env_T = torch.from_numpy(scenes.activity(right)[0]) > 0.5
        for scene, sign in ((right, 1.0), (left, -1.0)):
            wave_2T = scenes.render_waveform(scene)[:, env_T]
            ratio_db = 10 * math.log10(float(wave_2T[1].square().sum() / wave_2T[0].square().sum()))
            assert sign * ratio_db > 3.0  # 10 dB on the object, diluted by clutter and noise
            mel = scenes.render_sound(scene)
            assert sign * float(mel[1].mean() - mel[0].mean()) > 0.0


# --- events over time ------------------------------------------------------------------------


def test_events_switch_on_and_off_so_slices_differ(scenes: BinauralScenes) -> None:
    n = SMALL.n_frames
    centre_N = np.arange(n) * scenes.logmel.hop_length + scenes.logmel.n_fft // 2
    gain_db, slice_gaps = [], []
    for i in range(12):
        scene = scenes.scene("paired", i)
        env_KT = scenes.activity(scene)
        assert env_KT.shape == (len(scene.objects), SMALL.clip_samples)
        main_T = env_KT[0]
        assert 0.3 < float((main_T > 0.5).mean()) < 0.85  # on for part of the clip only
        assert main_T.min() == 0.0 and main_T.max() == 1.0
        # Samples where the main object sounds against samples where no object does.
        power_T = scenes.render_waveform(scene).square().sum(0).numpy()
        on, off = main_T > 0.99, env_KT.max(0) < 0.01
        gain_db.append(10 * math.log10(power_T[on].mean() / power_T[off].mean()))
        # A slice where the main object sounds against one where it is silent.
        mel = scenes.pool("paired")[i]["sound"]
        frame_on_N = main_T[centre_N] > 0.99
        frame_off_N = main_T[centre_N] < 0.01
        first_on, first_off = np.argmax(frame_on_N), np.argmax(frame_off_N)
        a, b = mel[..., first_on:first_on + 4], mel[..., first_off:first_off + 4]
        if frame_on_N[first_on:first_on + 4].all() and frame_off_N[first_off:first_off + 4].all():
            slice_gaps.append(float((a - b).abs().mean()))
    # Clutter (distractor events, diffuse noise) can fill a gap, but not usually.
    assert np.median(gain_db) > 6.0 and np.mean(np.asarray(gain_db) > 0.0) >= 0.8, gain_db
    assert len(slice_gaps) >= 8 and np.median(slice_gaps) > 0.3, slice_gaps
    onsets = [int(np.argmax(scenes.activity(scenes.scene("paired", i))[0] > 0.5))
              for i in range(10)]
    assert len(set(onsets)) > 5  # onsets at random times


# --- the dataset -----------------------------------------------------------------------------


@pytest.mark.parametrize("pool", POOLS)
def test_item_layout(scenes: BinauralScenes, pool: str) -> None:
    ds = scenes.pool(pool)
    assert len(ds) == getattr(SMALL, f"{pool}_size")
    item = ds[5]
    expected = {
        "unpaired_sound": {"sound", "index"},
        "unpaired_image": {"image", "mask", "index"},
    }.get(pool, {"image", "mask", "sound", "label", "azimuth", "sector", "index"})
    assert set(item) == expected
    if "image" in item:
        img, mask = item["image"], item["mask"]
        assert img.shape == (3, H, W) and img.dtype == torch.float32
        assert img.min() >= 0.0 and img.max() <= 1.0
        assert mask.shape == (1, H, W) and mask.dtype == torch.float32
        assert set(mask.unique().tolist()) <= {0.0, 1.0} and mask.sum() > 0
    if "sound" in item:
        mel = item["sound"]
        assert mel.shape == (2, SMALL.n_mels, SMALL.n_frames) and mel.dtype == torch.float32
        assert torch.isfinite(mel).all() and not torch.equal(mel[0], mel[1])
    if "label" in item:
        assert item["label"].dtype == torch.int64 and item["label"].dim() == 0
        assert 0 <= int(item["label"]) < SMALL.num_classes
        assert item["azimuth"].dtype == torch.float32 and 0.0 <= float(item["azimuth"]) < 360.0
        assert item["sector"].dtype == torch.int64
    assert item["index"].dtype == torch.int64 and int(item["index"]) == 5


def test_targets_match_the_scene(scenes: BinauralScenes) -> None:
    ds = scenes.pool("train")
    sectors = SMALL.azimuth_sectors
    labels = []
    for i in range(40):
        item, scene = ds[i], scenes.scene("train", i)
        az = float(item["azimuth"])
        assert int(item["label"]) == scene.main.cls == scenes.label("train", i)
        assert az == scene.main.azimuth and (az * W / 360.0) == round(az * W / 360.0)
        assert int(item["sector"]) == math.floor(az / (360.0 / sectors))
        assert 1 <= len(scene.objects) <= SMALL.max_objects
        assert len({o.cls for o in scene.objects}) == len(scene.objects)
        assert all(-12.0 <= o.level_db <= -6.0 for o in scene.objects[1:])
        # The foreground mask covers the main object around its column.
        col = round(az * W / 360.0)
        near = item["mask"][0][:, [(col + d) % W for d in range(-2, 2)]]
        assert near.sum() > 0
        labels.append(int(item["label"]))
    assert sorted(labels[:30]) == sorted(list(range(10)) * 3)  # balanced per block
    assert len({int(ds[i]["sector"]) for i in range(40)}) >= 6


def test_samples_are_a_pure_function_of_seed_pool_index(scenes: BinauralScenes) -> None:
    fresh = BinauralScenes(SMALL)
    cached = BinauralScenes(dataclasses.replace(SMALL, cache_in_memory=True))
    for pool in ("paired", "unpaired_sound", "transfer_test"):
        for i in (0, 9):
            a, b, c = scenes.pool(pool)[i], fresh.pool(pool)[i], cached.pool(pool)[i]
            for key in a:
                assert torch.equal(a[key], b[key]) and torch.equal(a[key], c[key]), key
    item = cached.pool("paired")[0]
    item["image"].zero_()  # editing a returned item must not reach the cache
    assert torch.equal(cached.pool("paired")[0]["image"], scenes.pool("paired")[0]["image"])
    other_seed = BinauralScenes(dataclasses.replace(SMALL, seed=1))
    assert not torch.equal(other_seed.pool("paired")[0]["sound"], scenes.pool("paired")[0]["sound"])


def test_pools_differ_and_domains_follow_the_pools(scenes: BinauralScenes) -> None:
    seen: dict[str, tuple[str, int]] = {}
    for pool in POOLS:
        for i in range(8):
            item = scenes.pool(pool)[i]
            for key in ("image", "sound"):
                if key in item:
                    digest = _digest(item[key])
                    assert digest not in seen, f"{pool}[{i}].{key} repeats {seen[digest]}"
                    seen[digest] = (pool, i)
    domains = {pool: scenes.scene(pool, 0).domain for pool in POOLS}
    assert domains == {"paired": "main", "train": "main", "test": "main", "val": "main",
                       "unpaired_sound": "other", "unpaired_image": "other",
                       "transfer_train": "transfer", "transfer_test": "transfer"}


def test_info_and_build_dataset_dispatch() -> None:
    data = build_dataset(SMALL)
    assert isinstance(data, BinauralScenes)
    info = data.info()
    assert (info.sound_channels, info.image_channels, info.image_size) == (2, 3, H)
    assert (info.n_mels, info.n_frames, info.num_classes) == (SMALL.n_mels, SMALL.n_frames, 10)
    assert info.paired_size == SMALL.paired_size
    mono = build_dataset(dataclasses.replace(SMALL, binaural=False))
    assert isinstance(mono, ProceduralAV) and mono.info().sound_channels == 1


def test_mono_dataset_ignores_the_binaural_fields() -> None:
    base = dataclasses.replace(SMALL, binaural=False)
    changed = dataclasses.replace(base, panorama_width=64, azimuth_sectors=4, max_objects=4)
    a, b = ProceduralAV(base), ProceduralAV(changed)
    for pool in ("paired", "unpaired_image"):
        for key, value in a.pool(pool)[3].items():
            assert torch.equal(value, b.pool(pool)[3][key]), key
    assert a.pool("paired")[3]["image"].shape == (3, H, H)
    # A mono preset with large images needs no panorama as wide.
    DataConfig(image_size=224, sample_rate=16000, n_mels=150, n_frames=200)


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"binaural": 1}, "binaural"),
        ({"panorama_width": 100}, "panorama_width"),
        ({"panorama_width": 8}, "panorama_width"),
        ({"panorama_width": 24, "binaural": True}, "panorama_width"),
        ({"azimuth_sectors": 1}, "azimuth_sectors"),
        ({"azimuth_sectors": 37}, "azimuth_sectors"),
        ({"azimuth_sectors": 5}, "azimuth_sectors"),
        ({"max_objects": 0}, "max_objects"),
        ({"max_objects": 5}, "max_objects"),
        ({"glide_octaves": -0.5}, "glide_octaves"),
        ({"glide_octaves": 2.5}, "glide_octaves"),
        ({"glide_octaves": float("inf")}, "glide_octaves"),
        ({"glide_octaves": True}, "glide_octaves"),
        ({"glide_octaves": 1.0, "binaural": False}, "glide_octaves"),
        ({"glide_octaves": 1.0, "manifest": "data.csv"}, "glide_octaves"),
    ],
)
def test_config_errors_name_the_field(changes: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        dataclasses.replace(SMALL, **changes)


def test_scene_checks() -> None:
    with pytest.raises(ValueError, match="^objects: classes must be distinct"):
        Scene((SceneObject(1, 0.0), SceneObject(1, 90.0)))
    with pytest.raises(ValueError, match="^domain: "):
        Scene((SceneObject(1, 0.0),), domain="moon")
    with pytest.raises(ValueError, match="^level_db: "):
        SceneObject(1, 0.0, level_db=3.0)


# --- class glides (data.glide_octaves) -----------------------------------------------------------


def _peak_hz(x_T: np.ndarray, sr: int) -> float:
    mag = np.abs(np.fft.rfft(x_T * np.hanning(x_T.shape[0]), n=16 * x_T.shape[0]))
    return float(np.argmax(mag)) * sr / (16 * x_T.shape[0])


@pytest.mark.parametrize("octaves", [-2.0, -1.0, 0.5, 1.0, 2.0])
def test_glide_moves_a_tones_pitch_by_its_octaves_over_the_clip_without_aliasing(octaves: float) -> None:
    from methods.data.sounds import glide

    sr, n = 8000, 16000
    t_T = np.arange(n) / sr
    tone_T = np.sin(2 * np.pi * 500.0 * t_T).astype(np.float32)
    out_T = glide(tone_T, octaves)
    assert out_T.dtype == np.float32 and out_T.shape == (n,)
    # The reading speed at u is r ln2 2^(r u) / (2^r - 1): the pitch of the first and last tenth.
    speed = lambda u: octaves * math.log(2) * 2 ** (octaves * u) / (2 ** octaves - 1)  # noqa: E731
    tenth = n // 10
    for u, part in ((0.05, out_T[:tenth]), (0.95, out_T[-tenth:])):
        assert _peak_hz(part, sr) == pytest.approx(500.0 * speed(u), rel=0.04)
    # A tone that the fastest reading would carry past Nyquist is removed, not folded back.
    high_T = np.sin(2 * np.pi * 3000.0 * t_T).astype(np.float32)
    fastest = max(speed(0.0), speed(1.0))
    if fastest > 4000 / 3000:
        assert np.sqrt(np.mean(glide(high_T, octaves) ** 2)) < 0.02
    assert glide(tone_T, 0.0) is tone_T


def test_each_class_glides_by_its_own_octaves_and_no_glide_leaves_every_scene_as_it_was(
        scenes: BinauralScenes) -> None:
    gliding = BinauralScenes(dataclasses.replace(SMALL, glide_octaves=1.5))
    octaves = [gliding.glide_octaves(k) for k in range(SMALL.num_classes)]
    assert octaves[0] == -1.5 and octaves[-1] == 1.5 and np.all(np.diff(octaves) > 0)
    assert [scenes.glide_octaves(k) for k in range(SMALL.num_classes)] == [0.0] * SMALL.num_classes
    # Without glides the scenes are those of a config without the field (digests fixed by the
    # default config's own items); with them, the sound changes and the image does not.
    plain = BinauralScenes(DataConfig(**{f.name: getattr(SMALL, f.name) for f in dataclasses.fields(SMALL)
                                               if f.name != "glide_octaves"}))
    a, b, c = plain.pool("paired")[5], scenes.pool("paired")[5], gliding.pool("paired")[5]
    assert _digest(a["sound"]) == _digest(b["sound"]) and _digest(a["image"]) == _digest(c["image"])
    assert not torch.equal(a["sound"], c["sound"])
    # In a one-object scene, the sound's pitch (mean log-frequency of the frames where the object
    # sounds, against time) rises by about the class's octaves more than without the glide: up for
    # the last class, down for the first.
    def course(data: BinauralScenes, cls: int, seed: int) -> float:
        scene = Scene((SceneObject(cls, 90.0, size=0.5, brightness=0.5, texture=0.5),), seed=(seed, 1))
        on_T, wave_T = data.activity(scene)[0], data.render_waveform(scene)[0].numpy()
        times, pitch = [], []
        for start in range(0, wave_T.shape[0] - 256, 128):
            if on_T[start:start + 256].min() == 1.0:
                power = np.abs(np.fft.rfft(wave_T[start:start + 256] * np.hanning(256)))[1:] ** 2
                pitch.append(float((power * np.log2(np.arange(1, power.shape[0] + 1))).sum() / power.sum()))
                times.append(start / wave_T.shape[0])
        return float(np.polyfit(times, pitch, 1)[0])

    for cls, sign in ((SMALL.num_classes - 1, 1.0), (0, -1.0)):
        change = np.mean([course(gliding, cls, seed) - course(scenes, cls, seed) for seed in range(4)])
        assert 0.5 < sign * change < 2.0, (cls, change)
