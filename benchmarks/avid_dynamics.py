"""AVID training dynamics on the procedural dataset: does instance discrimination get going, or
do the projections collapse?

Trains AVID in this process (no Ray, one worker, the tiny preset's data and encoders) for a
fixed number of steps at each learning rate given, with Adam as in the paper, and reports

- Z̄, the partition-function estimate frozen on the first batch (paper 002 §3.3: 2.2045, the
  value random 128-d memories give at τ = 0.07);
- the loss at the end (mean of the last 16 steps). References: ≈ 8.2 is the "trivial" loss of
  projections orthogonal to every memory (positive term log(K Z̄), negatives K / (K Z̄ + 1));
- the mean pairwise cosine of the projections z_v and z_a in the last batch (0.73 / 0.77 at
  initialisation; 1.0 means every sample maps to the same point: collapse);
- the norm of the image head's output before normalisation (1.6 at initialisation).

It prints a table and appends it to ``benchmarks/RESULTS.md``.

    .venv/bin/python benchmarks/avid_dynamics.py                       # ~4 min on 2 CPU cores
    .venv/bin/python benchmarks/avid_dynamics.py --variant self --lr 1e-3 --steps 128

Legend: B batch, D projection size.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from methods.data import ProceduralAV  # noqa: E402
from methods.registry import build_method  # noqa: E402
from orchestrator.config import resolve  # noqa: E402
from orchestrator.train import seed_everything  # noqa: E402

import results  # noqa: E402  benchmarks/results.py, next to this script

RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def mean_pairwise_cos(x_BD: torch.Tensor) -> float:
    x_BD = F.normalize(x_BD, dim=1)
    b = x_BD.shape[0]
    return float(((x_BD @ x_BD.T).sum() - b) / (b * b - b))


def train(lr: float, args: argparse.Namespace) -> dict[str, float]:
    cfg = resolve(overrides=[
        "preset=tiny", "method.name=avid", f"method.variant={args.variant}", f"optim.lr={lr}",
        f"data.paired_size={args.paired_size}", f"seed={args.seed}",
    ])
    seed_everything(cfg.seed)
    data = ProceduralAV(cfg.data)
    model = build_method(cfg.method_name, cfg.method, data.info())
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=args.weight_decay)
    loader = DataLoader(data.pool("paired"), batch_size=cfg.train.batch_size, shuffle=True, drop_last=True)
    losses: list[float] = []
    step, t0 = 0, time.time()
    model.train()
    while step < args.steps:
        for batch in loader:
            out = model(batch)
            opt.zero_grad()
            out.metrics["loss"].backward()
            opt.step()
            model.after_step(batch, out)
            losses.append(float(out.metrics["loss"]))
            step += 1
            if step >= args.steps:
                break
    with torch.no_grad():
        h_v = model.head_v(model.E_v(batch["image"]))
    tail = losses[-16:]
    return {
        "z_bar": float(model.z_bar), "loss_first": losses[0], "loss_end": sum(tail) / len(tail),
        "cos_v": mean_pairwise_cos(out.state["v"]), "cos_a": mean_pairwise_cos(out.state["a"]),
        "head_norm": float(h_v.norm(dim=1).mean()), "seconds": time.time() - t0,
        "epochs": step * cfg.train.batch_size / args.paired_size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-3, 1e-4, 1e-5])
    parser.add_argument("--variant", default="cross", choices=["self", "cross", "joint"])
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--paired-size", type=int, default=2048)
    parser.add_argument("--weight-decay", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-append", action="store_true", help="print only; leave RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    rows = []
    for lr in args.lr:
        r = train(lr, args)
        rows.append((lr, r))
        print(f"lr={lr:g}: " + ", ".join(f"{k}={v:.4g}" for k, v in r.items()), flush=True)

    epochs = rows[0][1]["epochs"]
    lines = [
        f"{dt.date.today().isoformat()}, {platform.machine()}, "
        f"{torch.get_num_threads()} threads, `benchmarks/avid_dynamics.py --variant {args.variant} "
        f"--steps {args.steps} --paired-size {args.paired_size}` ({epochs:.0f} epochs of {args.paired_size} pairs, "
        f"batch 128, Adam, weight decay {args.weight_decay:g}, seed {args.seed}).",
        "",
        "| lr | Z̄ | loss, step 1 | loss, last 16 steps | cos(z_v) | cos(z_a) | head output norm | s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for lr, r in rows:
        lines.append(
            f"| {lr:g} | {r['z_bar']:.3f} | {r['loss_first']:.2f} | {r['loss_end']:.2f} | {r['cos_v']:.3f} | "
            f"{r['cos_a']:.3f} | {r['head_norm']:.1f} | {r['seconds']:.0f} |"
        )
    text = "\n".join(lines)
    print(text)
    if not args.no_append:
        results.record(f"AVID's training dynamics at the tiny preset, by learning rate ({args.variant})", text)


if __name__ == "__main__":
    main()
