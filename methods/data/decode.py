"""Decoding real files into the tensors methods read: sounds (wav, flac, ogg via soundfile; any
container with an audio stream via PyAV), images (png, jpg via Pillow; a frame of a video via
PyAV), resampled with torchaudio and turned into the same log-mels as the procedural data.

Every failure is a ``DataError`` whose message starts with the file, so a caller can list the
first offending files and a count.

Legend: C channels (1 mono, 2 binaural), T samples, F mel bins, N frames, S image side.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torchaudio
from PIL import Image, UnidentifiedImageError

from methods.data.config import DataConfig
from methods.data.logmel import LogMel

VIDEO_SUFFIXES = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v")
SILENCE_RMS = 1e-5  # below this a clip counts as silent


class DataError(ValueError):
    """A dataset file that cannot be used; the message starts with the file path."""


@dataclass(frozen=True)
class FeatureSettings:
    """What decoding produces: S×S RGB images, C-channel log-mels of F mel bins × N frames
    from ``clip_seconds`` of sound at ``sample_rate``. Part of the feature cache's key."""

    image_size: int = 32
    sample_rate: int = 8000
    clip_seconds: float = 2.0
    n_mels: int = 40
    n_frames: int = 64
    channels: int = 1

    @classmethod
    def from_config(cls, cfg: DataConfig) -> FeatureSettings:
        return cls(image_size=cfg.image_size, sample_rate=cfg.sample_rate, clip_seconds=float(cfg.clip_seconds),
                   n_mels=cfg.n_mels, n_frames=cfg.n_frames, channels=2 if cfg.binaural else 1)

    @property
    def clip_samples(self) -> int:
        return int(round(self.sample_rate * self.clip_seconds))

    def key(self) -> str:
        """A stable text form (for hashing)."""
        return ",".join(f"{k}={v}" for k, v in sorted(asdict(self).items()))


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def _frame_samples(frame) -> np.ndarray:  # noqa: ANN001 (a PyAV AudioFrame)
    """(C, T) float32 samples of one decoded audio frame, planar or packed, ints scaled to [-1, 1]."""
    a = frame.to_ndarray()
    c = len(frame.layout.channels)
    a = a.reshape(c, -1) if frame.format.is_planar else a.reshape(-1, c).T
    if np.issubdtype(a.dtype, np.integer):
        return a.astype(np.float32) / np.iinfo(a.dtype).max
    return a.astype(np.float32)


def _read_audio(path: Path, offset: float, duration: float | None) -> tuple[np.ndarray, int]:
    """(C, T) float32 samples and their rate, from ``offset`` seconds for ``duration`` seconds."""
    if not path.is_file():
        raise DataError(f"{path}: missing file")
    if is_video(path):
        import av  # PyAV: only needed for video containers

        try:
            with av.open(str(path)) as container:
                if not container.streams.audio:
                    raise DataError(f"{path}: no audio stream")
                stream = container.streams.audio[0]
                rate = int(stream.rate)
                chunks = [_frame_samples(frame) for frame in container.decode(stream)]
        except DataError:
            raise
        except Exception as exc:  # PyAV raises many error types for broken files
            raise DataError(f"{path}: unreadable video ({type(exc).__name__}: {exc})") from None
        if not chunks:
            raise DataError(f"{path}: empty audio stream")
        data = np.concatenate(chunks, axis=1)
        start = int(round(offset * rate))
        stop = None if duration is None else start + int(round(duration * rate))
        return np.ascontiguousarray(data[:, start:stop], dtype=np.float32), rate
    import soundfile as sf

    try:
        info = sf.info(str(path))
        start = int(round(offset * info.samplerate))
        frames = -1 if duration is None else int(round(duration * info.samplerate))
        data, rate = sf.read(str(path), start=start, frames=frames, dtype="float32", always_2d=True)
    except Exception as exc:
        raise DataError(f"{path}: unreadable audio ({type(exc).__name__}: {exc})") from None
    return np.ascontiguousarray(data.T), int(rate)


