"""The log-mel front end that procedural and real audio both go through."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torchaudio


# Log-mel front end: natural log of mel power with a floor, then a fixed affine map. The
# constants were measured on the main domain of the default config (mean / std over all
# bins and frames of the paired pool) and are kept fixed so that every preset, domain and real
# recording goes through the same map.
LOGMEL_FLOOR: float = 1e-5
LOGMEL_MEAN: float = -3.7
LOGMEL_STD: float = 2.2


def logmel_geometry(sample_rate: int, clip_seconds: float, n_frames: int) -> tuple[int, int]:
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
        self.n_fft, self.hop_length = logmel_geometry(sample_rate, clip_seconds, n_frames)
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


