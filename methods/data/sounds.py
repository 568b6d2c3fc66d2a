"""Sound synthesis of the procedural data: a class's harmonic source with its envelope and
modulation, in background noise and distractor events."""

from __future__ import annotations

import math

import numpy as np

from methods.data.prototypes import DOMAINS, N_HARMONICS, NOISE_BANDS, SOUND, Domain, SoundProto


_TABLE_POINTS = 512

BANK_CLIPS = 4  # background noise clips per domain
_MAX_SHIFT = 2.0 ** (4.0 / 12.0)  # the largest pitch shift the size latent produces
_DISTRACT_N = (2, 5)  # number of distractor events per clip
_DISTRACT_AMP = (0.03, 0.2)  # their peak amplitude


class SoundSynth:
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
        self.k_K = np.arange(1, N_HARMONICS + 1, dtype=np.float64)
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
            for lo, hi in NOISE_BANDS
        ])
        self.domain_bank: dict[str, np.ndarray] = {}
        for name, dom in DOMAINS.items():
            colour = np.maximum(freqs, 20.0) ** (-dom.noise_colour / 2.0)
            self.domain_bank[name] = _noise_clips(rng, colour, BANK_CLIPS, length)

    def render(self, rng: np.random.Generator, cls: int, latent: dict[str, float],
               dom_name: str) -> np.ndarray:
        """One waveform (T,) float32: the object's sound, then the domain's clutter and room."""
        dom = DOMAINS[dom_name]
        q = rng.random(24).tolist()
        x_T = self.source(rng, cls, latent, q)

        # Clutter: unrelated events, then the domain's background noise.
        self._distractors(rng, x_T, dom)
        bank = self.domain_bank[dom_name][int(q[13] * BANK_CLIPS)]
        start = int(q[14] * (bank.shape[0] - self.n))
        level = dom.noise_level[0] + (dom.noise_level[1] - dom.noise_level[0]) * q[15]
        x_T += bank[start:start + self.n] * np.float32(level)
        self.room(x_T, dom, q[16:])
        return x_T

    def source(self, rng: np.random.Generator, cls: int, latent: dict[str, float],
               q: list[float]) -> np.ndarray:
        """The dry sound of one object (T,) float32, before clutter and room.

        ``q`` holds the instance's uniform draws (at least 12 are read); ``rng`` draws the
        harmonic amplitudes. Operations run in place on a few float32 buffers (``tmp_T`` is the
        scratch one): at this size numpy's cost is mostly allocation and memory traffic.
        """
        p = SOUND[cls]
        # Shared latents: bigger objects are louder and lower; brighter ones have more high
        # harmonics; finer textures modulate faster.
        shift = 2.0 ** ((4.0 - 8.0 * latent["size"]) / 12.0)
        gain = 10.0 ** ((-12.0 + 14.0 * latent["size"]) / 20.0) * 0.3
        tilt = -1.2 + 1.6 * latent["brightness"]
        rate_mult = 0.7 + 0.8 * latent["texture"]
        f0 = math.exp(math.log(p.f0[0]) + q[0] * math.log(p.f0[1] / p.f0[0])) * shift
        tmp_T = np.empty_like(self.t_T)
        phase_T, f_max = self._phase(p, f0, q, rate_mult, tmp_T)
        if p.pulse[0] > 0:
            env_T, f_max = self._pulses(p, f0, f_max, q, rate_mult, phase_T, tmp_T)
        else:
            env_T = self._sustained(q)
        if p.am[1] > 0:
            np.multiply(self.t_T, 2 * np.pi * p.am[0] * rate_mult, out=tmp_T)
            tmp_T += 2 * np.pi * q[9]
            np.sin(tmp_T, out=tmp_T)
            tmp_T *= -0.5 * p.am[1]
            tmp_T += 1.0 - 0.5 * p.am[1]
            env_T *= tmp_T
        env_T *= gain
        x_T = self._tone(rng, p, tilt, f_max, phase_T, tmp_T)
        x_T += self._band_noise(p, q, shift, tmp_T)
        x_T *= env_T
        # Brightness also tilts the whole object sound: y[n] = x[n] - c x[n-1] with c from -0.6
        # (darker, low-pass) to 0.6 (brighter, high-pass).
        c = 1.2 * latent["brightness"] - 0.6
        x_T[1:] -= c * x_T[:-1]
        return x_T

    def _phase(self, p: SoundProto, f0: float, q: list[float], rate_mult: float, tmp_T: np.ndarray
               ) -> tuple[np.ndarray, float]:
        """Phase in cycles (T,) with vibrato and sweep, and the highest frequency reached.

        Integrated in closed form: f(t) = f0 (1 + d sin(w t + phi)) gives
        phase = f0 t - f0 d cos(w t + phi) / w."""
        t = self.t_T
        phase_T = f0 * t
        phase_T += q[1]
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
        return phase_T, f_max

    def _pulses(self, p: SoundProto, f0: float, f_max: float, q: list[float], rate_mult: float, phase_T: np.ndarray,
                tmp_T: np.ndarray) -> tuple[np.ndarray, float]:
        """The envelope of a pulse train (time since the last onset, optionally with irregular
        timing), gliding each pulse's pitch by ``p.chirp`` (added to ``phase_T``)."""
        t = self.t_T
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
        return env_T, f_max

    def _sustained(self, q: list[float]) -> np.ndarray:
        """The envelope of a sustained sound: fades in and out at random moments."""
        t = self.t_T
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
        return env_T

    def _tone(self, rng: np.random.Generator, p: SoundProto, tilt: float, f_max: float, phase_T: np.ndarray,
              tmp_T: np.ndarray) -> np.ndarray:
        """The harmonic tone read from a band-limited wavetable: harmonics above Nyquist (at the
        highest pitch) are dropped; plus the class's inharmonic partial. Consumes ``phase_T``."""
        nyquist = self.sr / 2
        amps_K = np.asarray(p.harmonics) * self.k_K**tilt * (0.7 + 0.6 * rng.random(N_HARMONICS))
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
        return x_T

    def _band_noise(self, p: SoundProto, q: list[float], shift: float, tmp_T: np.ndarray) -> np.ndarray:
        """Band noise read at speed ``shift``, which scales its band by the same pitch shift."""
        clip = self.band_bank[int(q[10] * len(NOISE_BANDS))]
        start = q[11] * (clip.shape[0] - self.n * _MAX_SHIFT - 1)
        np.multiply(self.arange_T, shift, out=tmp_T)
        tmp_T += start
        noise_T = np.take(clip, tmp_T.astype(np.int32))
        noise_T *= p.noise_gain
        return noise_T

    def room(self, x_CT: np.ndarray, dom: Domain, q_echo: list[float]) -> None:
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

    def _distractors(self, rng: np.random.Generator, x_T: np.ndarray, dom: Domain) -> None:
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
                band = self.band_bank[int(r[5] * len(NOISE_BANDS))]
                off = int(r[4] * (band.shape[0] - n_ev))
                ev_E = band[off:off + n_ev]
                if kind == "clicks":
                    rate = 3.0 + 12.0 * r[5]
                    pos_E = k_E * (rate / self.sr)
                    ev_E = ev_E * np.exp((pos_E - np.floor(pos_E)) * (-1.0 / (rate * 0.01)))
            x_T[start:start + n_ev] += (amp * win_E) * ev_E


