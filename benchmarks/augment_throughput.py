"""The full training step fed by the input pipeline, against the same step on pre-made tensors.

One BMA-Memory model (the preset's encoders, memories n = 1000), one Adam, batch B paired pairs
plus B unpaired sounds and B unpaired images, each unpaired sample in two views (the full
L_pair + L_unpair step). The step is fed three ways, taking turns in blocks of steps so that
machine drift hits all of them alike:

1. pre-made tensors: every view made before timing; the ceiling;
2. avlab's pipeline: the procedural pools (each item rendered once, then memoised) through a
   shuffled DataLoader, then ``DeviceAugment`` on the batch (SpecAugment and SimCLR views,
   and the ``light`` paired augmentation when the preset asks for it);
3. per-sample CPU augmentation (torchvision's and torchaudio's transforms, one sample at a
   time), the pipeline before batched augmentation; with ``--real``, from the real-data feature
   cache instead of the procedural pools.

The target (issue 15): the step fed by avlab's pipeline at >= 0.9 x the step on pre-made tensors.

    .venv/bin/python benchmarks/augment_throughput.py                  # ~3 min on 2 CPU cores
    .venv/bin/python benchmarks/augment_throughput.py --preset small --steps 8 --rounds 4

It prints a table and appends it to ``benchmarks/RESULTS.md``.

Legend: B batch.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import results  # benchmarks/results.py, next to this script
import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from methods.data import build_dataset  # noqa: E402
from methods.data.augment import SpecAugment, simclr_image_augment  # noqa: E402
from methods.registry import build_method  # noqa: E402
from orchestrator.config import resolve  # noqa: E402
from orchestrator.loaders import DeviceAugment, build_pretraining_data  # noqa: E402


def cycle(loader: DataLoader):
    while True:
        yield from loader


def per_sample_views(raw: dict[str, torch.Tensor], key: str, n_mels: int, n_frames: int, size: int):
    """The reference per-sample pipeline: two views of each sample, one sample at a time."""
    if key == "usound":
        spec = SpecAugment(max(1, n_mels // 5), max(1, n_frames // 5))
        xs = raw["sound"]
        return {key: torch.stack([spec(x) for x in xs]), f"{key}_aug": torch.stack([spec(x) for x in xs])}
    aug = simclr_image_augment(size)
    xs = raw["image"]
    return {key: torch.stack([aug(x) for x in xs]), f"{key}_aug": torch.stack([aug(x) for x in xs])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=6, help="steps per block")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n_items = args.steps * args.rounds * 128 + 256
    overrides = [f"data.paired_size={n_items}", f"data.unpaired_sound_size={n_items}",
                 f"data.unpaired_image_size={n_items}", "method.name=bma"]
    cfg = resolve({}, preset=args.preset, overrides=overrides)
    b = cfg.train.batch_size
    data = build_dataset(cfg.data)
    model = build_method("bma", cfg.method, data.info())
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr)
    pools = build_pretraining_data(cfg, model)
    augment = DeviceAugment(cfg)
    # Render every item once first (as the first epoch does), so the blocks time the steady state.
    t0 = time.perf_counter()
    for pool in pools.values():
        for i in range(len(pool)):
            pool[i]
    render_s = time.perf_counter() - t0

    loaders = {k: cycle(DataLoader(p, batch_size=b, shuffle=True, drop_last=True)) for k, p in pools.items()}

    def avlab_batch():
        batch = augment.paired_batch(next(loaders["main"]), 0)
        for key in ("usound", "uimage"):
            batch.update(augment.unpaired_views(key, next(loaders[key]), 0))
        return batch

    def per_sample_batch():
        batch = next(loaders["main"])
        for key in ("usound", "uimage"):
            batch.update(per_sample_views(next(loaders[key]), key, cfg.data.n_mels, cfg.data.n_frames,
                                          cfg.data.image_size))
        return batch

    premade = [avlab_batch() for _ in range(4)]
    sources = {
        "pre-made tensors (ceiling)": lambda it=itertools.cycle(premade): next(it),
        "avlab pipeline (pools + DeviceAugment)": avlab_batch,
        "per-sample CPU augmentation": per_sample_batch,
    }

    def step(batch):
        out = model(batch)
        opt.zero_grad(set_to_none=True)
        out.metrics["loss"].backward()
        opt.step()

    model.train()
    for fn in sources.values():  # warm-up
        step(fn())
    times = {name: 0.0 for name in sources}
    for _ in range(args.rounds):
        for name, fn in sources.items():
            t = time.perf_counter()
            for _ in range(args.steps):
                step(fn())
            times[name] += time.perf_counter() - t
    pairs = args.steps * args.rounds * b
    ceiling = pairs / times["pre-made tensors (ceiling)"]
    rows = [f"| {name} | {pairs / t:.0f} | {pairs / t / ceiling:.3f} |" for name, t in times.items()]
    table = "\n".join(["| step fed by | pairs/s | of pre-made |", "| --- | --- | --- |", *rows])
    # The batched augmentation alone, per batch of each kind.
    raw_s = next(iter(DataLoader(pools["usound"], batch_size=b)))
    raw_i = next(iter(DataLoader(pools["uimage"], batch_size=b)))
    t = time.perf_counter()
    for _ in range(5):
        augment.unpaired_views("usound", raw_s, 0)
        augment.unpaired_views("uimage", raw_i, 0)
    batched_ms = (time.perf_counter() - t) / 5 * 1000
    t = time.perf_counter()
    per_sample_views(raw_s, "usound", cfg.data.n_mels, cfg.data.n_frames, cfg.data.image_size)
    per_sample_views(raw_i, "uimage", cfg.data.n_mels, cfg.data.n_frames, cfg.data.image_size)
    per_sample_ms = (time.perf_counter() - t) * 1000
    text = (
        f"{table}\n\nTwo views of {b} unpaired sounds and {b} unpaired images: {batched_ms:.0f} ms batched, "
        f"{per_sample_ms:.0f} ms per sample. Rendering the {sum(len(p) for p in pools.values())} items "
        f"once took {render_s:.0f} s."
    )
    print(text)
    import datetime as dt
    import platform

    results.record(
        f"Input pipeline for the training step (procedural data, {args.preset} preset)",
        f"{dt.date.today()}, {platform.machine()}, commit {results.commit()}, "
        f"`benchmarks/augment_throughput.py --preset {args.preset} --steps {args.steps} --rounds {args.rounds}` "
        f"({args.threads} threads; BMA-Memory L_pair + L_unpair step, batch {b} pairs + {b} unpaired sounds "
        f"+ {b} unpaired images, blocks of {args.steps} steps in turn).\n\n{text}",
    )


if __name__ == "__main__":
    main()
