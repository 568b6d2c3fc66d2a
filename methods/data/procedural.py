"""A procedural audio-visual dataset: the embedded default every run can use without downloads.

Ten classes, each with a visual prototype (shape, texture, colour range) and an acoustic
prototype (pitch range, harmonic profile, modulation, envelope, noise level). Every instance
varies position, scale, rotation, colour, pitch, tempo, noise band, background clutter and
noise, and its image and sound share three latent factors, so a pair carries instance
information, not only its class:

    size         object scale        <-> loudness (bigger is louder) and pitch (bigger is lower)
    brightness   object colour value <-> spectral tilt (brighter is richer in high frequencies)
    texture      texture frequency   <-> modulation rate (AM, pulse and vibrato rates)

The difficulty is tuned (benchmarks/dataset_headroom.py) so that trivial cues stay weak: class
colour ranges overlap and pitch ranges overlap, so mean colour or mean loudness say little; the
class lives in shape and texture, and in the temporal structure of the sound (pulses, sweeps,
chirps, modulation), under clutter that a representation has to learn to ignore.

Pools mirror the papers' data (docs/spec.md §1, §2, §6): ``paired`` clips of the "main" domain, unpaired
sounds and images from a shifted "other source" domain (background statistics, reverberation,
noise colour, palette), labelled ``train`` / ``test`` splits of the main domain for linear
probing, kNN and retrieval, and ``transfer_train`` / ``transfer_test`` from a third domain for
zero-shot transfer.

Every sample is a pure function of (seed, pool, index): its random streams start from
``SeedSequence([seed, pool_id, index])``, so nothing is stored, any worker can produce any
sample, and pools are disjoint by construction (distinct entropy, distinct streams). Sounds are
rendered as waveforms and go through the same log-mel front end that real audio would take.

Legend: S image side, T waveform samples, F mel bins, N frames, K harmonics, P table points.
"""

from __future__ import annotations

import colorsys
import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any, Protocol

import numpy as np
import torch
import torchaudio
from torch.utils.data import Dataset

from methods.base import DataInfo

__all__ = [
    "CLASS_NAMES",
    "LOGMEL_FLOOR",
    "LOGMEL_MEAN",
    "LOGMEL_STD",
    "POOLS",
    "LogMel",
    "ProceduralAV",
    "ProceduralConfig",
]

POOLS: tuple[str, ...] = (
    "paired",
    "unpaired_sound",
    "unpaired_image",
    "train",
    "test",
    "transfer_train",
    "transfer_test",
)
# Stream ids: part of every sample's seed, so two pools never share a random stream.
_POOL_ID: dict[str, int] = {name: i + 1 for i, name in enumerate(POOLS)}
_POOL_DOMAIN: dict[str, str] = {
    "paired": "main",
    "unpaired_sound": "other",
    "unpaired_image": "other",
    "train": "main",
    "test": "main",
    "transfer_train": "transfer",
    "transfer_test": "transfer",
}
_POOL_KEYS: dict[str, tuple[str, ...]] = {
    "paired": ("image", "sound", "label", "index"),
    "unpaired_sound": ("sound", "index"),
    "unpaired_image": ("image", "index"),
    "train": ("image", "sound", "label", "index"),
    "test": ("image", "sound", "label", "index"),
    "transfer_train": ("image", "sound", "label", "index"),
    "transfer_test": ("image", "sound", "label", "index"),
}

CLASS_NAMES: tuple[str, ...] = (
    "drone",
    "boat",
    "bird",
    "siren",
    "engine",
    "bell",
    "dog",
    "rain",
    "clock",
    "violin",
)

# Log-mel front end: natural log of mel power with a floor, then a fixed affine map. The
# constants were measured on the main domain of the default config (mean / std over all
# bins and frames of the paired pool) and are kept fixed so that every preset, domain and real
# recording goes through the same map.
LOGMEL_FLOOR: float = 1e-5
LOGMEL_MEAN: float = -3.7
LOGMEL_STD: float = 2.2

_MAX_POOL_SIZE = 10_000_000
_MAX_CLIP_SAMPLES = 320_000  # bounds the noise banks (~20 clips of twice this length)
_N_HARMONICS = 8
_TABLE_POINTS = 512


