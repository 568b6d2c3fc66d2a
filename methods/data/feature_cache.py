"""Reading the feature cache that ``methods.data.cache`` builds: ``FeatureCache`` (one cache
directory, its arrays opened lazily as read-only memmaps in each process) and ``CachedPool`` (a
pool's rows of it, as dict items). A cache pickles as a path and a list of ids, not as the data.

Legend: I items, C channels, F mel bins, N frames, S image side.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from methods.data.decode import FeatureSettings
from methods.data.manifest import Item

FORMAT_VERSION = 1  # bump when the layout or the decoding changes: old caches then miss
MAX_LISTED = 3  # offending files named in a DataError or a skip summary
ITEM_KEYS = ("image", "sound", "label", "index")

__all__ = ["FORMAT_VERSION", "CachedPool", "FeatureCache", "cache_key"]


def cache_key(content_hash: str, settings: FeatureSettings) -> str:
    """20 hex digits naming (manifest content, feature settings, cache format): equal inputs give
    the same key, a changed file hash, setting or format version a different one."""
    text = f"avlab-feature-cache/{FORMAT_VERSION}\n{content_hash}\n{settings.key()}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


class FeatureCache:
    """A complete cache directory: ids, settings and skipped items from meta.json, arrays as
    read-only memmaps opened on first use in each process (pickling drops them)."""

    def __init__(self, root: Path, key: str, meta: dict[str, Any]) -> None:
        self.root = Path(root)
        self.key = key
        self.path = self.root / key
        self.settings = FeatureSettings(**meta["settings"])
        self.ids: list[str] = list(meta["ids"])
        self.skipped: list[dict[str, str]] = list(meta["skipped"])
        self.created: str = meta["created"]
        self._array_names: tuple[str, ...] = tuple(meta["arrays"])
        self._arrays: dict[str, np.ndarray] | None = None
        self._arrays_pid = -1
        self._row_of: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.path)!r}, {len(self)} items, {len(self.skipped)} skipped)"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"] = None  # memmaps are reopened by the process that reads them
        state["_row_of"] = None
        return state

    def arrays(self) -> dict[str, np.ndarray]:
        """{"images", "sounds" (those present), "has_image", "has_sound", "labels"}: read-only
        memmaps of this process."""
        if self._arrays is None or self._arrays_pid != os.getpid():
            self._arrays = {name.removesuffix(".npy"): np.load(self.path / name, mmap_mode="r")
                            for name in self._array_names}
            self._arrays_pid = os.getpid()
        return self._arrays

    @property
    def has_image(self) -> np.ndarray:
        return self.arrays()["has_image"]

    @property
    def has_sound(self) -> np.ndarray:
        return self.arrays()["has_sound"]

    @property
    def labels(self) -> np.ndarray:
        return self.arrays()["labels"]

    def index_of(self, item_id: str) -> int:
        """Row of ``item_id``; KeyError if it is not in the cache (say whether it was skipped)."""
        if self._row_of is None:
            self._row_of = {item_id: i for i, item_id in enumerate(self.ids)}
        try:
            return self._row_of[item_id]
        except KeyError:
            why = "skipped as unusable" if any(s["id"] == item_id for s in self.skipped) else "not in it"
            raise KeyError(f"feature cache {self.key}: item {item_id!r} {why}") from None

    def item(self, i: int, keys: Sequence[str] = ITEM_KEYS) -> dict[str, torch.Tensor]:
        """Row ``i`` as tensors: "image" float32 (3, S, S) in [0, 1] and "sound" float32 (C, F, N)
        when the item has them, "label" and "index" (= i) int64 scalars; only ``keys``."""
        if not 0 <= i < len(self):
            raise IndexError(f"feature cache {self.key}: index {i} out of range 0..{len(self) - 1}")
        a = self.arrays()
        out: dict[str, torch.Tensor] = {}
        for k in keys:
            if k == "image" and a["has_image"][i]:
                out["image"] = torch.from_numpy(np.array(a["images"][i])).float().div_(255.0)
            elif k == "sound" and a["has_sound"][i]:
                out["sound"] = torch.from_numpy(a["sounds"][i].astype(np.float32))
            elif k == "label":
                out["label"] = torch.tensor(int(a["labels"][i]), dtype=torch.int64)
            elif k == "index":
                out["index"] = torch.tensor(i, dtype=torch.int64)
        return out

    def check_matches(self, items: Sequence[Item], settings: FeatureSettings) -> None:
        """ValueError unless this cache was built from ``items`` (in order, less skipped ones)
        with ``settings``: a key computed from another manifest or settings lands here."""
        fix = "compute the key with cache_key(<manifest content hash>, settings)"
        if settings != self.settings:
            raise ValueError(f"feature cache {self.key}: built with {self.settings}, asked for {settings}; {fix}")
        skipped = {s["id"] for s in self.skipped}
        expected = [item.id for item in items if item.id not in skipped]
        if expected != self.ids:
            raise ValueError(f"feature cache {self.key}: holds {len(self.ids)} items (+{len(skipped)} skipped) "
                             f"that differ from the {len(items)} items asked for; {fix}")


class CachedPool(Dataset):
    """The items ``ids`` of a cache, in that order (all of it when None), as dicts of ``keys``;
    "index" is the position in the pool. Ids the cache skipped as unusable are dropped and
    counted in ``missing``; ids it never had are a KeyError. A modality absent from every item of
    the pool is left out (``self.keys`` lists what items hold); one that only some items have is
    a ValueError, since such items would not collate into a batch. ``transform`` is applied to
    each item dict at every access (random augmentations)."""

    def __init__(
        self,
        cache: FeatureCache,
        ids: Sequence[str] | None = None,
        *,
        keys: tuple[str, ...] = ITEM_KEYS,
        transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    ) -> None:
        unknown = [k for k in keys if k not in ITEM_KEYS]
        if unknown:
            raise ValueError(f"keys: unknown {unknown}; choose from {ITEM_KEYS}")
        self.cache = cache
        self.transform = transform
        self.missing = 0
        if ids is None:
            rows = np.arange(len(cache), dtype=np.int64)
        else:
            skipped = {s["id"] for s in cache.skipped}
            found, absent = [], []
            for item_id in ids:
                if item_id in skipped:
                    self.missing += 1
                    continue
                try:
                    found.append(cache.index_of(item_id))
                except KeyError:
                    absent.append(item_id)
            if absent:
                raise KeyError(f"feature cache {cache.key}: {len(absent)} ids not in it, first {absent[:MAX_LISTED]}; "
                               "was it built from another manifest?")
            rows = np.asarray(found, dtype=np.int64)
        self.rows = rows
        kept = []
        for k, present_I in (("image", cache.has_image), ("sound", cache.has_sound)):
            if k not in keys:
                continue
            present_P = present_I[rows]
            if present_P.all() and len(rows):
                kept.append(k)
            elif present_P.any():
                first = cache.ids[int(rows[np.flatnonzero(~present_P)[0]])]
                raise ValueError(f"keys: {int((~present_P).sum())} of {len(rows)} pool items have no {k} "
                                 f"(first {first!r}); drop {k!r} from keys or split the pool")
        self.keys = tuple(k for k in keys if k in kept or k in ("label", "index"))

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def ids(self) -> list[str]:
        return [self.cache.ids[int(r)] for r in self.rows]

    def __getitems__(self, js: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        """A whole batch at once (DataLoader calls this when it exists): one gather per array
        and one dtype conversion per batch instead of per item; items equal ``self[j]``."""
        js = [int(j) for j in js]
        if any(not 0 <= j < len(self.rows) for j in js):
            return [self[j] for j in js]  # raises the IndexError of the first bad index
        rows = np.asarray(self.rows)[js]
        a = self.cache.arrays()
        columns: dict[str, torch.Tensor] = {}
        if "image" in self.keys:
            columns["image"] = torch.from_numpy(a["images"][rows]).float().div_(255.0)
        if "sound" in self.keys:
            columns["sound"] = torch.from_numpy(a["sounds"][rows].astype(np.float32))
        if "label" in self.keys:
            columns["label"] = torch.from_numpy(a["labels"][rows].astype(np.int64))
        if "index" in self.keys:
            columns["index"] = torch.tensor(js, dtype=torch.int64)
        items = [{k: v[b] for k, v in columns.items()} for b in range(len(js))]
        return items if self.transform is None else [self.transform(item) for item in items]

    def __getitem__(self, j: int) -> dict[str, torch.Tensor]:
        j = int(j)
        if not 0 <= j < len(self.rows):
            raise IndexError(f"pool index {j} out of range 0..{len(self.rows) - 1}")
        item = self.cache.item(int(self.rows[j]), self.keys)
        if "index" in self.keys:
            item["index"] = torch.tensor(j, dtype=torch.int64)
        return item if self.transform is None else self.transform(item)
