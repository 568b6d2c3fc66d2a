"""The feature cache: every item of a manifest decoded once into memory-mapped arrays on local
disk, shared by all training workers of a node.

Decoding real files (reading, resampling, log-mels, resizing) costs far more than a training step
spends reading a row, so it happens once per (manifest content, feature settings): ``cache_key``
names that pair, ``get_or_build_cache`` builds the directory under a file lock (one builder per
node, the others wait) and renames it into place atomically, and ``FeatureCache`` / ``CachedPool``
read rows back through read-only memmaps opened lazily in each process, so a dataset pickles into
DataLoader or Ray workers as a list of ids and a path rather than as the data.

On disk, ``<root>/<key>/``:
    images.npy     uint8 (I, 3, S, S)    only if some item has an image; zeros where it has none
    sounds.npy     float16 (I, C, F, N)  only if some item has a sound; zeros where it has none
    has_image.npy  bool (I,)
    has_sound.npy  bool (I,)
    labels.npy     int64 (I,)            -1 = unlabelled
    meta.json      written last: format version, key, settings, ids, skipped items, counts, time
A directory is a cache only when its meta.json parses and names its key and format version.
Builds happen in ``<root>/.<key>.tmp-<pid>-<random>/``, so a killed build never leaves anything
that looks complete; later builds of the key delete temp dirs whose process is gone.

Legend: I items, C channels, F mel bins, N frames, S image side.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import re
import secrets
import shutil
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock, Timeout
from tqdm import tqdm

from methods.data.decode import DataError, FeatureSettings, load_image, load_sound, sound_features
from methods.data.manifest import Item
from methods.data.feature_cache import FORMAT_VERSION, MAX_LISTED, FeatureCache
from methods.data.logmel import LogMel

__all__ = [
    "build_cache",
    "decoded_item_count",
    "get_or_build_cache",
    "open_cache",
]

TEST_DELAY_ENV = "AVLAB_CACHE_TEST_DELAY"  # seconds slept per item, so tests can kill a build midway
_KEY_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
_ROWS_PER_COPY = 4096  # rows per step when compacting arrays after skipped items

_decoded_items = 0  # items decoded by builds in this process (see decoded_item_count)


def decoded_item_count() -> int:
    """How many items builds in this process have decoded: a cache hit leaves it unchanged."""
    return _decoded_items


# --- decoding (in the builder, or in pool workers) -------------------------------------------

Decoded = tuple[np.ndarray | None, np.ndarray | None, str | None]  # image_3SS, sound_CFN, error

_LOGMELS: dict[FeatureSettings, LogMel] = {}


def _logmel(settings: FeatureSettings) -> LogMel:
    if settings not in _LOGMELS:
        _LOGMELS[settings] = LogMel(sample_rate=settings.sample_rate, n_mels=settings.n_mels,
                                    n_frames=settings.n_frames, clip_seconds=settings.clip_seconds)
    return _LOGMELS[settings]


def _decode_item(item: Item, settings: FeatureSettings) -> Decoded:
    """The item's uint8 image and float16 log-mel, or the DataError message that makes it unusable.
    Any other exception is a bug and propagates, tagged with the item id."""
    try:
        image_3SS = None if item.image is None else load_image(item.image, settings, time=item.image_time).numpy()
        sound_CFN = None
        if item.sound is not None:
            wave_CT = load_sound(item.sound, settings, offset=item.sound_offset, duration=item.sound_duration)
            sound_CFN = sound_features(wave_CT, settings, _logmel(settings)).numpy().astype(np.float16)
    except DataError as exc:
        return None, None, " ".join(str(exc).split())  # one line, whatever the decoder wrote
    except Exception as exc:
        exc.add_note(f"while decoding item {item.id!r} for the feature cache")
        raise
    return image_3SS, sound_CFN, None


def _decode_chunk(items: Sequence[Item], settings: FeatureSettings) -> list[Decoded]:
    delay = float(os.environ.get(TEST_DELAY_ENV) or 0.0)
    out = []
    for item in items:
        if delay > 0:
            time.sleep(delay)
        out.append(_decode_item(item, settings))
    return out


def _init_worker(parent_pid: int) -> None:
    # The workers already share the cores between them; intra-op threads would oversubscribe.
    torch.set_num_threads(1)
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()


def _exit_with_parent(parent_pid: int) -> None:
    # A SIGKILLed builder cannot shut its pool down; its workers would wait on the call queue forever.
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


def _decoded_in_order(items: Sequence[Item], settings: FeatureSettings, workers: int) -> Iterator[Decoded]:
    """Each item's decoding, in item order: inline for one worker, else chunks on a process pool
    with at most two chunks per worker in flight (bounded memory whatever the dataset size)."""
    if workers <= 1:
        # One item's tensors are small: intra-op threads only add overhead (measured ~20x slower
        # resampling with 2 threads on a busy 2-core node), so decode on one, as pool workers do.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for item in items:
                yield from _decode_chunk([item], settings)
        finally:
            torch.set_num_threads(threads)
        return
    size = max(1, min(64, math.ceil(len(items) / (4 * workers))))
    chunks = [items[i:i + size] for i in range(0, len(items), size)]
    # fork on Linux, as DataLoader workers do (and, like them, one torch thread per worker, which
    # keeps the forked child out of the parent's OpenMP pool): spawn would re-run the caller's
    # unguarded __main__ in every worker, whose get_or_build_cache would then wait for our lock.
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(os.getpid(),))
    try:
        pending: deque = deque()
        next_chunk = 0
        while pending or next_chunk < len(chunks):
            while next_chunk < len(chunks) and len(pending) < 2 * workers:
                pending.append(pool.submit(_decode_chunk, chunks[next_chunk], settings))
                next_chunk += 1
            yield from pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --- building ---------------------------------------------------------------------------------


def build_cache(
    items: Sequence[Item],
    settings: FeatureSettings,
    *,
    root: str | Path,
    key: str,
    workers: int = 1,
    skip_bad: bool = False,
    progress: bool = True,
) -> Path:
    """Decode ``items`` into ``<root>/<key>/`` unless a complete cache is already there; returns
    that directory.

    Holds ``<root>/<key>.lock`` from the check to the rename, so concurrent callers on a node
    build once and the others wait. Items whose files raise a ``DataError`` stop the build with
    one DataError naming the first few files and the count (nothing is left behind), or with
    ``skip_bad`` are dropped and listed in meta.json's "skipped" and in a line on stderr.
    """
    _check_key(key)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers: must be an integer >= 1, got {workers!r}")
    items = list(items)
    if not items:
        raise ValueError("items: nothing to cache (empty item list)")
    dupes = [item_id for item_id, n in Counter(item.id for item in items).items() if n > 1]
    if dupes:
        raise ValueError(f"items: ids must be unique; {len(dupes)} repeated, first {dupes[:MAX_LISTED]}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / key
    with _locked(root, key):
        if _read_meta(final, key) is not None:
            return final
        _remove_stale_temps(root, key)
        if final.exists():  # a directory without a valid meta.json is not a cache: discard it
            _discard(final, root, key)
        tmp = root / f".{key}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            meta = _write_arrays(tmp, items, settings, key=key, workers=workers, skip_bad=skip_bad,
                                 progress=progress)
            _write_durably(tmp / "meta.json", json.dumps(meta, indent=1).encode())
            _fsync_dir(tmp)
            os.replace(tmp, final)
            _fsync_dir(root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    rate = meta["requested"] / max(meta["build_seconds"], 1e-9)
    print(f"feature cache {key}: built {meta['count']} items ({meta['images']} images, {meta['sounds']} "
          f"sounds) in {meta['build_seconds']:.1f} s, {rate:.0f} items/s -> {final}", file=sys.stderr, flush=True)
    return final


def _write_arrays(
    tmp: Path, items: list[Item], settings: FeatureSettings, *, key: str, workers: int, skip_bad: bool,
    progress: bool,
) -> dict[str, Any]:
    """Fill the arrays of ``tmp`` (row i = item i), compact them if items were skipped, fsync
    them, and return meta.json's content."""
    global _decoded_items
    n_I = len(items)
    S, C, F, N = settings.image_size, settings.channels, settings.n_mels, settings.n_frames
    images_I3SS = (np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(n_I, 3, S, S))
                   if any(item.image is not None for item in items) else None)
    sounds_ICFN = (np.lib.format.open_memmap(tmp / "sounds.npy", mode="w+", dtype=np.float16, shape=(n_I, C, F, N))
                   if any(item.sound is not None for item in items) else None)
    has_image_I = np.zeros(n_I, dtype=bool)
    has_sound_I = np.zeros(n_I, dtype=bool)
    labels_I = np.array([item.label for item in items], dtype=np.int64)
    errors: list[tuple[int, str]] = []
    start = time.monotonic()
    with tqdm(total=n_I, desc=f"feature cache {key[:8]}", unit="item", file=sys.stderr, disable=not progress,
              dynamic_ncols=True) as bar:
        for i, (image_3SS, sound_CFN, error) in enumerate(_decoded_in_order(items, settings, workers)):
            _decoded_items += 1
            if error is not None:
                errors.append((i, error))
            else:
                if image_3SS is not None:
                    images_I3SS[i] = image_3SS
                    has_image_I[i] = True
                if sound_CFN is not None:
                    sounds_ICFN[i] = sound_CFN
                    has_sound_I[i] = True
            bar.update(1)
    build_seconds = time.monotonic() - start

    first = "; ".join(reason for _, reason in errors[:MAX_LISTED])
    if errors and (not skip_bad or len(errors) == n_I):
        hint = "" if skip_bad else " (fix or remove them, or skip them: data.skip_bad=true, --skip-bad)"
        raise DataError(f"{len(errors)} of {n_I} items unusable; first: {first}{hint}")
    skipped = [{"id": items[i].id, "reason": reason} for i, reason in errors]
    arrays = {"images.npy": images_I3SS, "sounds.npy": sounds_ICFN}
    del images_I3SS, sounds_ICFN
    if errors:
        keep_K = np.setdiff1d(np.arange(n_I), [i for i, _ in errors])
        for name, old in arrays.items():
            arrays[name] = None if old is None else _compact(tmp / name, old, keep_K)
        has_image_I, has_sound_I, labels_I = has_image_I[keep_K], has_sound_I[keep_K], labels_I[keep_K]
        items = [items[k] for k in keep_K]
        print(f"feature cache {key}: skipped {len(errors)} of {n_I} unusable items; first: {first}",
              file=sys.stderr, flush=True)
    for (name, array), present_I in zip(arrays.items(), (has_image_I, has_sound_I)):
        if array is None:
            continue
        array.flush()
        if present_I.any():
            _fsync_file(tmp / name)
        else:  # every item with this modality was skipped
            (tmp / name).unlink()
    for name, small in (("has_image.npy", has_image_I), ("has_sound.npy", has_sound_I), ("labels.npy", labels_I)):
        _save_durably(tmp / name, small)
    return {
        "format_version": FORMAT_VERSION,
        "key": key,
        "settings": asdict(settings),
        "created": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
        "build_seconds": round(build_seconds, 3),
        "workers": workers,
        "requested": n_I,
        "count": len(items),
        "images": int(has_image_I.sum()),
        "sounds": int(has_sound_I.sum()),
        "arrays": sorted(p.name for p in tmp.glob("*.npy")),
        "skipped": skipped,
        "ids": [item.id for item in items],
    }


