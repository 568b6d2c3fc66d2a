"""Data for avlab: the procedural audio-visual dataset, its binaural scenes and the
augmentations methods use."""

from methods.data.augment import SpecAugment, TwoViews, simclr_image_augment
from methods.data.binaural import (
    BinauralScenes,
    Scene,
    SceneObject,
    binaural_render,
    rotate_panorama,
)
from methods.data.procedural import (
    CLASS_NAMES,
    LOGMEL_FLOOR,
    LOGMEL_MEAN,
    LOGMEL_STD,
    POOLS,
    LogMel,
    ProceduralAV,
    ProceduralConfig,
)

__all__ = [
    "CLASS_NAMES",
    "LOGMEL_FLOOR",
    "LOGMEL_MEAN",
    "LOGMEL_STD",
    "POOLS",
    "BinauralScenes",
    "LogMel",
    "ProceduralAV",
    "ProceduralConfig",
    "Scene",
    "SceneObject",
    "SpecAugment",
    "TwoViews",
    "binaural_render",
    "build_dataset",
    "rotate_panorama",
    "simclr_image_augment",
]


def build_dataset(cfg: ProceduralConfig) -> BinauralScenes | ProceduralAV:
    """The dataset ``cfg`` describes: binaural scenes when ``cfg.binaural``, else mono pairs."""
    return BinauralScenes(cfg) if cfg.binaural else ProceduralAV(cfg)
