"""Headroom of the procedural dataset: how far a supervised encoder sits above a random one.

Self-supervised methods are judged by how much of the gap between a randomly initialised
encoder and a supervised one they close under the linear probe (docs/spec.md §6). This script measures
both ends on the default ``DataConfig``:

(a) random-init ResNet-18 (width 16) image features and ResNet-10 (width 16, one channel) sound
    features, probed by standardised logistic regression fitted on ``train``, scored on ``test``;
(b) the same encoders trained with labels (encoder + linear layer, cross-entropy, Adam) on
    ``train`` plus the labelled ``paired`` pool, then probed the same way.

It also probes two trivial cues, mean colour and mean loudness, which must stay weak, and the
mean spectrum for reference. It prints a table and appends it to ``benchmarks/RESULTS.md``.

    .venv/bin/python benchmarks/dataset_headroom.py            # ~2 min on 2 CPU cores

Legend: N samples, S image side, F mel bins, T frames, D feature size.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from methods.data import ProceduralAV, DataConfig  # noqa: E402
from methods.encoders import EncoderConfig, build_encoder  # noqa: E402
from methods.evaluate.linear_probe import linear_probe  # noqa: E402

import results  # noqa: E402  benchmarks/results.py, next to this script

RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def load_pool(av: ProceduralAV, name: str) -> dict[str, torch.Tensor]:
    """Every item of a labelled pool, stacked: image (N,3,S,S), sound (N,1,F,T), label (N,)."""
    loader = DataLoader(av.pool(name), batch_size=256, shuffle=False)
    batches = list(loader)
    return {k: torch.cat([b[k] for b in batches]) for k in ("image", "sound", "label")}


@torch.no_grad()
def features(encoder: nn.Module, x_N: torch.Tensor, batch: int = 256) -> torch.Tensor:
    encoder.eval()
    return torch.cat([encoder(x_N[i : i + batch]) for i in range(0, len(x_N), batch)])


def augment_images(img_BCHW: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a random 2-pixel translation (cheap, label-preserving)."""
    flip = torch.rand(img_BCHW.shape[0], generator=gen) < 0.5
    img_BCHW = torch.where(flip[:, None, None, None], img_BCHW.flip(-1), img_BCHW)
    dy, dx = torch.randint(-2, 3, (2,), generator=gen).tolist()
    return torch.roll(img_BCHW, shifts=(dy, dx), dims=(-2, -1))


