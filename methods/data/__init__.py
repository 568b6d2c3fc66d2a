"""Data for avlab: the procedural audio-visual dataset, its binaural scenes and the
augmentations methods use."""

from methods.base import DataInfo
from methods.data.augment import SpecAugment, simclr_image_augment
from methods.data.binaural import (
    BinauralScenes,
    Scene,
    SceneObject,
    binaural_render,
    rotate_panorama,
)
from methods.data.config import DataConfig
from methods.data.logmel import LOGMEL_FLOOR, LOGMEL_MEAN, LOGMEL_STD, LogMel
from methods.data.pools import CLASS_NAMES, POOLS, AVDataset
from methods.data.procedural import ProceduralAV

__all__ = [
    "AVDataset",
    "CLASS_NAMES",
    "LOGMEL_FLOOR",
    "LOGMEL_MEAN",
    "LOGMEL_STD",
    "POOLS",
    "BinauralScenes",
    "LogMel",
    "ProceduralAV",
    "DataConfig",
    "Scene",
    "SceneObject",
    "SpecAugment",
    "binaural_render",
    "build_dataset",
    "dataset_info",
    "rotate_panorama",
    "simclr_image_augment",
]


def build_dataset(cfg: DataConfig) -> AVDataset:
    """The dataset ``cfg`` describes: a real dataset's manifest when ``cfg.manifest`` is set
    (``methods.data.real.ManifestAV``), else binaural scenes when ``cfg.binaural``, else the
    procedural mono pairs. All three meet ``AVDataset``."""
    if cfg.manifest:
        from methods.data.real import ManifestAV  # decoding libraries load only when needed

        return ManifestAV(cfg)
    return BinauralScenes(cfg) if cfg.binaural else ProceduralAV(cfg)


def dataset_info(cfg: DataConfig) -> DataInfo:
    """``build_dataset(cfg).info()`` without rendering anything for the synthetic datasets (their
    info follows from the config); a manifest is read and validated."""
    if cfg.manifest:
        return build_dataset(cfg).info()
    return (BinauralScenes if cfg.binaural else ProceduralAV).info_for(cfg)
