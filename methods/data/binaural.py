"""Binaural procedural scenes: a 360° image strip and two-channel sound (Multi-SSL, paper 004).

A scene holds 1..``max_objects`` objects of distinct classes around a listener; the first one is
the *main* object: the loudest, drawn on top, and the one the ``label``, ``azimuth`` and
``sector`` targets describe. Each object reuses the class prototypes of the mono procedural
dataset (``methods.data.procedural``): its image is that dataset's object drawn on a square
tile of the panorama's height, its sound that dataset's dry object sound, switched on and off
in random time segments (so two slices of one clip differ) and rendered binaurally at the
object's azimuth. A panoramic background, clutter, a directional distractor track, diffuse
noise and the domain's room complete a scene, with the same main / other / transfer domains as
the mono pools.

Conventions
  Azimuth   degrees in [0, 360): 0 = front, clockwise seen from above, so 90 = right,
            180 = behind, 270 = left.
  Image     column j of a W-column strip covers azimuths [j, j + 1) * 360 / W; an object at
            azimuth a is centred on the continuous column position a * W / 360 (the main
            object's azimuth is a multiple of 360 / W, so it sits on a column boundary).
  Sound     channel 0 = left ear, channel 1 = right ear.
  ITD       head_radius / speed_of_sound * sin(a) seconds; positive = the right ear leads.
            Half of it goes to each ear: the right ear is advanced by ITD / 2 and the left one
            delayed by ITD / 2, as a circular fractional delay (an FFT phase shift).
  ILD       max_ild_db * sin(a) dB; positive = the right ear is louder. Split symmetrically:
            right gain 10 ** (ILD / 40), left gain 10 ** (-ILD / 40).
  Diffuse   background noise has the same spectrum and level on both ears but is drawn from
            two different noise clips, so it is uncorrelated between the ears.

Everything in the panorama is a function of azimuths: objects, clutter and background are
placed relative to the scene's azimuths and ``offset``, and the pixel noise is rolled with the
offset, so ``scene.rotated(k * 360 / R)`` renders exactly ``rotate_panorama(image, k, R)``.

Every sample is a pure function of (seed, pool, index): its streams start from
``SeedSequence([seed, pool id, index, _BINAURAL_TAG])``, the mono scheme plus a tag word, so
binaural samples share no stream with mono ones.

Legend: B batch, C channels, H image height (= image_size), W panorama width, T waveform
samples, K sources, Z rfft bins (T // 2 + 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import torch

from methods.data.config import DataConfig
from methods.data.images import ImageRenderer, hsv, object_radius
from methods.data.logmel import LogMel
from methods.data.pools import CLASS_NAMES, POOL_DOMAIN, POOL_ID, SyntheticAV, check_pool
from methods.data.prototypes import BACKGROUND_SATURATION, DOMAINS, Domain
from methods.data.sounds import BANK_CLIPS, SoundSynth, glide

__all__ = [
    "BinauralScenes",
    "Scene",
    "SceneObject",
    "binaural_render",
    "interaural_differences",
    "rotate_panorama",
]

# A fourth entropy word: binaural streams never coincide with the mono ones ([seed, pool, index]
# is padded with a zero word by SeedSequence, so the tag must be non-zero).
_BINAURAL_TAG = 0x62696E  # "bin"
# Child streams of one scene (SeedSequence spawn keys).
_LAYOUT, _IMAGE, _SOUND, _ACTIVITY = 0, 1, 2, 3

_KEYS: dict[str, tuple[str, ...]] = {
    "paired": ("image", "mask", "sound", "label", "azimuth", "sector", "index"),
    "unpaired_sound": ("sound", "index"),
    "unpaired_image": ("image", "mask", "index"),
    "train": ("image", "mask", "sound", "label", "azimuth", "sector", "index"),
    "test": ("image", "mask", "sound", "label", "azimuth", "sector", "index"),
    "transfer_train": ("image", "mask", "sound", "label", "azimuth", "sector", "index"),
    "transfer_test": ("image", "mask", "sound", "label", "azimuth", "sector", "index"),
    "val": ("image", "mask", "sound", "label", "azimuth", "sector", "index"),
}

HEAD_RADIUS_M = 0.0875
SPEED_OF_SOUND_M_S = 343.0
MAX_ILD_DB = 10.0
_MAIN_RMS = 0.1  # main object's RMS while active, at size latent 0.5
_OTHER_LEVEL_DB = (-12.0, -6.0)  # the other objects' levels relative to the main one
_ACTIVE_FRACTION = {"main": (0.4, 0.8), "other": (0.2, 0.7)}  # per time segment
_RAMP_S = 0.02  # on / off ramps of an activity segment
# The mono dataset's distractor events, at half their level: they sit at one azimuth, and at
# full level they would often drown the main object's interaural cues.
_DISTRACTOR_GAIN = 0.5
_MASK_COVERAGE = 0.5  # a pixel is foreground where an object covers at least this much of it


# --- scenes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene: class, azimuth (degrees), the latents its image and sound share
    (as in the mono dataset, each in [0, 1]) and its level relative to the main object."""

    cls: int
    azimuth: float
    size: float = 0.5
    brightness: float = 0.5
    texture: float = 0.5
    level_db: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.cls < len(CLASS_NAMES):
            raise ValueError(f"cls: must be in 0..{len(CLASS_NAMES) - 1}, got {self.cls}")
        for name in ("size", "brightness", "texture"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: must be in [0, 1], got {getattr(self, name)}")
        if self.level_db > 0.0:
            raise ValueError(f"level_db: must be <= 0 (relative to the main), got {self.level_db}")

    @property
    def latent(self) -> dict[str, float]:
        return {"size": self.size, "brightness": self.brightness, "texture": self.texture}


@dataclass(frozen=True)
class Scene:
    """Everything a binaural sample is rendered from.

    ``objects[0]`` is the main object. ``offset`` is the azimuth (degrees) that the background,
    the clutter and the distractor track are placed relative to, and rolls the pixel noise by
    ``round(offset * W / 360)`` columns. ``seed`` is the entropy of the scene's image, sound and
    activity streams (details that do not move with rotation: colours, textures, clutter
    shapes, synthesis draws).
    """

    objects: tuple[SceneObject, ...]
    domain: str = "main"
    offset: float = 0.0
    seed: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        if not self.objects:
            raise ValueError("objects: a scene needs at least one object")
        if len({o.cls for o in self.objects}) != len(self.objects):
            raise ValueError(f"objects: classes must be distinct, got "
                             f"{[o.cls for o in self.objects]}")
        if self.domain not in DOMAINS:
            raise ValueError(f"domain: unknown domain {self.domain!r}; choose one of "
                             f"{', '.join(DOMAINS)}")

    @property
    def main(self) -> SceneObject:
        return self.objects[0]

    def rotated(self, degrees: float) -> Scene:
        """The same scene turned by ``degrees`` clockwise: every azimuth and the offset move.
        With ``degrees`` a multiple of 360 / W its panorama is the rolled panorama."""
        objects = tuple(replace(o, azimuth=(o.azimuth + degrees) % 360.0) for o in self.objects)
        return replace(self, objects=objects, offset=(self.offset + degrees) % 360.0)


def _stream(scene: Scene, key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(scene.seed,
                                                                      spawn_key=(key,))))