def _compact(path: Path, old: np.memmap, keep_K: np.ndarray) -> np.memmap:
    """A copy of ``old``'s rows ``keep_K`` that replaces the file at ``path``, copied in blocks
    so it never holds the array in memory."""
    part = path.with_name(path.stem + ".compact.npy")
    new = np.lib.format.open_memmap(part, mode="w+", dtype=old.dtype, shape=(len(keep_K), *old.shape[1:]))
    for j in range(0, len(keep_K), _ROWS_PER_COPY):
        new[j:j + _ROWS_PER_COPY] = old[keep_K[j:j + _ROWS_PER_COPY]]
    del old
    os.replace(part, path)
    return new


# --- files, locks, temp dirs ------------------------------------------------------------------


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise ValueError(f"key: must be 1-128 letters, digits, '-' or '_' (use cache_key(...)), got {key!r}")


@contextmanager
def _locked(root: Path, key: str) -> Iterator[None]:
    """``<root>/<key>.lock`` held for the block; says on stderr when it has to wait. The kernel
    drops the lock of a killed holder, so a dead build never blocks the next one."""
    lock = FileLock(root / f"{key}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"feature cache {key}: another process is building it; waiting", file=sys.stderr, flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temps(root: Path, key: str) -> None:
    """Delete the temp dirs of builds of ``key`` whose process is gone. Called under the key's
    lock, so no live build on this node owns them; a live pid (another node sharing the
    directory, or a reused pid) keeps its dir, which is then merely ignored."""
    pattern = re.compile(rf"\.{re.escape(key)}\.tmp-(\d+)-[0-9a-f]+")
    for path in root.glob(f".{key}.tmp-*"):
        match = pattern.fullmatch(path.name)
        if match and (int(match[1]) == os.getpid() or not _pid_alive(int(match[1]))):
            shutil.rmtree(path, ignore_errors=True)


def _discard(path: Path, root: Path, key: str) -> None:
    # Renamed to a temp name first so that a crash halfway through the delete is cleaned up later.
    trash = root / f".{key}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync_file(path)
    except OSError:  # some filesystems cannot fsync a directory; the rename is still atomic
        pass


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _save_durably(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())


def _read_meta(path: Path, key: str) -> dict[str, Any] | None:
    """meta.json of a complete cache of ``key`` in ``path``, else None."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("key") != key or meta.get("format_version") != FORMAT_VERSION:
        return None
    if not all((path / name).is_file() for name in meta.get("arrays", ())):
        return None
    return meta


# --- reading ----------------------------------------------------------------------------------


def open_cache(root: str | Path, key: str) -> FeatureCache | None:
    """The complete cache ``<root>/<key>``, or None when it is missing or incomplete."""
    _check_key(key)
    meta = _read_meta(Path(root) / key, key)
    return None if meta is None else FeatureCache(Path(root), key, meta)


def get_or_build_cache(
    items: Sequence[Item],
    settings: FeatureSettings,
    *,
    root: str | Path,
    key: str,
    workers: int = 1,
    skip_bad: bool = False,
    progress: bool = True,
) -> FeatureCache:
    """The cache of ``items`` under ``key``: opened if complete (no lock, so a read-only shared
    root works), else built by ``build_cache`` (or waited for, if another process builds it).
    Raises ValueError if the cache found under ``key`` holds other items or other settings."""
    items = list(items)
    cache = open_cache(root, key)
    if cache is None:
        build_cache(items, settings, root=root, key=key, workers=workers, skip_bad=skip_bad, progress=progress)
        cache = open_cache(root, key)
        if cache is None:
            raise RuntimeError(f"feature cache {key}: built, but {Path(root) / key} does not open as a cache")
    cache.check_matches(items, settings)
    return cache
