"""Finished sweeps' configurations side by side, each against a reference row, paired by seed.

For every configuration of the named sweeps (their trials' labels; a label that two sweeps share
is an error) and every metric: the mean over seeds with its 95 % t-interval, and the paired
difference from ``--reference`` over the seeds both finished (mean, 95 % interval, two-sided
paired-t p: the test ``avlab reproduce`` decides claims with). Validation metrics (``val_*``) are
what a choice is made on; test metrics are reported beside them, never chosen on.

    .venv/bin/python benchmarks/paired_rows.py cma-criterion avid-refs --home /path/to/home \\
        --reference cross_avid --metrics val_image_h_linear_acc,image_h_linear_acc
    ... --record "AVID+CMA against Cross-AVID at the small preset: the paper's criterion, the released one and avlab's modification"
"""

from __future__ import annotations

import argparse
import math
import platform
import subprocess
from datetime import date
from pathlib import Path

from mlflow.tracking import MlflowClient

from orchestrator.claims import paired
from orchestrator.report import mean_ci95
from orchestrator.reproduce import seed_values

import results  # benchmarks/results.py, next to this script

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def rows(client: MlflowClient, sweeps: list[str], metric: str) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for sweep in sweeps:
        for label, by_seed in seed_values(client, sweep, metric).items():
            if label in out:
                raise SystemExit(f"paired_rows: configuration {label!r} is in more than one of {sweeps}")
            out[label] = by_seed
    return out


def table(client: MlflowClient, sweeps: list[str], reference: str, metrics: list[str]) -> str:
    values = {m: rows(client, sweeps, m) for m in metrics}
    labels = sorted({label for v in values.values() for label in v}, key=lambda x: (x != reference, x))
    if reference not in labels:
        raise SystemExit(f"paired_rows: --reference {reference!r} is not a configuration of {sweeps}: {labels}")
    head = ["configuration", "seeds"] + [f"{m} (mean ± 95 % CI; − {reference}, p)" for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for label in labels:
        seeds = sorted({s for m in metrics for s in values[m].get(label, {})})
        cells = [label, " / ".join(map(str, seeds))]
        for m in metrics:
            by_seed = values[m].get(label, {})
            if not by_seed:
                cells.append("–")
                continue
            mean, ci = mean_ci95([by_seed[s] for s in sorted(by_seed)])
            cell = f"{mean:.3f} ± {ci:.3f}" if len(by_seed) > 1 and math.isfinite(ci) else f"{mean:.3f}"
            if label != reference:
                diff, half, p, n, _ = paired(by_seed, values[m].get(reference, {}))
                if n >= 2:
                    cell += f"; {diff:+.3f} ± {half:.3f}, p {p:.3f}"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", nargs="+")
    parser.add_argument("--home", required=True)
    parser.add_argument("--reference", required=True, help="the configuration every other is compared with")
    parser.add_argument("--metrics", required=True, help="comma-separated metric names")
    parser.add_argument("--record", metavar="TITLE", help="append the table to benchmarks/RESULTS.md under TITLE")
    args = parser.parse_args()
    client = MlflowClient(f"sqlite:///{Path(args.home).resolve() / 'mlflow.db'}")
    text = table(client, args.sweeps, args.reference, args.metrics.split(","))
    print(text)
    if args.record:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=RESULTS.parent).stdout.strip()
        results.record(args.record, f"{date.today()}, {platform.machine()}, commit {commit}, "
                       f"`benchmarks/paired_rows.py {' '.join(args.sweeps)} --reference {args.reference} "
                       f"--metrics {args.metrics}`\n\n{text}\n")


if __name__ == "__main__":
    main()
