"""The feature cache on small real files (wav via soundfile, png via Pillow): arrays equal direct
decoding, keys and cache hits, a killed build, two concurrent builders, unusable items, and
CachedPool's order, keys, transform and pickling."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from torch.utils.data import DataLoader

from methods.data.cache import (
    TEST_DELAY_ENV,
    build_cache,
    decoded_item_count,
    get_or_build_cache,
    open_cache,
)
from methods.data.feature_cache import CachedPool, cache_key
from methods.data.decode import DataError, FeatureSettings, load_image, load_sound, sound_features
from methods.data.manifest import Item

from conftest import ROOT
SETTINGS = FeatureSettings(image_size=16, sample_rate=8000, clip_seconds=1.0, n_mels=16, n_frames=24, channels=1)


def _wav(path: Path, *, seconds: float = 1.5, rate: int = 8000, channels: int = 1, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    sf.write(path, (0.1 * rng.standard_normal((int(seconds * rate), channels))).astype(np.float32), rate)
    return str(path)


def _png(path: Path, *, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (20, 27, 3), dtype=np.uint8)).save(path)
    return str(path)


def make_items(folder: Path, n_paired: int = 4) -> list[Item]:
    """``n_paired`` png + wav pairs, then an image-only item and a sound-only one (stereo at
    11025 Hz, so the decoder downmixes and resamples)."""
    folder.mkdir(parents=True, exist_ok=True)
    items = [Item(id=f"pair{i}", image=_png(folder / f"p{i}.png", seed=i), sound=_wav(folder / f"p{i}.wav", seed=i),
                  label=i % 3, source="test") for i in range(n_paired)]
    items.append(Item(id="img_only", image=_png(folder / "img.png", seed=100), label=1))
    items.append(Item(id="snd_only", sound=_wav(folder / "snd.wav", rate=11025, channels=2, seed=101),
                      sound_offset=0.25, label=-1))
    return items


def content_hash(items: list[Item]) -> str:
    """Stands in for the manifest's content hash: every referenced file's bytes."""
    h = hashlib.sha256()
    for item in items:
        for path in (item.image, item.sound):
            h.update(b"-" if path is None else Path(path).read_bytes())
    return h.hexdigest()


def temp_dirs(root: Path) -> list[Path]:
    return sorted(root.glob(".*.tmp-*"))


def direct_sound(item: Item, settings: FeatureSettings = SETTINGS) -> torch.Tensor:
    wave = load_sound(item.sound, settings, offset=item.sound_offset, duration=item.sound_duration)
    return sound_features(wave, settings)


def test_built_arrays_equal_direct_decoding(tmp_path):
    items = make_items(tmp_path / "data")
    key = cache_key(content_hash(items), SETTINGS)
    cache = get_or_build_cache(items, SETTINGS, root=tmp_path / "cache", key=key, workers=2, progress=False)

    folder = tmp_path / "cache" / key
    assert sorted(p.name for p in folder.iterdir()) == [
        "has_image.npy", "has_sound.npy", "images.npy", "labels.npy", "meta.json", "sounds.npy"]
    assert temp_dirs(tmp_path / "cache") == []
    meta = json.loads((folder / "meta.json").read_text())
    assert (meta["key"], meta["ids"], meta["skipped"]) == (key, [it.id for it in items], [])
    assert (meta["count"], meta["images"], meta["sounds"]) == (6, 5, 5)
    assert meta["settings"] == asdict(SETTINGS)

    images = np.load(folder / "images.npy")
    sounds = np.load(folder / "sounds.npy")
    assert images.dtype == np.uint8 and images.shape == (6, 3, 16, 16)
    assert sounds.dtype == np.float16 and sounds.shape == (6, 1, 16, 24)
    np.testing.assert_array_equal(np.load(folder / "has_image.npy"), [1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(np.load(folder / "has_sound.npy"), [1, 1, 1, 1, 0, 1])
    assert np.load(folder / "labels.npy").dtype == np.int64
    np.testing.assert_array_equal(cache.labels, [it.label for it in items])

    for i, it in enumerate(items):
        assert cache.index_of(it.id) == i
        got = cache.item(i)
        assert got["index"].item() == i and got["label"].item() == it.label
        assert ("image" in got) == (it.image is not None) and ("sound" in got) == (it.sound is not None)
        if it.image is not None:
            direct_u8 = load_image(it.image, SETTINGS, time=it.image_time)
            np.testing.assert_array_equal(images[i], direct_u8.numpy())
            assert got["image"].dtype == torch.float32
            torch.testing.assert_close(got["image"], direct_u8.float() / 255)
        if it.sound is not None:
            direct = direct_sound(it)
            assert got["sound"].dtype == torch.float32 and got["sound"].shape == direct.shape
            # float16 storage: relative rounding 2^-11; the pool workers may round the last float32 bit differently
            torch.testing.assert_close(got["sound"], direct, rtol=2e-3, atol=2e-3)
    # rows without the modality stay zero
    assert not images[5].any() and not sounds[4].any()

    # the inline path (workers=1) writes the same bytes as the pool
    other = build_cache(items, SETTINGS, root=tmp_path / "inline", key=key, progress=False)
    for name in ("images.npy", "sounds.npy", "has_image.npy", "has_sound.npy", "labels.npy"):
        np.testing.assert_array_equal(np.load(other / name), np.load(folder / name))


def test_same_content_and_settings_hit_the_cache_changes_rebuild(tmp_path, capsys):
    items = make_items(tmp_path / "data")
    root = tmp_path / "cache"
    key = cache_key(content_hash(items), SETTINGS)
    assert key == cache_key(content_hash(items), FeatureSettings(**asdict(SETTINGS)))
    assert len(key) == 20 and int(key, 16) >= 0

    first = get_or_build_cache(items, SETTINGS, root=root, key=key, progress=False)
    assert capsys.readouterr().err.count("built 6 items") == 1
    stat, decoded = (root / key).stat(), decoded_item_count()

    again = get_or_build_cache(items, SETTINGS, root=root, key=key, progress=False)
    assert build_cache(items, SETTINGS, root=root, key=key, progress=False) == root / key
    assert decoded_item_count() == decoded  # nothing decoded
    assert "built" not in capsys.readouterr().err
    now = (root / key).stat()
    assert (now.st_ino, now.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    assert again.created == first.created

    # new content in one file: new hash, new key, a rebuild that sees the new sound
    old_sound = first.item(0)["sound"]
    _wav(Path(items[0].sound), seed=999)
    new_key = cache_key(content_hash(items), SETTINGS)
    assert new_key != key
    changed = get_or_build_cache(items, SETTINGS, root=root, key=new_key, progress=False)
    assert decoded_item_count() == decoded + 6
    assert not torch.allclose(changed.item(0)["sound"], old_sound)
    torch.testing.assert_close(changed.item(0)["sound"], direct_sound(items[0]), rtol=2e-3, atol=2e-3)

    # a changed setting: another key and arrays of the new shape
    wider = replace(SETTINGS, n_mels=20)
    wide_key = cache_key(content_hash(items), wider)
    assert wide_key not in (key, new_key)
    assert get_or_build_cache(items, wider, root=root, key=wide_key, progress=False).item(0)["sound"].shape == (1, 20, 24)
    assert decoded_item_count() == decoded + 12

    # a key that names other settings or items is refused, not silently used
    with pytest.raises(ValueError, match="settings"):
        get_or_build_cache(items, SETTINGS, root=root, key=wide_key, progress=False)
    with pytest.raises(ValueError, match="differ"):
        get_or_build_cache(items[:3], SETTINGS, root=root, key=key, progress=False)


def test_a_directory_without_valid_meta_is_not_a_cache(tmp_path):
    items = make_items(tmp_path / "data", n_paired=1)
    root = tmp_path / "cache"
    key = cache_key("h", SETTINGS)
    (root / key).mkdir(parents=True)
    assert open_cache(root, key) is None
    (root / key / "meta.json").write_text("{truncated")
    assert open_cache(root, key) is None
    (root / key / "meta.json").write_text(json.dumps({"key": "other", "format_version": 1}))
    assert open_cache(root, key) is None
    cache = get_or_build_cache(items, SETTINGS, root=root, key=key, progress=False)
    assert len(cache) == 3 and open_cache(root, key) is not None
    with pytest.raises(ValueError, match="key"):
        open_cache(root, "../escape")


CHILD = """
import json, sys, time
from pathlib import Path
from methods.data.cache import get_or_build_cache
from methods.data.decode import FeatureSettings
from methods.data.manifest import Item
spec = json.loads(Path(sys.argv[1]).read_text())
print("ready", flush=True)
while spec["go"] and not Path(spec["go"]).exists():
    time.sleep(0.01)