def glide(x_T: np.ndarray, octaves: float) -> np.ndarray:
    """``x_T`` read along a time course that moves its pitch by ``octaves`` over the clip (up when
    positive, down when negative), first and last samples in place: sample u in [0, 1] of the
    output reads the input at phi(u) = (2^(r u) - 1) / (2^r - 1), so the reading speed, and every
    frequency with it, grows by a factor 2^r from start to end. Components that the fastest
    reading would carry past Nyquist are removed first, so nothing aliases. float32 (T,)."""
    if octaves == 0:
        return x_T
    n, r = x_T.shape[0], float(octaves)
    fastest = r * math.log(2.0) * max(1.0, 2.0 ** r) / (2.0 ** r - 1.0)
    if fastest > 1.0:
        x_F = np.fft.rfft(x_T)
        x_F[int(0.95 * (x_F.shape[0] - 1) / fastest):] = 0.0
        x_T = np.fft.irfft(x_F, n=n)
    phi_T = (np.exp2(r * np.linspace(0.0, 1.0, n)) - 1.0) * ((n - 1) / (2.0 ** r - 1.0))
    return np.interp(phi_T, np.arange(n), x_T).astype(np.float32)


def _noise_clips(rng: np.random.Generator, mag_F: np.ndarray, n_clips: int, length: int
                 ) -> np.ndarray:
    """(n_clips, length) float32 noise with spectral magnitude ``mag_F`` and unit RMS."""
    phase = rng.random((n_clips, mag_F.shape[0])) * (2 * np.pi)
    x = np.fft.irfft(mag_F * np.exp(1j * phase), n=length, axis=-1)
    x /= np.sqrt(np.mean(x**2, axis=-1, keepdims=True)) + 1e-12
    return x.astype(np.float32)