# --- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ProceduralConfig:
    """Sizes and shapes of the procedural dataset. Defaults are the CPU-sized ``tiny`` preset.

    The paper preset uses ``image_size=224, sample_rate=16000, n_mels=150, n_frames=200``.
    ``cache_in_memory`` memoises generated samples per process: right for pools of a few
    thousand items, wasteful for pools of hundreds of thousands.

    ``binaural`` switches to binaural scenes (``methods.data.binaural``): a 360° image strip of
    ``image_size`` x ``panorama_width`` pixels, two-channel sound, up to ``max_objects`` objects
    per scene, and an azimuth ``sector`` label out of ``azimuth_sectors``. The three scene
    fields are ignored when ``binaural`` is false.

    ``manifest`` switches to a real dataset described by a manifest CSV
    (``methods.data.manifest``; ``avlab data index`` writes one). Its pools come from the
    manifest, decoded once into a feature cache (``cache_dir``; empty = ``.avlab-cache`` next to
    the manifest) with the feature fields above (image_size, sample_rate, clip_seconds, n_mels,
    n_frames; two channels when ``binaural``). The procedural pool sizes are then ignored;
    ``paired_fraction`` keeps that share of the pairs and ``unpaired_sound_count`` /
    ``unpaired_image_count`` that many unpaired items (-1 = all), chosen by ``seed``.
    ``skip_bad`` drops unusable files (listed once) instead of stopping; ``cache_workers``
    decoding processes build the cache (0 = one per CPU core).
    """

    seed: int = 0
    image_size: int = 32
    sample_rate: int = 8000
    clip_seconds: float = 2.0
    n_mels: int = 40
    n_frames: int = 64
    num_classes: int = 10
    paired_size: int = 2048
    unpaired_sound_size: int = 2048
    unpaired_image_size: int = 2048
    train_size: int = 1000
    test_size: int = 500
    transfer_train_size: int = 500
    transfer_test_size: int = 500
    cache_in_memory: bool = True
    binaural: bool = False
    panorama_width: int = 128
    azimuth_sectors: int = 8
    max_objects: int = 2
    manifest: str = ""
    paired_fraction: float = 1.0
    unpaired_sound_count: int = -1
    unpaired_image_count: int = -1
    cache_dir: str = ""
    skip_bad: bool = False
    cache_workers: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("manifest", "cache_dir"):
                if not isinstance(value, str):
                    raise ValueError(f"{f.name}: must be a path (text), got {value!r}")
            elif f.name == "paired_fraction":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                    raise ValueError(f"paired_fraction: must be in (0, 1], got {value!r}")
            elif f.name in ("cache_in_memory", "binaural", "skip_bad"):
                if not isinstance(value, bool):
                    raise ValueError(f"{f.name}: must be true or false, got {value!r}")
            elif f.name == "clip_seconds":
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"clip_seconds: must be a number of seconds, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{f.name}: must be an integer, got {value!r}")
        if self.seed < 0:
            raise ValueError(f"seed: must be >= 0, got {self.seed}")
        for name in ("unpaired_sound_count", "unpaired_image_count"):
            if getattr(self, name) < -1:
                raise ValueError(f"{name}: must be -1 (all) or a count >= 0, got {getattr(self, name)}")
        if self.cache_workers < 0:
            raise ValueError(f"cache_workers: must be >= 0 (0 = one per CPU core), got {self.cache_workers}")
        if not 16 <= self.image_size <= 1024:
            raise ValueError(f"image_size: must be in 16..1024 pixels, got {self.image_size}")
        if not 4000 <= self.sample_rate <= 96000:
            raise ValueError(f"sample_rate: must be in 4000..96000 Hz, got {self.sample_rate}")
        if not 0.25 <= self.clip_seconds <= 30.0:
            raise ValueError(f"clip_seconds: must be in 0.25..30 s, got {self.clip_seconds}")
        if not 8 <= self.n_mels <= 256:
            raise ValueError(f"n_mels: must be in 8..256 mel bins, got {self.n_mels}")
        if self.clip_samples > _MAX_CLIP_SAMPLES:
            raise ValueError(
                f"clip_seconds: {self.clip_seconds} s at {self.sample_rate} Hz is "
                f"{self.clip_samples} samples; keep sample_rate * clip_seconds <= "
                f"{_MAX_CLIP_SAMPLES}"
            )
        if self.n_frames < 8:
            raise ValueError(f"n_frames: must be >= 8, got {self.n_frames}")
        n_fft, hop = _logmel_geometry(self.sample_rate, self.clip_seconds, self.n_frames)
        if hop < 8:
            raise ValueError(
                f"n_frames: {self.n_frames} frames of a {self.clip_seconds} s clip leave a hop of "
                f"{hop} samples (window {n_fft}); need >= 8: lower n_frames or raise clip_seconds"
            )
        if not 2 <= self.num_classes <= len(CLASS_NAMES):
            raise ValueError(
                f"num_classes: must be in 2..{len(CLASS_NAMES)}, got {self.num_classes}"
            )
        for name in POOLS:
            size = getattr(self, f"{name}_size")
            # 0 disables a pool: no unpaired data (no L_unpair) or no transfer evaluation.
            minimum = 0 if name.startswith(("unpaired", "transfer")) else 1
            if not minimum <= size <= _MAX_POOL_SIZE:
                raise ValueError(
                    f"{name}_size: must be in {minimum}..{_MAX_POOL_SIZE}, got {size}"
                )
        # Multiples of 8 columns keep rotations by 360/R degrees, R in 2, 4, 8, whole columns.
        if self.panorama_width < 16 or self.panorama_width % 8:
            raise ValueError(
                f"panorama_width: must be a multiple of 8 and >= 16, got {self.panorama_width}"
            )
        if self.binaural and self.panorama_width < self.image_size:
            raise ValueError(
                f"panorama_width: must be >= image_size={self.image_size} for binaural scenes, "
                f"got {self.panorama_width}"
            )
        if not 2 <= self.azimuth_sectors <= 36 or self.panorama_width % self.azimuth_sectors:
            raise ValueError(
                f"azimuth_sectors: must be in 2..36 and divide panorama_width="
                f"{self.panorama_width}, got {self.azimuth_sectors}"
            )
        if not 1 <= self.max_objects <= 4:
            raise ValueError(f"max_objects: must be in 1..4, got {self.max_objects}")

    @property
    def clip_samples(self) -> int:
        return int(round(self.sample_rate * self.clip_seconds))


# --- log-mel front end -----------------------------------------------------------------------


def _logmel_geometry(sample_rate: int, clip_seconds: float, n_frames: int) -> tuple[int, int]:
    """(n_fft, hop): a power-of-two window of at least ~64 ms and two hops, and the hop that
    makes a clip of ``clip_seconds`` give exactly ``n_frames`` uncentred frames."""
    clip_samples = int(round(sample_rate * clip_seconds))
    n_fft = 1 << math.ceil(math.log2(max(0.064 * sample_rate, 2 * clip_samples / n_frames)))
    hop = (clip_samples - n_fft) // max(1, n_frames - 1)
    return n_fft, hop


class LogMel:
    """Waveform -> normalised log-mel spectrogram of exactly ``n_frames`` frames.

    torchaudio's ``MelSpectrogram`` (Hann window of at least ~64 ms, uncentred frames, Slaney
    mel scale and area-normalised filters so levels barely depend on the sample rate), then
    ``log(max(power, LOGMEL_FLOOR))``, cropped from the start or right-padded with the floor to
    ``n_frames``, then ``(x - LOGMEL_MEAN) / LOGMEL_STD``. The hop is chosen so that a clip of
    ``clip_seconds`` fills ``n_frames`` frames exactly; longer recordings are cropped, shorter
    ones padded. One instance holds one mel module; reuse it.
    """

    def __init__(
        self, *, sample_rate: int, n_mels: int, n_frames: int, clip_seconds: float
    ) -> None:
        self.n_frames = n_frames
        self.n_fft, self.hop_length = _logmel_geometry(sample_rate, clip_seconds, n_frames)
        if self.hop_length < 1:
            raise ValueError(
                f"n_frames: {n_frames} frames do not fit a {clip_seconds} s clip with a "
                f"{self.n_fft}-sample window; lower n_frames or raise clip_seconds"
            )
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate,
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            f_min=20.0,
            n_mels=n_mels,
            power=2.0,
            center=False,
            norm="slaney",
            mel_scale="slaney",
        )

    @torch.no_grad()
    def __call__(self, wave_T: torch.Tensor) -> torch.Tensor:
        """(T,) or (C, T) float waveform (channels are averaged) -> (1, n_mels, n_frames)."""
        if wave_T.dim() == 2:
            wave_T = wave_T.mean(0)
        wave_T = wave_T.float()
        if wave_T.shape[0] < self.n_fft:
            wave_T = torch.nn.functional.pad(wave_T, (0, self.n_fft - wave_T.shape[0]))
        with _single_thread():
            mel_FN = self.mel(wave_T)
            mel_FN = mel_FN[:, : self.n_frames].clamp_min_(LOGMEL_FLOOR).log_()
            if mel_FN.shape[1] < self.n_frames:
                pad = (0, self.n_frames - mel_FN.shape[1])
                mel_FN = torch.nn.functional.pad(mel_FN, pad, value=math.log(LOGMEL_FLOOR))
            mel_FN = mel_FN.sub_(LOGMEL_MEAN).mul_(1.0 / LOGMEL_STD)
        return mel_FN.unsqueeze(0).contiguous()


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Run torch ops on one thread. One clip's STFT is too small to split; on a busy CPU,
    OpenMP's hand-off makes it 10-50x slower than the single-threaded call."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# --- class prototypes ------------------------------------------------------------------------


