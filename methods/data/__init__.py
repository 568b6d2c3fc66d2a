"""Data for avlab: the procedural audio-visual dataset and the augmentations methods use."""

from methods.data.augment import SpecAugment, TwoViews, simclr_image_augment
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
    "LogMel",
    "ProceduralAV",
    "ProceduralConfig",
    "SpecAugment",
    "TwoViews",
    "simclr_image_augment",
]
