"""Real datasets: the pools of a manifest, served from its feature cache.

``ManifestAV(cfg)`` has the interface of the procedural dataset (``pool``, ``info``,
``class_names``), so every method, the trainer and the evaluation run on real data unchanged.
The manifest is read and validated at construction (cheap: a CSV); the feature cache is opened,
or built once with a lock shared by the node's workers, on the first ``pool`` call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import Dataset

from methods.base import DataInfo
from methods.data.cache import get_or_build_cache
from methods.data.feature_cache import CachedPool, FeatureCache, cache_key
from methods.data.decode import FeatureSettings
from methods.data.manifest import Item, read_manifest
from methods.data.config import DataConfig
from methods.data.pools import POOLS, check_seed

# What each pool's items carry; labelled splits carry whichever modalities all their items have.
_POOL_KEYS = {
    "paired": ("image", "sound", "index"),
    "unpaired_sound": ("sound", "index"),
    "unpaired_image": ("image", "index"),
}


@dataclass
class EvalGroup:
    """Rows evaluated together: a training and a test set, and each row's manifest fold."""

    train: Dataset
    test: Dataset
    train_folds: list[int | None] = field(default_factory=list)
    test_folds: list[int | None] = field(default_factory=list)


class ManifestAV:
    """Pools of a manifest CSV (``cfg.manifest``) with the feature settings of ``cfg``."""

    def __init__(self, cfg: DataConfig) -> None:
        if not cfg.manifest:
            raise ValueError("manifest: no manifest given (data.manifest is empty)")
        check_seed(cfg)
        self.cfg = cfg
        self.manifest = read_manifest(cfg.manifest)
        self.settings = FeatureSettings.from_config(cfg)
        self.items: dict[str, list[Item]] = self.manifest.pools(
            paired_fraction=cfg.paired_fraction, unpaired_sound_count=cfg.unpaired_sound_count,
            unpaired_image_count=cfg.unpaired_image_count, unpaired_sound_per_pair=cfg.unpaired_sound_per_pair,
            unpaired_image_per_pair=cfg.unpaired_image_per_pair, seed=cfg.seed,
        )
        root = Path(cfg.cache_dir) if cfg.cache_dir else Path(self.manifest.path).parent / ".avlab-cache"
        self.cache_root = root
        self.cache_key = cache_key(self.manifest.content_hash, self.settings)
        self._cache: FeatureCache | None = None
        self._pools: dict[str, Dataset] = {}

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest.classes)

    @property
    def cache(self) -> FeatureCache:
        if self._cache is None:
            self._cache = get_or_build_cache(
                self.manifest.items(), self.settings, root=self.cache_root, key=self.cache_key,
                workers=self.cfg.cache_workers or os.cpu_count() or 1, skip_bad=self.cfg.skip_bad,
            )
        return self._cache

    def pool(self, name: str) -> Dataset:
        if name not in POOLS:
            raise ValueError(f"pool: unknown pool {name!r}; choose one of {', '.join(POOLS)}")
        if name not in self._pools:
            items = self.items[name]
            keys = _POOL_KEYS.get(name)
            if keys is None:  # a labelled split
                keys = tuple(k for k, attr in (("image", "image"), ("sound", "sound"))
                             if items and all(getattr(it, attr) for it in items)) + ("label", "index")
            self._pools[name] = CachedPool(self.cache, [it.id for it in items], keys=keys)
        return self._pools[name]

    def eval_groups(self, train: str, test: str) -> list[EvalGroup]:
        """The evaluation of split ``train`` -> ``test``: one group when every test item carries a
        common modality (the usual pools), else one group per modality over the rows that carry it
        (image-only and sound-only rows of different datasets in one manifest); each with the
        manifest folds of its items, in pool order."""
        test_items = self.items[test]
        common = [m for m in ("image", "sound") if test_items and all(getattr(it, m) for it in test_items)]
        if common or not test_items:
            return [EvalGroup(self.pool(train), self.pool(test), self._folds(self.pool(train), train),
                              self._folds(self.pool(test), test))]
        groups = []
        for modality in ("image", "sound"):
            pools = []
            for split in (train, test):
                ids = [it.id for it in self.items[split] if getattr(it, modality)]
                pools.append(CachedPool(self.cache, ids, keys=(modality, "label", "index")) if ids else None)
            if pools[1] is None:
                continue
            if pools[0] is None:
                raise ValueError(f"{train}: no rows carry {modality}, but {test} has some; "
                                 f"add labelled {modality} rows to {train}")
            groups.append(EvalGroup(pools[0], pools[1], self._folds(pools[0], train), self._folds(pools[1], test)))
        return groups

    def split_folds(self, split: str) -> list[int | None]:
        """The fold of each row of ``split`` (None where the manifest gives none)."""
        return [it.fold for it in self.items[split]]

    def _folds(self, pool: Dataset, split: str) -> list[int | None]:
        by_id = {it.id: it.fold for it in self.items[split]}
        return [by_id.get(i) for i in pool.ids] if isinstance(pool, CachedPool) else []

    def info(self) -> DataInfo:
        return DataInfo(
            image_channels=3, sound_channels=self.settings.channels, image_size=self.settings.image_size,
            n_mels=self.settings.n_mels, n_frames=self.settings.n_frames,
            num_classes=max(len(self.manifest.classes), 1), paired_size=len(self.items["paired"]),
            unpaired_sound_size=len(self.items["unpaired_sound"]),
            unpaired_image_size=len(self.items["unpaired_image"]), paired_labelled=False,
            train_size=len(self.items["train"]), test_size=len(self.items["test"]),
            val_size=len(self.items["val"]),
            transfer_train_size=len(self.items["transfer_train"]), transfer_test_size=len(self.items["transfer_test"]),
        )