@dataclass(frozen=True)
class _VisualProto:
    shape: str  # signed-distance shape, see _shape_sdf
    texture: str  # see _texture
    hue: float  # centre of the class hue range (HSV, 0..1)
    texture_depth: float  # 0 = plain colour, 1 = full contrast between the two texture colours


@dataclass(frozen=True)
class _SoundProto:
    """An acoustic class: mostly temporal structure, since pitch ranges overlap and noise bands
    are drawn per instance, so the average spectrum says little about the class."""

    f0: tuple[float, float]  # fundamental range (Hz), drawn log-uniformly
    harmonics: tuple[float, ...]  # amplitude of harmonics 1..K before the tilt
    partial: tuple[float, float]  # (frequency ratio, gain) of an inharmonic partial; gain 0 = none
    vibrato: tuple[float, float]  # (rate Hz, depth as a fraction of f0)
    sweep: tuple[float, float]  # slow pitch sweep (rate Hz, depth fraction)
    chirp: float  # glide within each pulse, fraction of f0 (negative = downward)
    am: tuple[float, float]  # amplitude modulation (rate Hz, depth 0..1)
    pulse: tuple[float, float]  # (rate Hz, decay s); rate 0 = sustained
    jitter: float  # irregularity of the pulse train (0 = periodic)
    noise_gain: float  # band-limited noise level relative to the tone
    tone_gain: float


# Image difficulty, tuned with benchmarks/dataset_headroom.py so that a random-init encoder
# stays far below a supervised one. Class hues overlap (+-_HUE_SPREAD around each class hue),
# so colour alone is a weak cue; objects are saturated and backgrounds muted, so the shape can
# still be found; rotations stay small enough that no shape turns into another.
_HUE_SPREAD = 0.25
_BACKGROUND_SATURATION = 0.25  # upper bound
_OBJECT_SATURATION = 0.6  # lower bound
_MAX_ROTATION = 0.6  # radians either way
_RADIUS = (0.35, 0.7)  # object radius in half-sides, for size latent 0 and 1
_VISUAL: tuple[_VisualProto, ...] = (
    _VisualProto("plus", "stripes_u", 0.00, 0.6),
    _VisualProto("half_disc", "stripes_v", 0.10, 0.6),
    _VisualProto("chevron", "dots", 0.20, 0.7),
    _VisualProto("ring", "diagonal", 0.30, 0.6),
    _VisualProto("box", "checker", 0.40, 0.6),
    _VisualProto("triangle", "rings", 0.50, 0.6),
    _VisualProto("ellipse", "shade", 0.60, 0.6),
    _VisualProto("crescent", "waves", 0.70, 0.6),
    _VisualProto("clock", "plain", 0.80, 0.0),
    _VisualProto("figure_eight", "dots", 0.90, 0.7),
)

_SAW = tuple(1.0 / k for k in range(1, _N_HARMONICS + 1))
_SQUARE = tuple((1.0 / k if k % 2 else 0.05) for k in range(1, _N_HARMONICS + 1))
_SOFT = (1.0, 0.6, 0.4, 0.25, 0.1, 0.05, 0.0, 0.0)
_FORMANT = (0.4, 0.7, 1.0, 0.8, 0.4, 0.2, 0.1, 0.05)
_SINE = (1.0, 0.3, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0)
_SOUND: tuple[_SoundProto, ...] = (
    # f0, harmonics, partial, vibrato, sweep, chirp, am, pulse, jitter, noise, tone
    # drone: buzzy saw throbbing at a medium rate
    _SoundProto((120, 400), _SAW, (0, 0), (0, 0), (0, 0), 0.0, (7, 0.6), (0, 0), 0.0, 0.3, 1.0),
    # boat: hollow square-ish hum with a slow swell and drift
    _SoundProto((110, 300), _SQUARE, (0, 0), (0, 0), (0.3, 0.04), 0.0, (2, 0.6), (0, 0), 0.0,
                0.4, 1.0),
    # bird: near-sinusoidal chirps rising within each pulse
    _SoundProto((250, 520), _SINE, (0, 0), (0, 0), (0, 0), 0.5, (0, 0), (6, 0.06), 0.2, 0.1, 1.0),
    # siren: wide slow pitch sweep
    _SoundProto((180, 450), _SOFT, (0, 0), (0, 0), (0.6, 0.25), 0.0, (0, 0), (0, 0), 0.0,
                0.15, 1.0),
    # engine: rich tone with fast firing-rate AM under strong noise
    _SoundProto((110, 250), tuple(1 / math.sqrt(k) for k in range(1, 9)), (0, 0), (0, 0),
                (0, 0), 0.0, (11, 0.6), (0, 0), 0.0, 0.9, 0.6),
    # bell: inharmonic strikes that decay slowly
    _SoundProto((200, 500), (1, 0.2, 0.5, 0, 0.2, 0, 0, 0), (2.76, 0.6), (0, 0), (0, 0), 0.0,
                (0, 0), (1.0, 0.4), 0.0, 0.05, 1.0),
    # dog: formant-like barks gliding down, with noise
    _SoundProto((150, 350), _FORMANT, (0, 0), (0, 0), (0, 0), -0.2, (0, 0), (2.5, 0.09), 0.15,
                0.5, 1.0),
    # rain: irregular noise drops over a faint tone
    _SoundProto((200, 500), _SINE, (0, 0), (0, 0), (0, 0), 0.0, (0, 0), (12, 0.015), 0.6, 1.5,
                0.1),
    # clock: regular short ticks with a high ping
    _SoundProto((300, 520), (1, 0.1, 0.3, 0, 0, 0, 0, 0), (3.1, 0.4), (0, 0), (0, 0), 0.0,
                (0, 0), (2, 0.012), 0.0, 1.0, 0.6),
    # violin: bright saw with vibrato
    _SoundProto((180, 480), _SAW, (0, 0), (6, 0.025), (0, 0), 0.0, (0, 0), (0, 0), 0.0, 0.05,
                1.0),
)
# Noise bands (Hz) shared by all classes; each instance draws one.
_NOISE_BANDS: tuple[tuple[float, float], ...] = (
    (150, 600), (300, 900), (500, 1500), (900, 2200), (1400, 3000), (250, 3000), (700, 3000),
    (150, 1500),
)


