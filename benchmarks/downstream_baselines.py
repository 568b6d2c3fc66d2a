"""Downstream numbers of three encoders on the procedural dataset, one command: `make baselines`.

(a) random initialisation (BMA-Memory, 0 epochs), (b) the tiny BMA-Memory run (`make demo`'s
config), (c) the supervised baseline trained with labels. Each is a real `avlab run`; the table
is read back from MLflow, printed, and appended to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

import results  # benchmarks/results.py, next to this script
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = [
    ("image_h_linear_acc", "image linear"),
    ("image_h_knn_acc", "image kNN"),
    ("sound_h_linear_acc", "sound linear"),
    ("sound_h_knn_acc", "sound kNN"),
    ("retrieval_s2i_rank1", "S→I Rank-1"),
    ("retrieval_s2i_rank5", "S→I Rank-5"),
    ("transfer_sound_h_linear_acc", "transfer sound linear"),
]
RUNS = [
    ("random init", ["train.epochs=0"]),
    ("BMA-Memory (tiny)", []),
    ("supervised", ["method.name=supervised", "train.epochs=10"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", default=str(ROOT / "avlab-runs" / "baselines"))
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    home = Path(args.home).resolve()
    avlab = str(Path(sys.executable).parent / "avlab")
    names = []
    for label, overrides in RUNS:
        name = f"baseline-{label.split()[0].lower()}-{time.strftime('%Y%m%d-%H%M%S')}"
        cmd = [avlab, "run", "--preset", "tiny", "--workers", str(args.workers), "--home", str(home),
               f"tracking.run_name={name}", "tracking.experiment=baselines", *overrides]
        print("$ avlab", " ".join(cmd[1:]), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        names.append((label, name, time.perf_counter() - t0))

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("baselines")
    lines = [
        "| encoder | " + " | ".join(c for _, c in COLUMNS) + " | wall time |",
        "| --- | " + " | ".join("---" for _ in COLUMNS) + " | --- |",
    ]
    for label, name, wall in names:
        run = client.search_runs([exp.experiment_id], f"tags.`avlab.run_name` = '{name}'")[0]
        m = run.data.metrics
        cells = " | ".join(f"{m.get(k, float('nan')):.3f}" for k, _ in COLUMNS)
        lines.append(f"| {label} | {cells} | {wall:.0f} s |")
    table = "\n".join(lines)
    print(table)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    results.record("Baselines at the tiny preset (`make baselines`)", (
        f"{time.strftime('%Y-%m-%d')}, {platform.node()} ({platform.machine()}, CPU), commit {commit}, "
        f"`make baselines` ({args.workers} workers; supervised: 10 epochs on the labelled paired pool).\n"
        f"Chance is 0.100. h = representation (h^v for images, h^s for sounds).\n\n{table}\n"
    ))


if __name__ == "__main__":
    main()
