"""Recipe lab: train one method in this process on pre-rendered procedural pools and probe it.

A run through `avlab run` pays for Ray, MLflow and checkpoints; trying a recipe (an augmentation,
a pool size, a head, a learning rate) only needs the training step and the probes. This script
renders the pools once (kept in a temporary file keyed by their sizes, so the next call starts
at once), trains with Adam on batches drawn from them, applies the same device-side augmentations
as avlab (``orchestrator.loaders.DeviceAugment``), and reports the linear probes on h, sound →
image Rank-1 and the projections' mean pairwise cosine (1 = collapse) before and after, with the
per-epoch losses. Everything is scored on the validation split (``val``): a recipe is a choice,
and choices are never made on the test split that runs report. Nothing is appended to RESULTS.md:
it is for exploring, and what it finds belongs in a preset and a sweep.

    .venv/bin/python benchmarks/recipe_lab.py --pairs 16384 --epochs 4 --paired-augment light
    .venv/bin/python benchmarks/recipe_lab.py --method avid --override method.head_batchnorm=true
    .venv/bin/python benchmarks/recipe_lab.py --pairs 4096 --epochs 20 --paired-augment none   # memorises
    .venv/bin/python benchmarks/recipe_lab.py --method avid --cma-precision   # CMA positives' class precision

Legend: N pool size, B batch.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from methods.data import build_dataset  # noqa: E402
from methods.evaluate.linear_probe import linear_probe  # noqa: E402
from methods.evaluate.suite import mean_pairwise_cosine  # noqa: E402
from methods.registry import build_method  # noqa: E402
from orchestrator.config import resolve  # noqa: E402
from orchestrator.loaders import DeviceAugment  # noqa: E402


def rendered(cfg, pools: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    """Every item of ``pools`` stacked into tensors; cached in the temp folder by config."""
    key = cfg.identity()
    path = Path(tempfile.gettempdir()) / f"avlab-recipe-lab-{key}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    data = build_dataset(cfg.data)
    out = {}
    for name in pools:
        pool = data.pool(name)
        if len(pool) == 0:
            continue
        batches = list(DataLoader(pool, batch_size=512))
        out[name] = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    torch.save(out, path)
    return out


@torch.no_grad()
def probe(method, pools) -> dict[str, float]:
    method.eval()
    res: dict[str, float] = {}
    z = {}
    for modality, key, arg in (("image", "v", "images"), ("sound", "s", "sounds")):
        feats = {}
        for split in ("train", "val"):
            x = pools[split][modality]
            parts = [method.embed(**{arg: x[i : i + 256]}) for i in range(0, len(x), 256)]
            feats[split] = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        r = linear_probe(feats["train"][f"h_{key}"], pools["train"]["label"], feats["val"][f"h_{key}"],
                         pools["val"]["label"])
        res[f"{modality}_h_linear"] = round(r.accuracy, 3)
        z[key] = feats["val"][f"z_{key}"]
        res[f"{modality}_z_mean_cos"] = round(mean_pairwise_cosine(z[key]), 3)
    top = (F.normalize(z["s"], dim=1) @ F.normalize(z["v"], dim=1).T).argmax(1)
    labels = pools["val"]["label"]
    res["retrieval_s2i_rank1"] = round((labels[top] == labels).float().mean().item(), 3)
    method.train()
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="bma")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--pairs", type=int, default=16384)
    parser.add_argument("--unpaired", type=int, default=0, help="unpaired sounds and images (0: L_pair only)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--paired-augment", default="light", choices=("none", "light"))
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cma-precision", action="store_true",
                        help="AVID: after each epoch, the class precision of the positive sets of every CMA rule")
    parser.add_argument("--override", action="append", default=[], help="key.path=value, e.g. method.memory_size=10")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = resolve({}, preset=args.preset, overrides=[
        f"method.name={args.method}", f"seed={args.seed}", f"data.paired_size={args.pairs}",
        f"data.unpaired_sound_size={args.unpaired}", f"data.unpaired_image_size={args.unpaired}",
        f"train.paired_augment={args.paired_augment}", "data.transfer_train_size=0", "data.transfer_test_size=0",
        *args.override,
    ])
    t0 = time.perf_counter()
    pools = rendered(cfg, ("paired", "unpaired_sound", "unpaired_image", "train", "val"))
    print(f"pools ready in {time.perf_counter() - t0:.0f} s", flush=True)
    torch.manual_seed(args.seed)
    method = build_method(cfg.method_name, cfg.method, build_dataset(cfg.data).info())
    method.configure_training(args.epochs)
    opt = torch.optim.Adam(method.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    augment = DeviceAugment(cfg)
    print("init", json.dumps(probe(method, pools)), flush=True)
    paired, b = pools["paired"], cfg.train.batch_size
    label = paired["label"][paired["index"].argsort()]  # the class of each memory slot
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        perm, sums = torch.randperm(len(paired["index"]), generator=g), {}
        steps = len(perm) // b
        for step in range(steps):
            idx = perm[step * b : (step + 1) * b]
            batch = augment.paired_batch({k: v[idx] for k, v in paired.items()}, epoch)
            for key, pool in (("usound", "unpaired_sound"), ("uimage", "unpaired_image")):
                if method.uses_unpaired and pool in pools:
                    j = torch.randint(0, len(pools[pool]["index"]), (b,), generator=g)
                    batch.update(augment.unpaired_views(key, {k: v[j] for k, v in pools[pool].items()}, epoch))
            out = method.training_step(batch)
            opt.zero_grad(set_to_none=True)
            out.metrics["loss"].backward()
            opt.step()
            method.after_step(batch, out)
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
        diagnostics = method.on_epoch_end(epoch) or {}  # AVID+CMA: cma_positive_precision
        means = {k: round(v / steps, 4) for k, v in sums.items()}
        means.update({k: round(v, 3) for k, v in diagnostics.items()})
        if args.cma_precision:  # AVID: precision of the positive sets every rule would pick now (Fig. 4c)
            from methods.cma import CMA_RULES, cma_positive_sets

            if "latents" not in pools:  # the factors each image shares with its sound, by slot
                data = build_dataset(cfg.data)
                pools["latents"] = torch.tensor([list(data.latents("paired", i).values()) for i in range(len(label))])
            lat = pools["latents"]
            # |latent difference| to the positives over that to all others: 1 = not grouped by latents
            others = torch.randint(0, len(lat), (len(lat), 64), generator=torch.Generator().manual_seed(0))
            base = (lat[:, None, :] - lat[others]).abs().mean()
            for rule in CMA_RULES:
                pos = cma_positive_sets(method.bank_v, method.bank_a, k=method.cfg.cma_positives, rule=rule,
                                        chunk_size=4096)
                means[f"precision_{rule}"] = round((label[pos] == label[:, None]).float().mean().item(), 3)
                means[f"latent_gap_{rule}"] = round(((lat[:, None, :] - lat[pos]).abs().mean() / base).item(), 3)
        print(f"epoch {epoch + 1}/{args.epochs} ({time.perf_counter() - t0:.0f} s)", json.dumps(means), flush=True)
    print("final", json.dumps(probe(method, pools)), flush=True)


if __name__ == "__main__":
    main()