@dataclass(frozen=True)
class _Domain:
    """Statistics that differ between the main, other-source and transfer domains."""

    hue_shift: float  # added to every object hue
    saturation: float  # multiplies object saturation
    background: str  # gradient | stripes | dark
    clutter: tuple[int, int]  # number of background clutter shapes (inclusive range)
    pixel_noise: float  # std of additive pixel noise
    noise_colour: float  # background noise spectrum ~ f^(-noise_colour)
    noise_level: tuple[float, float]  # background noise RMS range
    echoes: int  # number of reverberation taps (0 = dry)
    preemphasis: float  # y[n] = x[n] - a x[n-1]; 0 = none
    distractors: tuple[str, ...]  # kinds of unrelated events: tone, glide, clicks, burst


_DOMAINS: dict[str, _Domain] = {
    "main": _Domain(0.0, 1.0, "gradient", (2, 5), 0.03, 1.0, (0.01, 0.05), 0, 0.0,
                    ("tone", "glide", "clicks", "burst")),
    "other": _Domain(0.08, 0.7, "stripes", (3, 6), 0.05, 2.0, (0.02, 0.06), 5, 0.0,
                     ("clicks", "burst", "burst", "glide")),
    "transfer": _Domain(-0.06, 0.85, "dark", (1, 4), 0.05, 0.0, (0.01, 0.04), 2, 0.6,
                        ("tone", "tone", "glide", "clicks")),
}


# --- image rendering -------------------------------------------------------------------------


