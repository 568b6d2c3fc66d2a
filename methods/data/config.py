"""The ``data`` section of a config: pool sizes, shapes and the switches to binaural scenes or
to a real dataset's manifest."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from methods.base import neutral_field
from methods.data.logmel import logmel_geometry
from methods.data.pools import CLASS_NAMES, POOLS

_MAX_POOL_SIZE = 10_000_000
_MAX_PER_PAIR = 1000  # BMA-Memory's largest unpaired volume is 36 x its pairs
_MAX_CLIP_SAMPLES = 320_000  # bounds the noise banks (~20 clips of twice this length)


@dataclass(frozen=True)
class DataConfig:
    """A run's data section: the procedural (or binaural) dataset's sizes and shapes, or a real
    dataset's manifest with its feature settings. Defaults are the CPU-sized ``tiny`` preset.

    The paper preset uses ``image_size=224, sample_rate=16000, n_mels=150, n_frames=200``.
    ``cache_in_memory`` memoises generated samples per process: right for pools of a few
    thousand items, wasteful for pools of hundreds of thousands.

    ``binaural`` switches to binaural scenes (``methods.data.binaural``): a 360° image strip of
    ``image_size`` x ``panorama_width`` pixels, two-channel sound, up to ``max_objects`` objects
    per scene, and an azimuth ``sector`` label out of ``azimuth_sectors``. The three scene
    fields are ignored when ``binaural`` is false. ``glide_octaves`` (binaural scenes only; 0 =
    none) makes each class's sound glide in pitch over the clip, by its own amount from
    -glide_octaves (the first class) to +glide_octaves (the last): a temporal course that tells
    where in a clip a slice lies once the class is known (Multi-SSL's temporal gap).

    ``manifest`` switches to a real dataset described by a manifest CSV
    (``methods.data.manifest``; ``avlab data index`` writes one). Its pools come from the
    manifest, decoded once into a feature cache (``cache_dir``; empty = ``.avlab-cache`` next to
    the manifest) with the feature fields above (image_size, sample_rate, clip_seconds, n_mels,
    n_frames; two channels when ``binaural``). The procedural pool sizes are then ignored;
    ``unpaired_sound_count`` / ``unpaired_image_count`` keep that many unpaired items (-1 = all),
    chosen by ``seed``.

    Three fields size the pretraining pools of either kind of data, as the papers' data
    ablations state them: ``paired_fraction`` keeps that share of the pairs (of ``paired_size``
    embedded pairs, or of a manifest's pairs, at random), and ``unpaired_sound_per_pair`` /
    ``unpaired_image_per_pair`` (-1 = off) make the unpaired pool that multiple of the dataset's
    pairs, all of them, before ``paired_fraction`` (BMA-Memory's Fig. 5: 50k unpaired sounds
    for 6.3k pairs is 7.9; Table 5 keeps one unpaired pool for both paired volumes). A multiple
    replaces ``unpaired_*_size`` (embedded) or ``unpaired_*_count`` (manifest).
    ``seed`` draws the dataset (the procedural classes' prototypes and every item; a manifest's
    subsets); -1 follows the run's seed, what the presets do, so that the spread over a sweep's
    seeds includes the data's and its test split's, while the configurations of one seed still
    share their data (paired comparisons stay paired). ``val_size`` is the validation split,
    labelled like test and disjoint from train and test: the split every choice is made on (probe
    hyperparameters under ``eval.protocol: validation``, a sweep's selecting search and its
    scheduler, recipe screening); 0 = none. A manifest's ``val`` rows are its validation split.

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
    val_size: int = neutral_field(0)
    transfer_train_size: int = 500
    transfer_test_size: int = 500
    cache_in_memory: bool = True
    binaural: bool = False
    panorama_width: int = 128
    azimuth_sectors: int = 8
    max_objects: int = 2
    glide_octaves: float = neutral_field(0.0)
    manifest: str = ""
    paired_fraction: float = 1.0
    unpaired_sound_count: int = -1
    unpaired_image_count: int = -1
    unpaired_sound_per_pair: float = neutral_field(-1.0)
    unpaired_image_per_pair: float = neutral_field(-1.0)
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
            elif f.name in ("unpaired_sound_per_pair", "unpaired_image_per_pair"):
                if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                        or not (value == -1 or 0 <= value <= _MAX_PER_PAIR)):
                    raise ValueError(f"{f.name}: must be a multiple of the pairs in 0..{_MAX_PER_PAIR}, "
                                     f"or -1 for off, got {value!r}")
            elif f.name in ("clip_seconds", "glide_octaves"):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ValueError(f"{f.name}: must be a finite number, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{f.name}: must be an integer, got {value!r}")
        if self.seed < -1:
            raise ValueError(f"seed: must be >= 0, or -1 for the run's seed, got {self.seed}")
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
        n_fft, hop = logmel_geometry(self.sample_rate, self.clip_seconds, self.n_frames)
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
            size = self.pool_size(name) if name.startswith("unpaired") else getattr(self, f"{name}_size")
            # 0 disables a pool: no unpaired data (no L_unpair) or no transfer evaluation.
            # 0 val: no validation split (nothing can be chosen on one).
            minimum = 0 if name.startswith(("unpaired", "transfer", "val")) else 1
            if not minimum <= size <= _MAX_POOL_SIZE:
                field_name = f"{name}_per_pair" if getattr(self, f"{name}_per_pair", -1) != -1 else f"{name}_size"
                raise ValueError(
                    f"{field_name}: the {name} pool must hold {minimum}..{_MAX_POOL_SIZE} items, got {size}"
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
        if not 0 <= self.glide_octaves <= 2:
            raise ValueError(f"glide_octaves: must be in 0..2 octaves, got {self.glide_octaves}")
        if self.glide_octaves and (not self.binaural or self.manifest):
            raise ValueError(f"glide_octaves: only the procedural binaural scenes glide (data.binaural=true, "
                             f"no manifest), got {self.glide_octaves}")

    def pool_size(self, name: str) -> int:
        """Items in the embedded dataset's pool ``name``: ``paired_fraction`` of the pairs, an
        unpaired pool at its multiple of the pairs where one is set, else the ``<name>_size``."""
        if name == "paired":
            return max(1, math.floor(self.paired_fraction * self.paired_size + 0.5))
        per_pair = getattr(self, f"{name}_per_pair", -1)
        if per_pair != -1:
            return math.floor(per_pair * self.paired_size + 0.5)
        return getattr(self, f"{name}_size")

    @property
    def clip_samples(self) -> int:
        return int(round(self.sample_rate * self.clip_seconds))