# --- binaural rendering ----------------------------------------------------------------------


def _sin_deg(azimuth_deg: np.ndarray) -> np.ndarray:
    """sin of angles in degrees, odd and exact at multiples of 90 degrees: folding into
    [0, 90] makes sin(0) = sin(180) = 0 exactly and sin(-a) = -sin(a), so mirrored scenes
    give exactly swapped channels."""
    a = np.mod(np.asarray(azimuth_deg, dtype=np.float64), 360.0)
    sign = np.where(a >= 180.0, -1.0, 1.0)
    a = np.where(a >= 180.0, a - 180.0, a)
    a = np.minimum(a, 180.0 - a)
    return sign * np.sin(np.deg2rad(a))


def interaural_differences(azimuth_deg: float | np.ndarray, *, head_radius: float = HEAD_RADIUS_M,
                           speed_of_sound: float = SPEED_OF_SOUND_M_S,
                           max_ild_db: float = MAX_ILD_DB) -> tuple[np.ndarray, np.ndarray]:
    """(ITD seconds, ILD dB) at ``azimuth_deg``; both positive for sources on the right.

    ITD = head_radius / speed_of_sound * sin(a) (the sine law of a two-point head, not the
    Woodworth spherical-head formula), ILD = max_ild_db * sin(a) (broadband, no head shadow).
    """
    s = _sin_deg(azimuth_deg)
    return (head_radius / speed_of_sound) * s, max_ild_db * s