@functools.lru_cache(maxsize=16)
def _resampler(orig: int, new: int) -> torchaudio.transforms.Resample:
    """One resampling filter per pair of rates, built once per process (not per file)."""
    return torchaudio.transforms.Resample(orig, new)


def load_sound(
    path: str | Path, settings: FeatureSettings, *, offset: float = 0.0, duration: float | None = None
) -> torch.Tensor:
    """A (C, clip_samples) waveform at ``settings.sample_rate``: the first ``clip_seconds`` from
    ``offset`` (of at most ``duration`` seconds). Mono files are copied to both ears for C = 2;
    binaural C = 2 reads the first two channels; C = 1 averages the channels.

    Raises DataError (message starts with the path) for a missing or unreadable file, a clip
    shorter than ``clip_seconds``, non-finite samples or silence.
    """
    path = Path(path)
    data_CT, rate = _read_audio(path, offset, duration)
    if data_CT.shape[1] == 0:
        raise DataError(f"{path}: no samples at offset {offset} s")
    if not np.isfinite(data_CT).all():
        raise DataError(f"{path}: non-finite samples (NaN or inf)")
    wave = torch.from_numpy(data_CT)
    if settings.channels == 1:
        wave = wave.mean(dim=0, keepdim=True)
    elif wave.shape[0] == 1:
        wave = wave.expand(2, -1)
    else:
        wave = wave[:2]
    if rate != settings.sample_rate:
        wave = _resampler(rate, settings.sample_rate)(wave)
    need = settings.clip_samples
    if wave.shape[1] < need:
        raise DataError(
            f"{path}: clip of {wave.shape[1] / settings.sample_rate:.3f} s from offset {offset} s is shorter "
            f"than the {settings.clip_seconds} s window"
        )
    wave = wave[:, :need].contiguous()
    if float(wave.pow(2).mean().sqrt()) < SILENCE_RMS:
        raise DataError(f"{path}: silent clip (RMS below {SILENCE_RMS:g}) at offset {offset} s")
    return wave


def sound_features(wave_CT: torch.Tensor, settings: FeatureSettings, logmel: LogMel | None = None) -> torch.Tensor:
    """(C, F, N) normalised log-mel, the procedural data's front end, channel by channel."""
    logmel = logmel or LogMel(sample_rate=settings.sample_rate, n_mels=settings.n_mels,
                              n_frames=settings.n_frames, clip_seconds=settings.clip_seconds)
    return torch.stack([logmel(channel).reshape(settings.n_mels, settings.n_frames) for channel in wave_CT])


def load_image(path: str | Path, settings: FeatureSettings, *, time: float | None = None) -> torch.Tensor:
    """A (3, S, S) uint8 RGB image: the file itself, or for a video the frame at ``time`` seconds
    (its middle when ``time`` is None). Resized so the short side is S, then centre-cropped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: missing file")
    if is_video(path):
        img = _video_frame(path, time)
    else:
        try:
            with Image.open(path) as opened:
                img = opened.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DataError(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from None
    s = settings.image_size
    w, h = img.size
    scale = s / min(w, h)
    img = img.resize((max(s, math.ceil(w * scale)), max(s, math.ceil(h * scale))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - s) // 2, (h - s) // 2
    img = img.crop((left, top, left + s, top + s))
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def _video_frame(path: Path, time: float | None) -> Image.Image:
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DataError(f"{path}: no video stream")
            stream = container.streams.video[0]
            duration = float(stream.duration * stream.time_base) if stream.duration else (
                container.duration / 1e6 if container.duration else 0.0)
            target = duration / 2 if time is None else time
            best = None
            for frame in container.decode(stream):
                best = frame
                if frame.time is not None and frame.time >= target:
                    break
            if best is None:
                raise DataError(f"{path}: no video frames")
            return best.to_image().convert("RGB")
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: unreadable video ({type(exc).__name__}: {exc})") from None
