"""Input pipeline for real data: samples/s from the feature cache against decoding on the fly and
against in-memory tensors, and the tiny BMA training step fed from each.

It writes a small real-format dataset to a temporary folder: image + sound pairs, the images as
PNG files of 96×96 pixels and the sounds as 2.5 s WAV files at 16 kHz, so every sound is
resampled to 8 kHz. It then indexes the folder into a manifest and measures the following,
with a DataLoader of batch 128, shuffled, and no loader workers:

1. decode on the fly: every item is read with Pillow and soundfile, resampled, and turned into
   a log-mel;
2. the feature cache: its build rate, then reading from the memory-mapped arrays;
3. in-memory tensors of the same shapes: the ceiling.

It also times the BMA step of the tiny preset (forward, backward, Adam; memories n = 1000)
with batches from the cache and from memory, taking turns in blocks of steps. The targets (issue 7) are: cache ≥ 5× the
decode-on-the-fly rate, and the step from the cache within 5 % of the in-memory step.

    .venv/bin/python benchmarks/input_pipeline.py            # ~2 min on 2 CPU cores

It prints a table and appends it to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import results  # benchmarks/results.py, next to this script
import soundfile as sf
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from methods.data.cache import get_or_build_cache  # noqa: E402
from methods.data.feature_cache import CachedPool, cache_key  # noqa: E402
from methods.data.decode import FeatureSettings, load_image, load_sound, sound_features  # noqa: E402
from methods.data.layouts import index_layout  # noqa: E402
from methods.data.manifest import read_manifest, write_manifest  # noqa: E402
from methods.data.logmel import LogMel  # noqa: E402
from methods.registry import build_method  # noqa: E402
from orchestrator.config import resolve  # noqa: E402

BATCH = 128


def write_dataset(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    t = np.arange(int(2.5 * 16000)) / 16000
    for i in range(n):
        sf.write(folder / f"c{i:05d}.wav", (0.3 * np.sin(2 * np.pi * (200 + i) * t)
                                            + 0.01 * rng.standard_normal(t.size)).astype(np.float32), 16000)
        Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(folder / f"c{i:05d}.png")


class DecodeOnTheFly(Dataset):
    def __init__(self, items, settings: FeatureSettings) -> None:
        self.items, self.settings = items, settings
        self.logmel = LogMel(sample_rate=settings.sample_rate, n_mels=settings.n_mels,
                             n_frames=settings.n_frames, clip_seconds=settings.clip_seconds)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = self.items[i]
        image = load_image(item.image, self.settings).float() / 255
        sound = sound_features(load_sound(item.sound, self.settings), self.settings, self.logmel)
        return {"image": image, "sound": sound, "index": torch.tensor(i)}


class InMemory(Dataset):
    def __init__(self, n: int, settings: FeatureSettings) -> None:
        g = torch.Generator().manual_seed(0)
        s = settings.image_size
        self.image = torch.rand(n, 3, s, s, generator=g)
        self.sound = torch.randn(n, settings.channels, settings.n_mels, settings.n_frames, generator=g)

    def __len__(self) -> int:
        return len(self.image)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.image[i], "sound": self.sound[i], "index": torch.tensor(i)}


def loader_rate(dataset: Dataset, epochs: int) -> float:
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, drop_last=True)
    n, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            n += batch["image"].shape[0]
    return n / (time.perf_counter() - t0)


def step_rates(sources: dict[str, Dataset], steps: int, rounds: int, n_items: int) -> dict[str, float]:
    """Pairs/s of one BMA model's training step fed from each source; the sources take turns
    in blocks of ``steps`` steps for ``rounds`` rounds, so drifts of the machine hit them alike."""
    cfg = resolve({}, preset="tiny", overrides=["data.unpaired_sound_size=0", "data.unpaired_image_size=0",
                                                f"data.paired_size={n_items}"])
    torch.manual_seed(0)
    from methods.data import ProceduralAV

    method = build_method("bma", cfg.method, ProceduralAV(cfg.data).info())
    opt = torch.optim.Adam(method.parameters(), lr=1e-3)
    iters = {k: iter(()) for k in sources}
    loaders = {k: DataLoader(d, batch_size=BATCH, shuffle=True, drop_last=True) for k, d in sources.items()}
    seconds = dict.fromkeys(sources, 0.0)

    def run(name: str, n: int) -> None:
        for _ in range(n):
            batch = next(iters[name], None)
            if batch is None:
                iters[name] = iter(loaders[name])
                batch = next(iters[name])
            out = method(batch)
            opt.zero_grad()
            out.metrics["loss"].backward()
            opt.step()
            method.after_step(batch, out)

    for name in sources:
        run(name, 2)  # warm-up
    for _ in range(rounds):
        for name in sources:
            t0 = time.perf_counter()
            run(name, steps)
            seconds[name] += time.perf_counter() - t0
    return {k: rounds * steps * BATCH / v for k, v in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8, help="steps per block")
    parser.add_argument("--rounds", type=int, default=6, help="blocks per source, taking turns")
    parser.add_argument("--no-append", action="store_true", help="print only; leave RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    settings = FeatureSettings()  # the tiny preset: 32 px, 8 kHz, 2 s, 40 mels x 64 frames
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "clips"
        folder.mkdir()
        write_dataset(folder, args.items)
        manifest_path = write_manifest(index_layout("folder", folder), Path(tmp) / "m.csv")
        manifest = read_manifest(manifest_path)
        items = manifest.pools()["paired"]
        decode = loader_rate(DecodeOnTheFly(items[: min(len(items), 512)], settings), 1)
        t0 = time.perf_counter()
        cache = get_or_build_cache(manifest.items(), settings, root=Path(tmp) / "cache",
                                   key=cache_key(manifest.content_hash, settings), workers=2, progress=False)
        build = len(cache) / (time.perf_counter() - t0)
        cached_pool = CachedPool(cache, [it.id for it in items], keys=("image", "sound", "index"))
        cached = loader_rate(cached_pool, 3)
        memory_pool = InMemory(len(items), settings)
        memory = loader_rate(memory_pool, 3)
        rates = step_rates({"cache": cached_pool, "memory": memory_pool}, args.steps, args.rounds, len(items))
        step_cached, step_memory = rates["cache"], rates["memory"]

    commit = results.commit()
    rows = [
        ("decode on the fly (Pillow + soundfile + resample + log-mel)", f"{decode:.0f}", "1.0×"),
        ("feature cache, build (2 processes)", f"{build:.0f}", "-"),
        ("feature cache, read (memory-mapped)", f"{cached:.0f}", f"{cached / decode:.1f}×"),
        ("in-memory tensors", f"{memory:.0f}", f"{memory / decode:.1f}×"),
        ("BMA tiny step, batches from the cache", f"{step_cached:.0f}", f"{step_cached / step_memory:.3f} of in-memory"),
        ("BMA tiny step, batches from memory", f"{step_memory:.0f}", "1.000"),
    ]
    lines = [
        f"{dt.date.today().isoformat()}, {platform.machine()}, 2 threads, commit {commit}, "
        f"`benchmarks/input_pipeline.py --items {args.items} --steps {args.steps} --rounds {args.rounds}` (96 px PNG + 2.5 s 16 kHz WAV "
        f"pairs → 32 px, 8 kHz, 40×64 log-mels; batch {BATCH}, no loader workers).",
        "",
        "| source | samples/s | relative |",
        "| --- | --- | --- |",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_append:
        results.record("Input pipeline for real data (feature cache)", text)


if __name__ == "__main__":
    main()