cache = get_or_build_cache([Item(**d) for d in spec["items"]], FeatureSettings(**spec["settings"]),
                           root=spec["root"], key=spec["key"], progress=False)
print("done", len(cache), cache.created, flush=True)
"""


def start_builder(tmp_path: Path, name: str, items: list[Item], root: Path, key: str, *, delay: float,
                  go: Path | None = None) -> subprocess.Popen:
    spec = {"items": [asdict(it) for it in items], "settings": asdict(SETTINGS), "root": str(root), "key": key,
            "go": None if go is None else str(go)}
    (tmp_path / f"{name}.json").write_text(json.dumps(spec))
    env = {**os.environ, TEST_DELAY_ENV: str(delay)}
    return subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / f"{name}.json")], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_killed_build_leaves_nothing_that_looks_complete(tmp_path):
    items = make_items(tmp_path / "data", n_paired=10)
    root = tmp_path / "cache"
    key = cache_key(content_hash(items), SETTINGS)
    child = start_builder(tmp_path, "killed", items, root, key, delay=0.25)  # ~3 s of decoding
    try:
        deadline = time.monotonic() + 120
        while not any((d / "images.npy").exists() for d in temp_dirs(root)):
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline, "the build never started"
            time.sleep(0.02)
        time.sleep(0.6)  # a few items in
        assert child.poll() is None, "the build finished before it could be killed"
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate()
    [leftover] = temp_dirs(root)
    assert not (leftover / "meta.json").exists()
    assert open_cache(root, key) is None and not (root / key).exists()

    cache = get_or_build_cache(items, SETTINGS, root=root, key=key, progress=False)
    assert temp_dirs(root) == []  # the dead build's temp dir was removed
    assert cache.ids == [it.id for it in items]
    torch.testing.assert_close(cache.item(11)["sound"], direct_sound(items[11]), rtol=2e-3, atol=2e-3)


def test_two_processes_building_one_key_build_once(tmp_path):
    items = make_items(tmp_path / "data", n_paired=6)
    root = tmp_path / "cache"
    key = cache_key(content_hash(items), SETTINGS)
    go = tmp_path / "go"
    children = [start_builder(tmp_path, f"b{i}", items, root, key, delay=0.1, go=go) for i in range(2)]
    try:
        for child in children:
            assert child.stdout.readline().strip() == "ready", child.communicate()
        go.touch()  # both call get_or_build_cache at once
        outs = [child.communicate(timeout=180) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.communicate()
    assert [c.returncode for c in children] == [0, 0], outs
    assert sum(err.count(f"feature cache {key}: built") for _, err in outs) == 1, outs
    cache = open_cache(root, key)
    assert cache is not None and len(cache) == 8
    assert [out.split() for out, _ in outs] == [["done", "8", cache.created]] * 2
    assert temp_dirs(root) == []


def test_unusable_items_fail_in_one_line_or_are_skipped(tmp_path, capsys):
    items = make_items(tmp_path / "data", n_paired=2)
    garbage = tmp_path / "data" / "garbage.wav"
    garbage.write_bytes(b"not a wav file at all")
    short = _wav(tmp_path / "data" / "short.wav", seconds=0.4)
    bad = [Item(id="garbage", sound=str(garbage)), Item(id="short", image=items[0].image, sound=short)]
    all_items = items[:2] + bad + items[2:]
    root = tmp_path / "cache"
    key = cache_key(content_hash(all_items), SETTINGS)

    with pytest.raises(DataError) as info:
        get_or_build_cache(all_items, SETTINGS, root=root, key=key, progress=False)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"2 of 6 items unusable; first: {garbage}: unreadable audio")
    assert f"; {short}: clip of 0.400 s" in message and "data.skip_bad=true" in message
    assert open_cache(root, key) is None and not (root / key).exists() and temp_dirs(root) == []

    capsys.readouterr()
    cache = get_or_build_cache(all_items, SETTINGS, root=root, key=key, skip_bad=True, progress=False)
    assert f"skipped 2 of 6 unusable items; first: {garbage}" in capsys.readouterr().err
    assert cache.ids == ["pair0", "pair1", "img_only", "snd_only"]
    assert [s["id"] for s in cache.skipped] == ["garbage", "short"]
    assert cache.skipped[1]["reason"].startswith(f"{short}: clip of 0.400 s")
    assert json.loads((root / key / "meta.json").read_text())["skipped"] == cache.skipped
    np.testing.assert_array_equal(cache.has_image, [1, 1, 1, 0])
    torch.testing.assert_close(cache.item(3)["sound"], direct_sound(items[3]), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(cache.item(2)["image"], load_image(items[2].image, SETTINGS).float() / 255)
    # the same key and items open it again, skipped ones included
    assert get_or_build_cache(all_items, SETTINGS, root=root, key=key, progress=False).created == cache.created

    pool = CachedPool(cache, ["short", "pair1", "garbage", "pair0"])
    assert (pool.ids, pool.missing) == (["pair1", "pair0"], 2)
    with pytest.raises(KeyError, match="not in it"):
        CachedPool(cache, ["pair0", "never_heard_of"])
    with pytest.raises(KeyError, match="skipped"):
        cache.index_of("garbage")

    with pytest.raises(DataError, match="^2 of 2 items unusable"):
        build_cache(bad, SETTINGS, root=root, key="allbad", skip_bad=True, progress=False)
    assert not (root / "allbad").exists()


class AddNoise:
    """A random augmentation that counts its calls (a picklable transform)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, item: dict) -> dict:
        self.calls += 1
        return {**item, "sound": item["sound"] + torch.randn_like(item["sound"])}


