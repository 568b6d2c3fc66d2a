"""Class prototypes and domains of the procedural data: what each class looks and sounds like,
and how the "main", "other" and "transfer" domains shift the background, palette and acoustics."""

from __future__ import annotations

import math
from dataclasses import dataclass


N_HARMONICS = 8


@dataclass(frozen=True)
class VisualProto:
    shape: str  # signed-distance shape, see _shape_sdf
    texture: str  # see _texture
    hue: float  # centre of the class hue range (HSV, 0..1)
    texture_depth: float  # 0 = plain colour, 1 = full contrast between the two texture colours


@dataclass(frozen=True)
class SoundProto:
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
# stays far below a supervised one. Class hues overlap (+-HUE_SPREAD around each class hue),
# so colour alone is a weak cue; objects are saturated and backgrounds muted, so the shape can
# still be found; rotations stay small enough that no shape turns into another.
HUE_SPREAD = 0.25
BACKGROUND_SATURATION = 0.25  # upper bound
OBJECT_SATURATION = 0.6  # lower bound
MAX_ROTATION = 0.6  # radians either way
RADIUS = (0.35, 0.7)  # object radius in half-sides, for size latent 0 and 1
VISUAL: tuple[VisualProto, ...] = (
    VisualProto("plus", "stripes_u", 0.00, 0.6),
    VisualProto("half_disc", "stripes_v", 0.10, 0.6),
    VisualProto("chevron", "dots", 0.20, 0.7),
    VisualProto("ring", "diagonal", 0.30, 0.6),
    VisualProto("box", "checker", 0.40, 0.6),
    VisualProto("triangle", "rings", 0.50, 0.6),
    VisualProto("ellipse", "shade", 0.60, 0.6),
    VisualProto("crescent", "waves", 0.70, 0.6),
    VisualProto("clock", "plain", 0.80, 0.0),
    VisualProto("figure_eight", "dots", 0.90, 0.7),
)

_SAW = tuple(1.0 / k for k in range(1, N_HARMONICS + 1))
_SQUARE = tuple((1.0 / k if k % 2 else 0.05) for k in range(1, N_HARMONICS + 1))
_SOFT = (1.0, 0.6, 0.4, 0.25, 0.1, 0.05, 0.0, 0.0)
_FORMANT = (0.4, 0.7, 1.0, 0.8, 0.4, 0.2, 0.1, 0.05)
_SINE = (1.0, 0.3, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0)
SOUND: tuple[SoundProto, ...] = (
    # f0, harmonics, partial, vibrato, sweep, chirp, am, pulse, jitter, noise, tone
    # drone: buzzy saw throbbing at a medium rate
    SoundProto((120, 400), _SAW, (0, 0), (0, 0), (0, 0), 0.0, (7, 0.6), (0, 0), 0.0, 0.3, 1.0),
    # boat: hollow square-ish hum with a slow swell and drift
    SoundProto((110, 300), _SQUARE, (0, 0), (0, 0), (0.3, 0.04), 0.0, (2, 0.6), (0, 0), 0.0,
                0.4, 1.0),
    # bird: near-sinusoidal chirps rising within each pulse
    SoundProto((250, 520), _SINE, (0, 0), (0, 0), (0, 0), 0.5, (0, 0), (6, 0.06), 0.2, 0.1, 1.0),
    # siren: wide slow pitch sweep
    SoundProto((180, 450), _SOFT, (0, 0), (0, 0), (0.6, 0.25), 0.0, (0, 0), (0, 0), 0.0,
                0.15, 1.0),
    # engine: rich tone with fast firing-rate AM under strong noise
    SoundProto((110, 250), tuple(1 / math.sqrt(k) for k in range(1, 9)), (0, 0), (0, 0),
                (0, 0), 0.0, (11, 0.6), (0, 0), 0.0, 0.9, 0.6),
    # bell: inharmonic strikes that decay slowly
    SoundProto((200, 500), (1, 0.2, 0.5, 0, 0.2, 0, 0, 0), (2.76, 0.6), (0, 0), (0, 0), 0.0,
                (0, 0), (1.0, 0.4), 0.0, 0.05, 1.0),
    # dog: formant-like barks gliding down, with noise
    SoundProto((150, 350), _FORMANT, (0, 0), (0, 0), (0, 0), -0.2, (0, 0), (2.5, 0.09), 0.15,
                0.5, 1.0),
    # rain: irregular noise drops over a faint tone
    SoundProto((200, 500), _SINE, (0, 0), (0, 0), (0, 0), 0.0, (0, 0), (12, 0.015), 0.6, 1.5,
                0.1),
    # clock: regular short ticks with a high ping
    SoundProto((300, 520), (1, 0.1, 0.3, 0, 0, 0, 0, 0), (3.1, 0.4), (0, 0), (0, 0), 0.0,
                (0, 0), (2, 0.012), 0.0, 1.0, 0.6),
    # violin: bright saw with vibrato
    SoundProto((180, 480), _SAW, (0, 0), (6, 0.025), (0, 0), 0.0, (0, 0), (0, 0), 0.0, 0.05,
                1.0),
)
# Noise bands (Hz) shared by all classes; each instance draws one.
NOISE_BANDS: tuple[tuple[float, float], ...] = (
    (150, 600), (300, 900), (500, 1500), (900, 2200), (1400, 3000), (250, 3000), (700, 3000),
    (150, 1500),
)


@dataclass(frozen=True)
class Domain:
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


DOMAINS: dict[str, Domain] = {
    "main": Domain(0.0, 1.0, "gradient", (2, 5), 0.03, 1.0, (0.01, 0.05), 0, 0.0,
                    ("tone", "glide", "clicks", "burst")),
    "other": Domain(0.08, 0.7, "stripes", (3, 6), 0.05, 2.0, (0.02, 0.06), 5, 0.0,
                     ("clicks", "burst", "burst", "glide")),
    "transfer": Domain(-0.06, 0.85, "dark", (1, 4), 0.05, 0.0, (0.01, 0.04), 2, 0.6,
                        ("tone", "tone", "glide", "clicks")),
}