def _ear_filters(azimuth_K: np.ndarray, n: int, sample_rate: int, *, head_radius: float,
                 speed_of_sound: float, max_ild_db: float) -> np.ndarray:
    """(2, K, Z) complex transfer functions (left, right) of K sources for an n-sample rfft."""
    itd_K, ild_K = interaural_differences(azimuth_K, head_radius=head_radius,
                                          speed_of_sound=speed_of_sound, max_ild_db=max_ild_db)
    f_Z = np.fft.rfftfreq(n, 1.0 / sample_rate)
    # X(f) exp(-2 pi i f d) delays by d: the left ear by +ITD/2, the right one by -ITD/2.
    # cos and sin once for both ears, in float32 (25x faster than float64 here; relative error
    # ~1e-7); cos is even and sin odd, so a mirrored azimuth gives exactly the other ear's filter.
    phase_KZ = ((np.pi * itd_K)[:, None] * f_Z[None, :]).astype(np.float32)
    cos_KZ, sin_KZ = np.cos(phase_KZ), np.sin(phase_KZ)
    h_2KZ = np.empty((2, *phase_KZ.shape), dtype=np.complex128)
    for ear, gain_K, sign in ((0, 10.0 ** (-ild_K / 40.0), -1.0), (1, 10.0 ** (ild_K / 40.0), 1.0)):
        np.multiply(cos_KZ, gain_K[:, None], out=h_2KZ[ear].real)
        np.multiply(sin_KZ, sign * gain_K[:, None], out=h_2KZ[ear].imag)
    return h_2KZ


def binaural_render(source_T: np.ndarray, azimuth_deg: float, sample_rate: int, *,
                    head_radius: float = HEAD_RADIUS_M,
                    speed_of_sound: float = SPEED_OF_SOUND_M_S,
                    max_ild_db: float = MAX_ILD_DB) -> np.ndarray:
    """A mono source (T,) heard at ``azimuth_deg`` -> (2, T) (left, right) waveform.

    Interaural time and level differences only (``interaural_differences``): the right ear is
    advanced and the left one delayed by ITD / 2 each, with a circular FFT phase shift (the
    last ~ITD / 2 of the clip wraps to its start), and scaled by 10 ** (+-ILD / 40); the filter
    phases are computed in float32 (relative error ~1e-7). Rendering at (360 - a) mod 360 gives
    the channel-swapped output of rendering at a.
    """
    if source_T.ndim != 1:
        raise ValueError(f"source_T: expected a 1-D waveform, got shape {source_T.shape}")
    n = source_T.shape[0]
    h_2KZ = _ear_filters(np.asarray([azimuth_deg]), n, sample_rate, head_radius=head_radius,
                         speed_of_sound=speed_of_sound, max_ild_db=max_ild_db)
    x_Z = np.fft.rfft(source_T)
    out_2T = np.fft.irfft(h_2KZ[:, 0] * x_Z[None, :], n=n, axis=-1)
    return out_2T.astype(np.result_type(source_T.dtype, np.float32), copy=False)


# --- rotation --------------------------------------------------------------------------------