def _shape_sdf(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Approximate signed distance (object units, negative inside) of a unit-sized shape."""
    if shape == "plus":
        au, av = np.abs(u), np.abs(v)
        return np.minimum(np.maximum(au - 1.0, av - 0.3), np.maximum(au - 0.3, av - 1.0))
    if shape == "half_disc":
        return np.maximum(np.hypot(u, v + 0.35) - 1.0, -(v + 0.35))
    if shape == "chevron":
        au = np.abs(u)
        return np.maximum(np.abs(v - 0.8 * au + 0.2) - 0.25, au - 1.0)
    if shape == "ring":
        return np.abs(np.hypot(u, v) - 0.72) - 0.28
    if shape == "box":
        return np.maximum(np.abs(u), np.abs(v)) - 0.8
    if shape == "triangle":
        return np.maximum(-v - 0.55, 0.866 * np.abs(u) + 0.5 * v - 0.45)
    if shape == "ellipse":
        return np.hypot(u, v * 2.0) / 1.4 - 0.7
    if shape == "crescent":
        return np.maximum(np.hypot(u, v) - 1.0, 0.75 - np.hypot(u - 0.55, v))
    if shape == "clock":
        disc = np.hypot(u, v) - 1.0
        hand = np.maximum(np.abs(u) - 0.12, np.abs(v + 0.3) - 0.45)
        return np.maximum(disc, -hand)
    if shape == "figure_eight":
        return np.minimum(np.hypot(u, v + 0.45) - 0.55, np.hypot(u, v - 0.5) - 0.45)
    raise ValueError(f"unknown shape {shape!r}")


def _texture(kind: str, u: np.ndarray, v: np.ndarray, freq: float, phase: float) -> np.ndarray:
    """Texture intensity in [0, 1] over object coordinates; ``freq`` in cycles per object unit."""
    w = 2 * np.pi * freq
    if kind == "stripes_u":
        return 0.5 + 0.5 * np.sin(w * u + phase)
    if kind == "stripes_v":
        return 0.5 + 0.5 * np.sin(w * v + phase)
    if kind == "diagonal":
        return 0.5 + 0.5 * np.sin((0.7 * w) * (u + v) + phase)
    if kind == "rings":
        return 0.5 + 0.5 * np.sin(w * np.hypot(u, v) + phase)
    if kind == "checker":
        s = np.sin(0.5 * w * u + phase) * np.sin(0.5 * w * v)
        return np.clip(4.0 * s + 0.5, 0.0, 1.0)
    if kind == "dots":
        s = np.sin(0.5 * w * u + phase) * np.sin(0.5 * w * v)
        return np.clip(3.0 * (np.abs(s) - 0.5), 0.0, 1.0)
    if kind == "waves":
        return 0.5 + 0.5 * np.sin(w * u + 2.0 * np.sin(w * v) + phase)
    if kind == "shade":
        # A smooth highlight instead of a pattern.
        return np.clip(0.5 * (u + v) + 0.5, 0.0, 1.0)
    return np.zeros_like(u)


def _object_radius(latent: dict[str, float]) -> float:
    """Object radius in half-sides of the image (or of a panorama's square tile)."""
    return _RADIUS[0] + (_RADIUS[1] - _RADIUS[0]) * latent["size"]


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    rgb = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return np.asarray(rgb, dtype=np.float32)


class _ImageRenderer:
    """Draws one image with vectorised numpy on a fixed coordinate grid (no per-pixel loops).

    Coordinates span [-1, 1]; a shape is a signed-distance function in its own rotated,
    scaled frame, turned into anti-aliased coverage with a one-pixel ramp. Layers are composited
    back to front with the "over" operator.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        c = ((np.arange(size) + 0.5) / size * 2.0 - 1.0).astype(np.float32)
        self.y_SS, self.x_SS = np.meshgrid(c, c, indexing="ij")
        # Separable grids: a rotated, shifted coordinate is a row term plus a column term, so
        # each costs one full-size operation.
        self.x_1S = c[None, :]
        self.y_S1 = c[:, None]
        self.pixel = 2.0 / size

    def _coverage(self, sdf_grid: np.ndarray) -> np.ndarray:
        return np.clip(0.5 - sdf_grid * (1.0 / self.pixel), 0.0, 1.0)

    def _frame(self, cx: Any, cy: Any, radius: Any, angle: Any, aspect: Any
               ) -> tuple[np.ndarray, np.ndarray]:
        """Object coordinates (u, v) of every pixel; arguments are scalars or (n, 1, 1) arrays.

        u = ((x - cx) cos a + (y - cy) sin a) / (r * aspect),
        v = ((y - cy) cos a - (x - cx) sin a) * aspect / r.
        """
        ca, sa = np.cos(angle), np.sin(angle)
        su, sv = 1.0 / (radius * aspect), aspect / radius
        u = (self.x_1S - cx) * (ca * su) + (self.y_S1 - cy) * (sa * su)
        v = (self.y_S1 - cy) * (ca * sv) - (self.x_1S - cx) * (sa * sv)
        return u, v

    def render(self, rng: np.random.Generator, cls: int, latent: dict[str, float],
               dom: _Domain) -> np.ndarray:
        """Background, clutter behind the object, the object, pixel noise; (3, S, S) in [0, 1]."""
        img_3SS = self._background(rng, dom)
        img_3SS = self._clutter(rng, dom, img_3SS)

        q = rng.random(10).tolist()
        margin = 1.0 - 0.7 * _object_radius(latent)
        cx, cy = (2 * q[0] - 1) * margin, (2 * q[1] - 1) * margin
        cover_SS, obj_3SS = self.object_layer(cls, latent, dom, q, cx, cy)
        img_3SS += cover_SS * (obj_3SS - img_3SS)

        img_3SS += (rng.random(img_3SS.shape, dtype=np.float32) - 0.5) * (dom.pixel_noise * 3.46)
        return np.clip(img_3SS, 0.0, 1.0, out=img_3SS)

    def object_layer(self, cls: int, latent: dict[str, float], dom: _Domain, q: list[float],
                     cx: float, cy: float) -> tuple[np.ndarray, np.ndarray]:
        """(coverage (S, S) in [0, 1], colour (3, S, S)) of one object centred at (cx, cy).

        Scale from the size latent, colour value from the brightness latent, texture frequency
        from the texture latent; ``q`` holds the instance's uniform draws (q[2:9] are read).
        """
        proto = _VISUAL[cls]
        radius = _object_radius(latent)
        angle = _MAX_ROTATION * (2 * q[2] - 1)
        aspect = math.exp(0.3 * q[3] - 0.15)
        u, v = self._frame(cx, cy, radius, angle, aspect)
        cover_SS = self._coverage(_shape_sdf(proto.shape, u, v) * radius)
        hue = proto.hue + _HUE_SPREAD * (2 * q[4] - 1) + dom.hue_shift
        value = 0.4 + 0.6 * latent["brightness"]
        saturation = _OBJECT_SATURATION + (1 - _OBJECT_SATURATION) * q[5]
        col = _hsv(hue, saturation * dom.saturation, value)
        col2 = _hsv(hue + 0.3 + 0.4 * q[6], 0.2 + 0.6 * q[7], value * 0.6)
        freq = 1.2 + 2.0 * latent["texture"]
        tex_SS = proto.texture_depth * _texture(proto.texture, u, v, freq, 2 * np.pi * q[8])
        obj_3SS = col[:, None, None] + (col2 - col)[:, None, None] * tex_SS
        return cover_SS, obj_3SS

    def _background(self, rng: np.random.Generator, dom: _Domain) -> np.ndarray:
        q = rng.random(10).tolist()
        a = 2 * np.pi * q[0]
        t_SS = 0.5 + (0.5 / 1.42) * (self.x_SS * math.cos(a) + self.y_SS * math.sin(a))
        lo, hi = (0.05, 0.3) if dom.background == "dark" else (0.3, 0.9)
        c1 = _hsv(q[1], _BACKGROUND_SATURATION * q[2], lo + (hi - lo) * q[3])
        c2 = _hsv(q[4], _BACKGROUND_SATURATION * q[5], lo + (hi - lo) * q[6])
        img_3SS = c1[:, None, None] + (c2 - c1)[:, None, None] * t_SS
        if dom.background == "stripes":
            b = np.pi * q[7]
            f = 2.0 + 3.0 * q[8]
            ramp_SS = self.x_SS * math.cos(b) + self.y_SS * math.sin(b)
            img_3SS += 0.08 * np.sin((np.pi * f) * ramp_SS)
        return img_3SS

    def _clutter(self, rng: np.random.Generator, dom: _Domain, img_3SS: np.ndarray) -> np.ndarray:
        """Axis-aligned boxes, bars and ellipses of random colours behind the object.

        Axis-aligned shapes keep every mask separable (a row term and a column term), which
        makes clutter cheap enough to draw several layers per image.
        """
        n = int(rng.integers(dom.clutter[0], dom.clutter[1] + 1))
        inv_px = 1.0 / self.pixel
        for r in rng.random((n, 9)).tolist():
            cx, cy = 2 * r[0] - 1, 2 * r[1] - 1
            radius = 0.08 + 0.22 * r[2]
            aspect = math.exp(2.4 * r[3] - 1.2)
            hx, hy = radius * aspect, radius / aspect
            alpha = 0.3 + 0.5 * r[4]
            if r[5] < 0.5:
                # Box: coverage is the product of two 1-D ramps.
                cov_x = np.clip((hx - np.abs(self.x_1S - cx)) * inv_px + 0.5, 0.0, 1.0)
                cov_y = np.clip((hy - np.abs(self.y_S1 - cy)) * inv_px + 0.5, 0.0, 1.0)
                cover_SS = (alpha * cov_y) * cov_x
            else:
                d_SS = np.sqrt(((self.x_1S - cx) * (1.0 / hx)) ** 2
                               + ((self.y_S1 - cy) * (1.0 / hy)) ** 2)
                ramp_SS = (1.0 - d_SS) * (min(hx, hy) * inv_px) + 0.5
                cover_SS = alpha * np.clip(ramp_SS, 0.0, 1.0)
            col = _hsv(r[6], r[7] * dom.saturation, 0.2 + 0.8 * r[8])
            img_3SS += cover_SS * (col[:, None, None] - img_3SS)
        return img_3SS


# --- sound synthesis -------------------------------------------------------------------------

_BANK_CLIPS = 4  # background noise clips per domain
_MAX_SHIFT = 2.0 ** (4.0 / 12.0)  # the largest pitch shift the size latent produces
_DISTRACT_N = (2, 5)  # number of distractor events per clip
_DISTRACT_AMP = (0.03, 0.2)  # their peak amplitude


class _SoundSynth:
    """Renders one waveform with vectorised numpy.

    A band-limited wavetable oscillator (phase computed in closed form, so no cumulative sums)
    carries pitch, vibrato, sweeps and chirps; pulse envelopes and AM shape it; band noise (one of
    eight bands shared by all classes) and the domain's coloured background noise are read at
    random offsets from fixed noise banks, the band noise resampled with the pitch shift, which
    moves its band; distractor events, echoes and pre-emphasis complete a domain. The banks are a
    function of the dataset seed only (generated once, ~1 MB at the default sizes).
    """

    def __init__(self, sample_rate: int, clip_samples: int, seed: int) -> None:
        self.sr = sample_rate
        self.n = clip_samples
        self.t_T = (np.arange(clip_samples) / sample_rate).astype(np.float32)
        self.arange_T = np.arange(clip_samples, dtype=np.float32)
        x_P = np.arange(_TABLE_POINTS) / _TABLE_POINTS
        self.k_K = np.arange(1, _N_HARMONICS + 1, dtype=np.float64)
        self.basis_KP = np.sin(2 * np.pi * self.k_K[:, None] * x_P[None, :]).astype(np.float32)
        # Pool id 0 is reserved for the banks, so no sample stream ever coincides with them.
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 0, 0])))
        length = 2 * clip_samples + 16
        freqs = np.fft.rfftfreq(length, 1.0 / sample_rate)
        nyquist = sample_rate / 2
        hi_max = 0.95 * nyquist / _MAX_SHIFT
        self.band_bank = np.stack([
            _noise_clips(rng, ((freqs >= lo) & (freqs <= min(hi, hi_max))).astype(np.float64),
                         1, length)[0]
            for lo, hi in _NOISE_BANDS
        ])
        self.domain_bank: dict[str, np.ndarray] = {}
        for name, dom in _DOMAINS.items():
            colour = np.maximum(freqs, 20.0) ** (-dom.noise_colour / 2.0)
            self.domain_bank[name] = _noise_clips(rng, colour, _BANK_CLIPS, length)

    def render(self, rng: np.random.Generator, cls: int, latent: dict[str, float],
               dom_name: str) -> np.ndarray:
        """One waveform (T,) float32: the object's sound, then the domain's clutter and room."""
        dom = _DOMAINS[dom_name]
        q = rng.random(24).tolist()
        x_T = self.source(rng, cls, latent, q)

        # Clutter: unrelated events, then the domain's background noise.
        self._distractors(rng, x_T, dom)
        bank = self.domain_bank[dom_name][int(q[13] * _BANK_CLIPS)]
        start = int(q[14] * (bank.shape[0] - self.n))
        level = dom.noise_level[0] + (dom.noise_level[1] - dom.noise_level[0]) * q[15]
        x_T += bank[start:start + self.n] * np.float32(level)
        self.room(x_T, dom, q[16:])
        return x_T

    def source(self, rng: np.random.Generator, cls: int, latent: dict[str, float],
               q: list[float]) -> np.ndarray:
        """The dry sound of one object (T,) float32, before clutter and room.

        ``q`` holds the instance's uniform draws (at least 12 are read); ``rng`` draws the
        harmonic amplitudes.
        """
        p = _SOUND[cls]
        t = self.t_T
        nyquist = self.sr / 2
        # Shared latents: bigger objects are louder and lower; brighter ones have more high
        # harmonics; finer textures modulate faster.
        shift = 2.0 ** ((4.0 - 8.0 * latent["size"]) / 12.0)
        gain = 10.0 ** ((-12.0 + 14.0 * latent["size"]) / 20.0) * 0.3
        tilt = -1.2 + 1.6 * latent["brightness"]
        rate_mult = 0.7 + 0.8 * latent["texture"]

        # Phase in cycles, integrated in closed form: f(t) = f0 (1 + d sin(w t + phi)) gives
        # phase = f0 t - f0 d cos(w t + phi) / w. Operations run in place on a few float32
        # buffers: at this size numpy's cost is mostly allocation and memory traffic.
        f0 = math.exp(math.log(p.f0[0]) + q[0] * math.log(p.f0[1] / p.f0[0])) * shift
        phase_T = f0 * t
        phase_T += q[1]
        tmp_T = np.empty_like(t)
        f_max = f0
        for (rate_hz, depth), rate_scale, phi in (
            (p.vibrato, rate_mult, q[2]),
            (p.sweep, 0.7 + 0.7 * q[3], q[4]),
        ):
            if depth > 0:
                w = 2 * np.pi * rate_hz * rate_scale
                np.multiply(t, w, out=tmp_T)
                tmp_T += 2 * np.pi * phi
                np.cos(tmp_T, out=tmp_T)
                tmp_T *= f0 * depth / w
                phase_T -= tmp_T
                f_max += f0 * depth

        if p.pulse[0] > 0:
            # Pulse train: time since the last onset, optionally with irregular timing.
            rate = p.pulse[0] * rate_mult
            since_T = rate * t
            since_T += q[5]
            if p.jitter > 0:
                np.multiply(t, 2 * np.pi * (0.3 + 0.9 * q[6]), out=tmp_T)
                tmp_T += 2 * np.pi * q[7]
                np.sin(tmp_T, out=tmp_T)
                tmp_T *= p.jitter
                since_T += tmp_T
            since_T -= np.floor(since_T, out=tmp_T)
            since_T *= 1.0 / rate
            decay = p.pulse[1] * (0.7 + 0.7 * q[8])
            env_T = np.multiply(since_T, -1.0 / decay)
            np.exp(env_T, out=env_T)
            np.multiply(since_T, 250.0, out=tmp_T)  # 4 ms attack
            np.minimum(tmp_T, 1.0, out=tmp_T)
            env_T *= tmp_T
            if p.chirp != 0:
                # Glide by chirp * f0 over the first 0.1 s of each pulse; the phase restarts at
                # each onset, where the envelope is zero.
                np.minimum(since_T, 0.1, out=tmp_T)
                since_T -= tmp_T
                tmp_T *= tmp_T
                tmp_T *= 5.0
                since_T += tmp_T
                since_T *= f0 * p.chirp
                phase_T += since_T
                f_max += f0 * max(p.chirp, 0.0)
        else:
            # Sustained sounds fade in and out at random moments.
            dur = self.n / self.sr
            a, b = sorted((q[5] * dur, q[6] * dur))
            if b - a < 0.5 * dur:
                a, b = 0.0, dur
            env_T = np.minimum(t - a, b - t)
            env_T *= 10.0
            env_T += 0.5
            np.clip(env_T, 0.0, 1.0, out=env_T)
            env_T *= 0.7
            env_T += 0.3
        if p.am[1] > 0:
            np.multiply(t, 2 * np.pi * p.am[0] * rate_mult, out=tmp_T)
            tmp_T += 2 * np.pi * q[9]
            np.sin(tmp_T, out=tmp_T)
            tmp_T *= -0.5 * p.am[1]
            tmp_T += 1.0 - 0.5 * p.am[1]
            env_T *= tmp_T
        env_T *= gain

        # Band-limited wavetable: harmonics above Nyquist (at the highest pitch) are dropped.
        amps_K = np.asarray(p.harmonics) * self.k_K**tilt * (0.7 + 0.6 * rng.random(_N_HARMONICS))
        amps_K[self.k_K * f_max >= 0.95 * nyquist] = 0.0
        table_P = amps_K.astype(np.float32) @ self.basis_KP
        table_P *= p.tone_gain / (np.abs(table_P).max() + 1e-6)
        np.floor(phase_T, out=tmp_T)
        np.subtract(phase_T, tmp_T, out=tmp_T)
        tmp_T *= _TABLE_POINTS
        x_T = np.take(table_P, tmp_T.astype(np.int32))
        if p.partial[1] > 0 and p.partial[0] * f_max < 0.95 * nyquist:
            phase_T *= 2 * np.pi * p.partial[0]
            np.sin(phase_T, out=phase_T)
            phase_T *= p.tone_gain * p.partial[1]
            x_T += phase_T

        # Band noise read at speed `shift`, which scales its band by the same pitch shift.
        clip = self.band_bank[int(q[10] * len(_NOISE_BANDS))]
        start = q[11] * (clip.shape[0] - self.n * _MAX_SHIFT - 1)
        np.multiply(self.arange_T, shift, out=tmp_T)
        tmp_T += start
        noise_T = np.take(clip, tmp_T.astype(np.int32))
        noise_T *= p.noise_gain
        x_T += noise_T
        x_T *= env_T
        # Brightness also tilts the whole object sound: y[n] = x[n] - c x[n-1] with c from -0.6
        # (darker, low-pass) to 0.6 (brighter, high-pass).
        c = 1.2 * latent["brightness"] - 0.6
        x_T[1:] -= c * x_T[:-1]
        return x_T

    def room(self, x_CT: np.ndarray, dom: _Domain, q_echo: list[float]) -> None:
        """The domain's reverberation taps and pre-emphasis, in place along the last axis, the
        same on every channel. ``q_echo`` holds one uniform draw per tap."""
        if dom.echoes:
            dry_CT = x_CT.copy()
            g = 0.5
            for i in range(dom.echoes):
                d = int((0.01 + 0.11 * q_echo[i]) * self.sr)
                x_CT[..., d:] += g * dry_CT[..., :-d]
                g *= 0.6
        if dom.preemphasis:
            x_CT[..., 1:] -= dom.preemphasis * x_CT[..., :-1]

    def _distractors(self, rng: np.random.Generator, x_T: np.ndarray, dom: _Domain) -> None:
        """Add unrelated events in place: steady tones, glides, click trains, noise bursts.

        They overlap the class cues (pitch, pulses, noise) so that a representation has to
        find the structure that belongs to the object, not any energy at all.
        """
        nyquist = self.sr / 2
        n_events = int(rng.integers(_DISTRACT_N[0], _DISTRACT_N[1] + 1))
        for r in rng.random((n_events, 6)).tolist():
            kind = dom.distractors[int(r[0] * len(dom.distractors))]
            n_ev = min(self.n, int((0.1 + 0.6 * r[1]) * self.sr))
            start = int(r[2] * (self.n - n_ev))
            k_E = self.arange_T[:n_ev]
            win_E = np.minimum(1.0, np.minimum(k_E, n_ev - k_E) * (50.0 / self.sr))  # 20 ms ramps
            amp = _DISTRACT_AMP[0] + (_DISTRACT_AMP[1] - _DISTRACT_AMP[0]) * r[3]
            f = math.exp(math.log(100.0) + r[4] * math.log(0.3 * nyquist / 100.0))
            if kind == "tone":
                ph_E = (f / self.sr) * k_E
                ev_E = np.sin(2 * np.pi * ph_E) + 0.5 * np.sin(4 * np.pi * ph_E)
            elif kind == "glide":
                glide = 1.5 * r[5] - 0.5  # from half to double the start frequency
                ph_E = (f / self.sr) * (k_E + (0.5 * glide / n_ev) * k_E * k_E)
                ev_E = np.sin(2 * np.pi * ph_E)
            else:
                band = self.band_bank[int(r[5] * len(_NOISE_BANDS))]
                off = int(r[4] * (band.shape[0] - n_ev))
                ev_E = band[off:off + n_ev]
                if kind == "clicks":
                    rate = 3.0 + 12.0 * r[5]
                    pos_E = k_E * (rate / self.sr)
                    ev_E = ev_E * np.exp((pos_E - np.floor(pos_E)) * (-1.0 / (rate * 0.01)))
            x_T[start:start + n_ev] += (amp * win_E) * ev_E


def _noise_clips(rng: np.random.Generator, mag_F: np.ndarray, n_clips: int, length: int
                 ) -> np.ndarray:
    """(n_clips, length) float32 noise with spectral magnitude ``mag_F`` and unit RMS."""
    phase = rng.random((n_clips, mag_F.shape[0])) * (2 * np.pi)
    x = np.fft.irfft(mag_F * np.exp(1j * phase), n=length, axis=-1)
    x /= np.sqrt(np.mean(x**2, axis=-1, keepdims=True)) + 1e-12
    return x.astype(np.float32)


# --- the dataset -----------------------------------------------------------------------------


def _streams(seed: int, pool: str, index: int) -> tuple[np.random.Generator, np.random.Generator]:
    """The two random streams of one sample: (image stream, sound stream).

    Both start from ``SeedSequence([seed, pool id, index])``; the sound stream is the same PCG64
    stream advanced by 2**64 draws, so the two never overlap and the image of a sample does not
    depend on whether its sound is rendered. The first three draws of the image stream are the
    shared latents.
    """
    ss = np.random.SeedSequence([seed, _POOL_ID[pool], index])
    sound_bits = np.random.PCG64(ss)
    sound_bits.advance(1 << 64)
    return np.random.Generator(np.random.PCG64(ss)), np.random.Generator(sound_bits)


def _draw_latents(image_rng: np.random.Generator) -> dict[str, float]:
    u = image_rng.random(3).tolist()
    return {"size": u[0], "brightness": u[1], "texture": u[2]}


class _SampleSource(Protocol):
    """What a _Pool needs from its dataset: ProceduralAV or binaural.BinauralScenes."""

    cfg: ProceduralConfig

    def _generate(self, pool: str, index: int, keys: tuple[str, ...]
                  ) -> dict[str, torch.Tensor]: ...


class _Pool(Dataset):
    """One pool of a ProceduralAV; items are dicts of tensors (see ``ProceduralAV.pool``)."""

    def __init__(self, owner: _SampleSource, name: str, size: int,
                 keys: tuple[str, ...] | None = None) -> None:
        self.owner = owner
        self.name = name
        self.size = size
        self.keys = _POOL_KEYS[name] if keys is None else keys
        self._cache: dict[int, dict[str, torch.Tensor]] | None = (
            {} if owner.cfg.cache_in_memory else None
        )

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = int(index)
        if not 0 <= index < self.size:
            raise IndexError(f"{self.name}: index {index} out of range 0..{self.size - 1}")
        if self._cache is not None and index in self._cache:
            item = self._cache[index]
        else:
            item = self.owner._generate(self.name, index, self.keys)
            if self._cache is not None:
                self._cache[index] = item
        # Clones keep the cache safe from in-place edits by the caller.
        return {k: v.clone() for k, v in item.items()}


def data_info(c: ProceduralConfig, *, sound_channels: int) -> DataInfo:
    """What a method needs to know about the data ``c`` describes (RGB images)."""
    return DataInfo(
        image_channels=3,
        sound_channels=sound_channels,
        image_size=c.image_size,
        n_mels=c.n_mels,
        n_frames=c.n_frames,
        num_classes=c.num_classes,
        paired_size=c.paired_size,
        unpaired_sound_size=c.unpaired_sound_size,
        unpaired_image_size=c.unpaired_image_size,
    )


class ProceduralAV:
    """The procedural audio-visual dataset: seven pools over one generator (module docstring).

    ``pool(name)[i]`` is a pure function of (cfg, name, i). The generator holds the coordinate
    grids, oscillator tables and the one log-mel module that every sample reuses.
    """

    def __init__(self, cfg: ProceduralConfig) -> None:
        self.cfg = cfg
        self.images = _ImageRenderer(cfg.image_size)
        self.sounds = _SoundSynth(cfg.sample_rate, cfg.clip_samples, cfg.seed)
        self.logmel = LogMel(sample_rate=cfg.sample_rate, n_mels=cfg.n_mels,
                             n_frames=cfg.n_frames, clip_seconds=cfg.clip_seconds)
        self._pools: dict[str, _Pool] = {}
        self._blocks: dict[tuple[str, int], list[int]] = {}  # memoised class order per block

    def pool(self, name: str) -> Dataset:
        """The dataset of pool ``name`` (one of POOLS); created once and reused."""
        if name not in POOLS:
            raise ValueError(f"pool: unknown pool {name!r}; choose one of {', '.join(POOLS)}")
        if name not in self._pools:
            self._pools[name] = _Pool(self, name, getattr(self.cfg, f"{name}_size"))
        return self._pools[name]

    @property
    def class_names(self) -> list[str]:
        return list(CLASS_NAMES[: self.cfg.num_classes])

    def info(self) -> DataInfo:
        return data_info(self.cfg, sound_channels=1)

    # Ground truth for evaluation, tests and analysis; pretraining never reads it.

    def label(self, pool: str, index: int) -> int:
        """Class id of sample ``index``: classes are balanced within each block of
        ``num_classes`` consecutive indices, in a per-block random order."""
        k = self.cfg.num_classes
        key = (pool, index // k)
        order = self._blocks.get(key)
        if order is None:
            block = np.random.SeedSequence([self.cfg.seed, _POOL_ID[pool], index // k],
                                           spawn_key=(0,))
            order = self._blocks[key] = np.argsort(block.generate_state(k)).tolist()
        return order[index % k]

    def latents(self, pool: str, index: int) -> dict[str, float]:
        """The latent factors shared by the image and the sound of one sample, each in [0, 1]."""
        return _draw_latents(_streams(self.cfg.seed, pool, index)[0])

    def waveform(self, pool: str, index: int) -> torch.Tensor:
        """The raw waveform (T,) behind sample ``index``'s log-mel, for listening and tests."""
        image_rng, sound_rng = _streams(self.cfg.seed, pool, index)
        latent = _draw_latents(image_rng)
        label = self.label(pool, index)
        return torch.from_numpy(self.sounds.render(sound_rng, label, latent, _POOL_DOMAIN[pool]))

    def _generate(self, pool: str, index: int, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
        if pool not in POOLS:
            raise ValueError(f"pool: unknown pool {pool!r}; choose one of {', '.join(POOLS)}")
        label = self.label(pool, index)
        image_rng, sound_rng = _streams(self.cfg.seed, pool, index)
        latent = _draw_latents(image_rng)
        domain = _POOL_DOMAIN[pool]
        out: dict[str, torch.Tensor] = {}
        if "image" in keys:
            img_3SS = self.images.render(image_rng, label, latent, _DOMAINS[domain])
            out["image"] = torch.from_numpy(img_3SS)
        if "sound" in keys:
            wave_T = self.sounds.render(sound_rng, label, latent, domain)
            out["sound"] = self.logmel(torch.from_numpy(wave_T))
        if "label" in keys:
            out["label"] = torch.tensor(label, dtype=torch.int64)
        out["index"] = torch.tensor(index, dtype=torch.int64)
        return out
