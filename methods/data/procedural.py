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

from typing import ClassVar

import numpy as np
import torch

from methods.data.config import DataConfig
from methods.data.images import ImageRenderer
from methods.data.logmel import LogMel
from methods.data.pools import POOL_DOMAIN, POOL_ID, POOL_KEYS, SyntheticAV, check_pool
from methods.data.prototypes import DOMAINS
from methods.data.sounds import SoundSynth

__all__ = ["ProceduralAV"]


def _streams(seed: int, pool: str, index: int) -> tuple[np.random.Generator, np.random.Generator]:
    """The two random streams of one sample: (image stream, sound stream).

    Both start from ``SeedSequence([seed, pool id, index])``; the sound stream is the same PCG64
    stream advanced by 2**64 draws, so the two never overlap and the image of a sample does not
    depend on whether its sound is rendered. The first three draws of the image stream are the
    shared latents.
    """
    ss = np.random.SeedSequence([seed, POOL_ID[pool], index])
    sound_bits = np.random.PCG64(ss)
    sound_bits.advance(1 << 64)
    return np.random.Generator(np.random.PCG64(ss)), np.random.Generator(sound_bits)


def _draw_latents(image_rng: np.random.Generator) -> dict[str, float]:
    u = image_rng.random(3).tolist()
    return {"size": u[0], "brightness": u[1], "texture": u[2]}


class ProceduralAV(SyntheticAV):
    """The procedural audio-visual dataset: eight pools over one generator (module docstring).

    ``pool(name)[i]`` is a pure function of (cfg, name, i). The generator holds the coordinate
    grids, oscillator tables and the one log-mel module that every sample reuses.
    """

    sound_channels: ClassVar[int] = 1
    pool_keys: ClassVar[dict[str, tuple[str, ...]]] = POOL_KEYS

    def __init__(self, cfg: DataConfig) -> None:
        super().__init__(cfg)
        self.images = ImageRenderer(cfg.image_size)
        self.sounds = SoundSynth(cfg.sample_rate, cfg.clip_samples, cfg.seed)
        self.logmel = LogMel(sample_rate=cfg.sample_rate, n_mels=cfg.n_mels,
                             n_frames=cfg.n_frames, clip_seconds=cfg.clip_seconds)

    # Ground truth for evaluation, tests and analysis; pretraining never reads it.

    def latents(self, pool: str, index: int) -> dict[str, float]:
        """The latent factors shared by the image and the sound of one sample, each in [0, 1]."""
        return _draw_latents(_streams(self.cfg.seed, pool, index)[0])

    def waveform(self, pool: str, index: int) -> torch.Tensor:
        """The raw waveform (T,) behind sample ``index``'s log-mel, for listening and tests."""
        image_rng, sound_rng = _streams(self.cfg.seed, pool, index)
        latent = _draw_latents(image_rng)
        label = self.label(pool, index)
        return torch.from_numpy(self.sounds.render(sound_rng, label, latent, POOL_DOMAIN[pool]))

    def _generate(self, pool: str, index: int, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
        check_pool(pool)
        label = self.label(pool, index)
        image_rng, sound_rng = _streams(self.cfg.seed, pool, index)
        latent = _draw_latents(image_rng)
        domain = POOL_DOMAIN[pool]
        out: dict[str, torch.Tensor] = {}
        if "image" in keys:
            img_3SS = self.images.render(image_rng, label, latent, DOMAINS[domain])
            out["image"] = torch.from_numpy(img_3SS)
        if "sound" in keys:
            wave_T = self.sounds.render(sound_rng, label, latent, domain)
            out["sound"] = self.logmel(torch.from_numpy(wave_T))
        if "label" in keys:
            out["label"] = torch.tensor(label, dtype=torch.int64)
        out["index"] = torch.tensor(index, dtype=torch.int64)
        return out