def rotate_panorama(image: torch.Tensor, k: int | torch.Tensor, rotations: int) -> torch.Tensor:
    """Turn a 360° strip (C, H, W) or a batch (B, C, H, W) by k * 360 / rotations degrees.

    A circular shift by k * W / rotations columns to the right: the content at azimuth a moves
    to a + k * 360 / rotations. ``k`` is an int (or 0-d tensor) for one shift of everything, or
    a (B,) tensor of per-sample shifts for a batch.
    """
    if rotations < 1:
        raise ValueError(f"rotations: must be >= 1, got {rotations}")
    w = image.shape[-1]
    if w % rotations:
        raise ValueError(f"rotations: panorama width {w} is not a multiple of {rotations}; a "
                         f"rotation by 360/{rotations} degrees must be whole columns")
    step = w // rotations
    if not torch.is_tensor(k) or k.dim() == 0:
        return torch.roll(image, shifts=int(k) * step, dims=-1)
    if image.dim() != 4 or k.shape != (image.shape[0],):
        raise ValueError(f"k: per-sample shifts need a (B,) tensor and a (B, C, H, W) batch, got "
                         f"k {tuple(k.shape)} and image {tuple(image.shape)}")
    shift_B = (k.to(device=image.device, dtype=torch.long) * step) % w
    # out[..., j] = image[..., j - shift], as torch.roll.
    src_BW = (torch.arange(w, device=image.device)[None, :] - shift_B[:, None]) % w
    return torch.gather(image, -1, src_BW[:, None, None, :].expand_as(image))


# --- image -----------------------------------------------------------------------------------