def test_cached_pool_order_keys_transform_and_pickling(tmp_path):
    items = make_items(tmp_path / "data", n_paired=5)
    cache = get_or_build_cache(items, SETTINGS, root=tmp_path / "cache", key="k", progress=False)
    order = ["pair3", "pair0", "pair4", "pair1"]

    pool = CachedPool(cache, order)
    assert len(pool) == 4 and pool.ids == order and pool.missing == 0
    assert pool.keys == ("image", "sound", "label", "index")
    for j, item_id in enumerate(order):
        got, row = pool[j], cache.item(cache.index_of(item_id))
        assert list(got) == ["image", "sound", "label", "index"]
        assert got["index"].item() == j and got["label"].item() == row["label"].item()
        assert torch.equal(got["image"], row["image"]) and torch.equal(got["sound"], row["sound"])
    batch = next(iter(DataLoader(pool, batch_size=4)))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["sound"].shape == (4, 1, 16, 24)
    assert batch["index"].tolist() == [0, 1, 2, 3]

    # The batched read the DataLoader uses gives exactly the items one by one.
    for js in ([2, 0, 3], [1], [3, 3, 0]):
        for got, j in zip(pool.__getitems__(js), js):
            assert list(got) == list(pool[j]) and all(torch.equal(got[k], pool[j][k]) for k in got)
    with pytest.raises(IndexError):
        pool.__getitems__([0, 9])

    sounds = CachedPool(cache, order, keys=("sound", "index"))
    assert list(sounds[1]) == ["sound", "index"]

    noisy = CachedPool(cache, order, keys=("sound",), transform=AddNoise())
    a, b = noisy[0]["sound"], noisy[0]["sound"]
    assert noisy.transform.calls == 2 and not torch.equal(a, b)
    assert not torch.equal(a, pool[0]["sound"])

    # a modality only some items have would not collate; one no item has is left out
    with pytest.raises(ValueError, match="1 of 2 pool items have no image"):
        CachedPool(cache, ["pair0", "snd_only"])
    assert CachedPool(cache, ["snd_only"]).keys == ("sound", "label", "index")
    with pytest.raises(ValueError, match="unknown"):
        CachedPool(cache, order, keys=("images",))

    data_bytes = sum(np.load(tmp_path / "cache" / "k" / n).nbytes for n in ("images.npy", "sounds.npy"))
    size = len(pickle.dumps(noisy))
    assert size < 2000 and size < data_bytes / 5, (size, data_bytes)
    copy = pickle.loads(pickle.dumps(pool))
    assert copy.cache._arrays is None  # reopened lazily by the process that reads
    assert torch.equal(copy[2]["sound"], pool[2]["sound"]) and copy.ids == order
