"""What the synthetic datasets share: the eight pools, the ten classes, the item pool that
serves (and memoises) items, the base class of ``ProceduralAV`` and ``BinauralScenes``, and the
``AVDataset`` protocol that every dataset (a manifest's too) meets."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from methods.base import DataInfo

if TYPE_CHECKING:
    from methods.data.config import DataConfig

POOLS: tuple[str, ...] = (
    "paired",
    "unpaired_sound",
    "unpaired_image",
    "train",
    "test",
    "transfer_train",
    "transfer_test",
    "val",  # labelled like test, disjoint from train and test: what a choice is made on
)
# Stream ids: part of every sample's seed, so two pools never share a random stream.
POOL_ID: dict[str, int] = {name: i + 1 for i, name in enumerate(POOLS)}
POOL_DOMAIN: dict[str, str] = {
    "paired": "main",
    "unpaired_sound": "other",
    "unpaired_image": "other",
    "train": "main",
    "test": "main",
    "transfer_train": "transfer",
    "transfer_test": "transfer",
    "val": "main",
}
POOL_KEYS: dict[str, tuple[str, ...]] = {
    "paired": ("image", "sound", "label", "index"),
    "unpaired_sound": ("sound", "index"),
    "unpaired_image": ("image", "index"),
    "train": ("image", "sound", "label", "index"),
    "test": ("image", "sound", "label", "index"),
    "transfer_train": ("image", "sound", "label", "index"),
    "transfer_test": ("image", "sound", "label", "index"),
    "val": ("image", "sound", "label", "index"),
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


class AVDataset(Protocol):
    """What the orchestrator and the methods use of a dataset: ``ProceduralAV``,
    ``BinauralScenes`` and a manifest's ``ManifestAV`` all meet it."""

    cfg: DataConfig

    def pool(self, name: str) -> Dataset: ...

    def info(self) -> DataInfo: ...

    @property
    def class_names(self) -> list[str]: ...


def check_seed(cfg: DataConfig) -> None:
    """A dataset is drawn from a concrete seed: -1 (the run's seed) is resolved with the run's config."""
    if cfg.seed < 0:
        raise ValueError(f"seed: {cfg.seed} means the run's seed, which the run's config resolves; "
                         "a dataset needs a seed >= 0")


def check_pool(name: str) -> None:
    if name not in POOLS:
        raise ValueError(f"pool: unknown pool {name!r}; choose one of {', '.join(POOLS)}")


class ItemPool(Dataset):
    """One pool of a synthetic dataset; items are dicts of tensors made by its ``_generate``
    (memoised per process when ``cache_in_memory``)."""

    def __init__(self, owner: SyntheticAV, name: str, size: int, keys: tuple[str, ...]) -> None:
        self.owner = owner
        self.name = name
        self.size = size
        self.keys = keys
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


class SyntheticAV:
    """The base of the two synthetic datasets (``ProceduralAV``, ``BinauralScenes``): the eight
    pools, each item a pure function of (cfg, pool, index) made by the subclass's
    ``_generate(pool, index, keys)``; balanced class labels; the ``DataInfo`` methods read."""

    sound_channels: ClassVar[int]
    pool_keys: ClassVar[dict[str, tuple[str, ...]]]  # what each pool's items carry
    label_tag: ClassVar[tuple[int, ...]] = ()  # extra entropy of the class order of the blocks

    def __init__(self, cfg: DataConfig) -> None:
        check_seed(cfg)
        self.cfg = cfg
        self._pools: dict[str, ItemPool] = {}
        self._blocks: dict[tuple[str, int], list[int]] = {}  # memoised class order per block

    def pool(self, name: str) -> Dataset:
        """The dataset of pool ``name`` (one of POOLS); created once and reused."""
        check_pool(name)
        if name not in self._pools:
            self._pools[name] = ItemPool(self, name, self.cfg.pool_size(name), self.pool_keys[name])
        return self._pools[name]

    @property
    def class_names(self) -> list[str]:
        return list(CLASS_NAMES[: self.cfg.num_classes])

    def info(self) -> DataInfo:
        return self.info_for(self.cfg)

    @classmethod
    def info_for(cls, c: DataConfig) -> DataInfo:
        """What a method needs to know about the data ``c`` describes (RGB images), without
        building the dataset."""
        return DataInfo(
            image_channels=3,
            sound_channels=cls.sound_channels,
            image_size=c.image_size,
            n_mels=c.n_mels,
            n_frames=c.n_frames,
            num_classes=c.num_classes,
            paired_size=c.pool_size("paired"),
            unpaired_sound_size=c.pool_size("unpaired_sound"),
            unpaired_image_size=c.pool_size("unpaired_image"),
            paired_masks="mask" in cls.pool_keys["paired"],
            train_size=c.train_size,
            test_size=c.test_size,
            val_size=c.val_size,
            transfer_train_size=c.transfer_train_size,
            transfer_test_size=c.transfer_test_size,
        )

    # Ground truth for evaluation, tests and analysis; pretraining never reads it.

    def label(self, pool: str, index: int) -> int:
        """Class id of sample ``index``: classes are balanced within each block of
        ``num_classes`` consecutive indices, in a per-block random order."""
        k = self.cfg.num_classes
        key = (pool, index // k)
        order = self._blocks.get(key)
        if order is None:
            block = np.random.SeedSequence([self.cfg.seed, POOL_ID[pool], index // k, *self.label_tag],
                                           spawn_key=(0,))
            order = self._blocks[key] = np.argsort(block.generate_state(k)).tolist()
        return order[index % k]

    def _generate(self, pool: str, index: int, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
        raise NotImplementedError