class _PanoramaRenderer:
    """Draws a (3, H, W) strip: panoramic background, clutter, objects on H x H tiles."""

    def __init__(self, height: int, width: int) -> None:
        self.h, self.w = height, width
        self.tile = ImageRenderer(height)
        self.col_W = np.arange(width, dtype=np.float64) + 0.5  # pixel centres, in columns
        self.phi_W = self.col_W * (2 * np.pi / width)  # and their azimuths, in radians
        self.y_H1 = self.tile.y_S1  # rows in half-sides, as the mono renderer's

    def render(self, scene: Scene) -> tuple[np.ndarray, np.ndarray]:
        """(image (3, H, W) in [0, 1], mask (1, H, W) in {0, 1}) of ``scene``."""
        rng = _stream(scene, _IMAGE)
        dom = DOMAINS[scene.domain]
        img_3HW = self._background(rng, dom, scene.offset)
        self._clutter(rng, dom, scene.offset, img_3HW)
        mask_HW = np.zeros((self.h, self.w), dtype=np.float32)
        q_KQ = rng.random((len(scene.objects), 10)).tolist()
        # Back to front: the main object last, on top.
        for obj, q in reversed(list(zip(scene.objects, q_KQ))):
            margin = 1.0 - 0.7 * object_radius(obj.latent)
            cy = (2 * q[1] - 1) * margin
            # The tile spans columns start .. start + H - 1; its centre (x = 0) lies at column
            # position start + H / 2, which is the object's position up to a sub-pixel cx.
            c = obj.azimuth * self.w / 360.0
            start = round(c - self.h / 2)
            cx = (c - start - self.h / 2) * (2.0 / self.h)
            cover_HH, obj_3HH = self.tile.object_layer(obj.cls, obj.latent, dom, q, cx, cy)
            cols_H = (start + np.arange(self.h)) % self.w
            sub_3HH = img_3HW[:, :, cols_H]
            sub_3HH += cover_HH * (obj_3HH - sub_3HH)
            img_3HW[:, :, cols_H] = sub_3HH
            mask_HW[:, cols_H] = np.maximum(mask_HW[:, cols_H], cover_HH >= _MASK_COVERAGE)
        noise_3HW = rng.random(img_3HW.shape, dtype=np.float32)
        noise_3HW = np.roll(noise_3HW, round(scene.offset * self.w / 360.0) % self.w, axis=-1)
        img_3HW += (noise_3HW - 0.5) * (dom.pixel_noise * 3.46)
        np.clip(img_3HW, 0.0, 1.0, out=img_3HW)
        return img_3HW.astype(np.float32, copy=False), mask_HW[None]

    def _background(self, rng: np.random.Generator, dom: Domain, offset: float) -> np.ndarray:
        """The mono gradient background wrapped around: it varies with cos(azimuth - offset)
        horizontally and linearly vertically, so it is continuous across the seam."""
        q = rng.random(10).tolist()
        a = 2 * np.pi * q[0]
        phi_W = self.phi_W - math.radians(offset)
        t_HW = 0.5 + 0.35 * (math.cos(a) * np.cos(phi_W)[None, :] + math.sin(a) * self.y_H1)
        lo, hi = (0.05, 0.3) if dom.background == "dark" else (0.3, 0.9)
        c1 = hsv(q[1], BACKGROUND_SATURATION * q[2], lo + (hi - lo) * q[3])
        c2 = hsv(q[4], BACKGROUND_SATURATION * q[5], lo + (hi - lo) * q[6])
        img_3HW = c1[:, None, None] + (c2 - c1)[:, None, None] * t_HW.astype(np.float32)
        if dom.background == "stripes":
            cycles = 2 + int(5 * q[8])  # whole cycles around the strip
            tilt = np.pi * (4 * q[7] - 2)
            img_3HW += (0.08 * np.sin(cycles * phi_W[None, :] + tilt * self.y_H1)).astype(
                np.float32)
        return img_3HW

    def _clutter(self, rng: np.random.Generator, dom: Domain, offset: float,
                 img_3HW: np.ndarray) -> None:
        """The mono renderer's boxes and ellipses, at the same density per H x H tile, placed at
        azimuths relative to ``offset`` with wrap-around; in place."""
        tiles = max(1, round(self.w / self.h))
        n = int(rng.integers(dom.clutter[0] * tiles, dom.clutter[1] * tiles + 1))
        px = self.h / 2.0  # pixels per half-side
        for r in rng.random((n, 9)).tolist():
            c = (offset + 360.0 * r[0]) * self.w / 360.0
            dx_W = np.mod(self.col_W - c + self.w / 2, self.w) - self.w / 2
            dy_H1 = self.y_H1 - (2 * r[1] - 1)
            radius = 0.08 + 0.22 * r[2]
            aspect = math.exp(2.4 * r[3] - 1.2)
            hx, hy = radius * aspect, radius / aspect
            alpha = 0.3 + 0.5 * r[4]
            if r[5] < 0.5:
                cov_W = np.clip(hx * px - np.abs(dx_W) + 0.5, 0.0, 1.0)
                cov_H1 = np.clip((hy - np.abs(dy_H1)) * px + 0.5, 0.0, 1.0)
                cover_HW = (alpha * cov_H1) * cov_W[None, :]
            else:
                d_HW = np.sqrt((dx_W[None, :] * (1.0 / (hx * px))) ** 2 + (dy_H1 * (1.0 / hy)) ** 2)
                cover_HW = alpha * np.clip((1.0 - d_HW) * (min(hx, hy) * px) + 0.5, 0.0, 1.0)
            col = hsv(r[6], r[7] * dom.saturation, 0.2 + 0.8 * r[8])
            img_3HW += cover_HW.astype(np.float32) * (col[:, None, None] - img_3HW)


# --- the dataset -----------------------------------------------------------------------------