def augment_sounds(mel_B1FT: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random circular shift in time (the clips are stationary or periodic)."""
    shift = int(torch.randint(0, mel_B1FT.shape[-1], (1,), generator=gen))
    return torch.roll(mel_B1FT, shifts=shift, dims=-1)


def train_supervised(
    encoder: nn.Module,
    x_N: torch.Tensor,
    y_N: torch.Tensor,
    *,
    num_classes: int,
    epochs: int,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
    seed: int,
    lr: float = 5e-3,
    batch: int = 64,
) -> float:
    """Encoder + linear layer trained with cross-entropy; returns the final epoch's train loss."""
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(encoder.out_dim, num_classes)
    params = list(encoder.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    steps = epochs * ((len(x_N) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    loss_sum = 0.0
    for _ in range(epochs):
        encoder.train()
        perm = torch.randperm(len(x_N), generator=gen)
        loss_sum, n = 0.0, 0
        for i in range(0, len(x_N), batch):
            idx = perm[i : i + batch]
            logits = head(encoder(augment(x_N[idx], gen)))
            loss = nn.functional.cross_entropy(logits, y_N[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(idx)
            n += len(idx)
        loss_sum /= n
    return loss_sum


def probe(train_X: torch.Tensor, train_y: torch.Tensor, test_X: torch.Tensor,
          test_y: torch.Tensor) -> float:
    return linear_probe(train_X, train_y, test_X, test_y, max_iter=2000).accuracy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-epochs", type=int, default=16, help="supervised image epochs")
    parser.add_argument("--sound-epochs", type=int, default=5, help="supervised sound epochs")
    parser.add_argument("--labelled", type=int, default=8000,
                        help="labelled pairs drawn from the paired pool's generator for training")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-append", action="store_true", help="print only; leave RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()

    cfg = DataConfig()
    av = ProceduralAV(cfg)
    train, test = load_pool(av, "train"), load_pool(av, "test")
    # More labelled pairs from the same generator: a larger paired pool with the same seed
    # starts with the default pool's items.
    labelled = ProceduralAV(dataclasses.replace(cfg, paired_size=args.labelled))
    paired = load_pool(labelled, "paired")
    t_data = time.perf_counter() - t_start
    n_gen = len(train["label"]) + len(test["label"]) + len(paired["label"])
    generation = (f"generating {n_gen} labelled pairs took {t_data:.1f} s "
                  f"({t_data / n_gen * 1e3:.2f} ms per pair, DataLoader collation included)")
    print(generation)

    rows: list[tuple[str, float, float]] = []
    # Trivial cues: mean colour (3 numbers per image) and mean loudness (1 number per sound).
    colour = probe(train["image"].mean((2, 3)), train["label"],
                   test["image"].mean((2, 3)), test["label"])
    loud = probe(train["sound"].mean((1, 2, 3))[:, None], train["label"],
                 test["sound"].mean((1, 2, 3))[:, None], test["label"])
    rows.append(("mean colour / mean loudness", colour, loud))
    spectrum = probe(train["sound"].mean((1, 3)), train["label"],
                     test["sound"].mean((1, 3)), test["label"])
    rows.append(("- / mean spectrum (F values)", float("nan"), spectrum))

    specs = {
        "image": (EncoderConfig(arch="resnet18", base_width=16), 3, augment_images,
                  args.image_epochs),
        "sound": (EncoderConfig(arch="resnet10", base_width=16), 1, augment_sounds,
                  args.sound_epochs),
    }
    random_acc: dict[str, float] = {}
    sup_acc: dict[str, float] = {}
    for key, (enc_cfg, channels, augment, epochs) in specs.items():
        torch.manual_seed(args.seed)
        encoder = build_encoder(enc_cfg, in_channels=channels)
        random_acc[key] = probe(features(encoder, train[key]), train["label"],
                                features(encoder, test[key]), test["label"])
        t0 = time.perf_counter()
        x_N = torch.cat([train[key], paired[key]])
        y_N = torch.cat([train["label"], paired["label"]])
        loss = train_supervised(encoder, x_N, y_N, num_classes=cfg.num_classes,
                                epochs=epochs, augment=augment, seed=args.seed)
        sup_acc[key] = probe(features(encoder, train[key]), train["label"],
                             features(encoder, test[key]), test["label"])
        print(f"{key}: random {random_acc[key]:.3f}  supervised {sup_acc[key]:.3f} "
              f"(train loss {loss:.3f}, {time.perf_counter() - t0:.0f} s)")
    rows.append(("random-init encoder", random_acc["image"], random_acc["sound"]))
    rows.append((f"supervised encoder ({len(x_N)} labelled pairs; {args.image_epochs} / "
                 f"{args.sound_epochs} epochs)", sup_acc["image"], sup_acc["sound"]))

    chance = 1.0 / cfg.num_classes
    lines = [
        f"Linear-probe top-1 accuracy on `test` ({len(test['label'])} samples, "
        f"probe fitted on `train`, {len(train['label'])} samples); chance {chance:.2f}.",
        "",
        "| features | image | sound |",
        "| --- | --- | --- |",
    ]
    for name, img, snd in rows:
        cell = lambda v: "-" if np.isnan(v) else f"{v:.3f}"  # noqa: E731
        lines.append(f"| {name} | {cell(img)} | {cell(snd)} |")
    elapsed = time.perf_counter() - t_start
    table = "\n".join(lines)
    print()
    print(table)
    print(f"\ntotal {elapsed:.0f} s")

    if not args.no_append:
        command = "python benchmarks/dataset_headroom.py " + " ".join(argv or sys.argv[1:])
        results.record("Procedural data set headroom: random init against a supervised encoder", (
            f"{dt.datetime.now().strftime('%Y-%m-%d %H:%M')}, `{command.strip()}`, "
            f"{torch.get_num_threads()} CPU threads, {elapsed:.0f} s; default `DataConfig` "
            f"(image {cfg.image_size}px, {cfg.n_mels} mel bins x {cfg.n_frames} frames). "
            f"Encoders: ResNet-18 (width 16) for images, ResNet-10 (width 16, 1 channel) for "
            f"sounds; {generation}.\n\n{table}\n"
        ))
        print(f"recorded in {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