class BinauralScenes(SyntheticAV):
    """Binaural procedural scenes: the eight pools of ProceduralAV (same sizes and domains)
    with panoramic images, masks, two-channel log-mels and azimuth targets (module docstring).

    Items: ``image`` (3, H, W) and ``mask`` (1, H, W) float32, ``sound`` (2, n_mels, n_frames)
    float32 (left, right), ``label`` and ``sector`` int64, ``azimuth`` float32 degrees,
    ``index`` int64; unpaired pools carry only their modality (image with mask, or sound).
    """

    sound_channels: ClassVar[int] = 2
    pool_keys: ClassVar[dict[str, tuple[str, ...]]] = _KEYS
    label_tag: ClassVar[tuple[int, ...]] = (_BINAURAL_TAG,)  # class orders differ from ProceduralAV's

    def __init__(self, cfg: DataConfig) -> None:
        super().__init__(cfg)
        self.images = _PanoramaRenderer(cfg.image_size, cfg.panorama_width)
        self.sounds = SoundSynth(cfg.sample_rate, cfg.clip_samples, cfg.seed)
        self.logmel = LogMel(sample_rate=cfg.sample_rate, n_mels=cfg.n_mels,
                             n_frames=cfg.n_frames, clip_seconds=cfg.clip_seconds)

    def sector(self, azimuth: float) -> int:
        """floor(azimuth / (360 / azimuth_sectors)); the epsilon keeps grid azimuths that land on
        a boundary in the sector they open despite rounding."""
        s = self.cfg.azimuth_sectors
        return int(math.floor(azimuth * s / 360.0 + 1e-9)) % s

    def scene(self, pool: str, index: int) -> Scene:
        """The layout of sample ``index``: object count, classes, azimuths, latents, levels."""
        c = self.cfg
        seed = (c.seed, POOL_ID[pool], index, _BINAURAL_TAG)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed,
                                                                         spawn_key=(_LAYOUT,))))
        main_cls = self.label(pool, index)
        n = int(rng.integers(1, min(c.max_objects, c.num_classes) + 1))
        others = [k for k in range(c.num_classes) if k != main_cls]
        classes = [main_cls] + rng.choice(others, size=n - 1, replace=False).tolist()
        latent_K3 = rng.random((n, 3)).tolist()
        # The main object sits on the column grid, so rotations by whole columns are exact.
        azimuths = [int(rng.integers(c.panorama_width)) * 360.0 / c.panorama_width]
        azimuths += (360.0 * rng.random(n - 1)).tolist()
        lo, hi = _OTHER_LEVEL_DB
        levels = [0.0] + (lo + (hi - lo) * rng.random(n - 1)).tolist()
        offset = int(rng.integers(c.panorama_width)) * 360.0 / c.panorama_width
        objects = tuple(SceneObject(k, az, *lat, level_db=lev)
                        for k, az, lat, lev in zip(classes, azimuths, latent_K3, levels))
        return Scene(objects, POOL_DOMAIN[pool], offset, seed)

    # Rendering: pure functions of a Scene, so tests can build scenes with chosen azimuths.

    def render_image(self, scene: Scene) -> tuple[torch.Tensor, torch.Tensor]:
        """(image (3, H, W), mask (1, H, W)) float32."""
        img_3HW, mask_1HW = self.images.render(scene)
        return torch.from_numpy(img_3HW), torch.from_numpy(mask_1HW)

    def activity(self, scene: Scene) -> np.ndarray:
        """(K, T) float32 on/off envelope of each object: the clip is cut into 1..3 equal parts
        and each object sounds in one segment of each part (40-80 % of it for the main object,
        20-70 % for the others), with 20 ms ramps."""
        rng = _stream(scene, _ACTIVITY)
        t_T = self.sounds.t_T
        dur = self.sounds.n / self.sounds.sr
        env_KT = np.zeros((len(scene.objects), t_T.shape[0]), dtype=np.float32)
        for k in range(len(scene.objects)):
            lo, hi = _ACTIVE_FRACTION["main" if k == 0 else "other"]
            n_seg = int(rng.integers(1, 4))
            part = dur / n_seg
            for i, (u_len, u_start) in enumerate(rng.random((n_seg, 2)).tolist()):
                length = part * (lo + (hi - lo) * u_len)
                a = part * i + (part - length) * u_start
                seg_T = np.minimum(t_T - a, a + length - t_T) * (1.0 / _RAMP_S)
                np.maximum(env_KT[k], np.clip(seg_T, 0.0, 1.0), out=env_KT[k])
        return env_KT

    def glide_octaves(self, cls: int) -> float:
        """Octaves by which class ``cls``'s sound glides over a clip (``glide_octaves``): the
        classes spread evenly from -glide_octaves (class 0) to +glide_octaves (the last)."""
        return self.cfg.glide_octaves * (2.0 * cls / (self.cfg.num_classes - 1) - 1.0)

    def render_waveform(self, scene: Scene) -> torch.Tensor:
        """(2, T) float32 waveform (left, right) of ``scene``.

        Each object's dry sound glides by its class's octaves (``glide_octaves``; none by default), is
        normalised to unit RMS, scaled to the main level (set by
        the main object's size latent) times 10 ** (level_db / 20), gated by its activity
        envelope and rendered at its azimuth; a distractor track (the mono dataset's unrelated
        events, at half level) at a random azimuth relative to ``scene.offset``, uncorrelated
        diffuse noise and the domain's room (the same echoes and pre-emphasis on both ears)
        follow.
        """
        rng = _stream(scene, _SOUND)
        synth = self.sounds
        dom = DOMAINS[scene.domain]
        n_obj = len(scene.objects)
        env_KT = self.activity(scene)
        main_rms = _MAIN_RMS * 10.0 ** ((12.0 * scene.main.size - 6.0) / 20.0)
        src_KT = np.zeros((n_obj + 1, synth.n), dtype=np.float32)
        az_K = np.zeros(n_obj + 1)
        for k, obj in enumerate(scene.objects):
            x_T = glide(synth.source(rng, obj.cls, obj.latent, rng.random(24).tolist()), self.glide_octaves(obj.cls))
            gain = main_rms * 10.0 ** (obj.level_db / 20.0) / (float(np.sqrt(np.mean(x_T**2)))
                                                               + 1e-8)
            np.multiply(x_T, env_KT[k] * np.float32(gain), out=src_KT[k])
            az_K[k] = obj.azimuth
        q = rng.random(6).tolist()
        synth._distractors(rng, src_KT[n_obj], dom)
        src_KT[n_obj] *= _DISTRACTOR_GAIN
        az_K[n_obj] = (scene.offset + 360.0 * q[0]) % 360.0

        h_2KZ = _ear_filters(az_K, synth.n, synth.sr, head_radius=HEAD_RADIUS_M,
                             speed_of_sound=SPEED_OF_SOUND_M_S, max_ild_db=MAX_ILD_DB)
        y_2Z = np.einsum("ckz,kz->cz", h_2KZ, np.fft.rfft(src_KT, axis=-1))
        wave_2T = np.fft.irfft(y_2Z, n=synth.n, axis=-1).astype(np.float32)

        # Diffuse noise: same colour and level on both ears, from two different bank clips.
        bank = synth.domain_bank[scene.domain]
        i = int(q[1] * BANK_CLIPS)
        j = (i + 1 + int(q[2] * (BANK_CLIPS - 1))) % BANK_CLIPS
        level = np.float32(dom.noise_level[0] + (dom.noise_level[1] - dom.noise_level[0]) * q[5])
        for ear, clip, u in ((0, i, q[3]), (1, j, q[4])):
            start = int(u * (bank.shape[1] - synth.n))
            wave_2T[ear] += bank[clip, start:start + synth.n] * level
        synth.room(wave_2T, dom, rng.random(max(1, dom.echoes)).tolist())
        return torch.from_numpy(wave_2T)

    def render_sound(self, scene: Scene) -> torch.Tensor:
        """(2, n_mels, n_frames) float32 log-mel of each ear, the mono front end per channel."""
        wave_2T = self.render_waveform(scene)
        return torch.cat([self.logmel(wave_2T[0]), self.logmel(wave_2T[1])])

    def waveform(self, pool: str, index: int) -> torch.Tensor:
        """The raw (2, T) waveform behind sample ``index``'s log-mel, for listening and tests."""
        return self.render_waveform(self.scene(pool, index))

    def _generate(self, pool: str, index: int, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
        check_pool(pool)
        scene = self.scene(pool, index)
        out: dict[str, torch.Tensor] = {}
        if "image" in keys:
            out["image"], out["mask"] = self.render_image(scene)
        if "sound" in keys:
            out["sound"] = self.render_sound(scene)
        if "label" in keys:
            out["label"] = torch.tensor(scene.main.cls, dtype=torch.int64)
            out["azimuth"] = torch.tensor(scene.main.azimuth, dtype=torch.float32)
            out["sector"] = torch.tensor(self.sector(scene.main.azimuth), dtype=torch.int64)
        out["index"] = torch.tensor(index, dtype=torch.int64)
        return out
