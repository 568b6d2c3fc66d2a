"""Several small trials on one GPU: summed training throughput of k trials that share a GPU
(``resources.gpu: 1/k``, ``max_concurrent: k``) against one trial alone.

For each k it runs ``avlab sweep`` as a user does, on a search space of k seeds of one
configuration (the tiny preset by default, ``--preset small`` for the other), each trial holding
1/k of the GPU, all k at once, and reads back from MLflow every trial's ``train_pairs_per_s``.
The trials run side by side, so their sum is the GPU's throughput for k packed trials.

    .venv/bin/python benchmarks/packed_trials.py                  # GPU machine: k = 1, 2, 4, 8 (~10 min)
    .venv/bin/python benchmarks/packed_trials.py --packs 1 4 --preset small

Target (issue 17): 4 packed tiny trials reach ≥ 3 × the throughput of one. It needs a GPU and
stops with a message on a machine without one. It prints a table and appends it to
``benchmarks/RESULTS.md`` (``--no-append`` to skip).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import results  # benchmarks/results.py, next to this script

ROOT = Path(__file__).resolve().parents[1]


def sweep(k: int, preset: str, epochs: int, cpus: int, home: Path) -> list[float]:
    """Run k trials sharing one GPU; each trial's training throughput (pairs/s)."""
    space = home / f"packed{k}.yaml"
    space.write_text(
        f"base:\n  preset: {preset}\n  config:\n    eval: {{features: [h], linear: false, retrieval: false}}\n"
        f"grid:\n  train.epochs: [{epochs}]\nseeds: {k}\nmetric: image_h_knn_acc\nmode: max\n"
        f"resources: {{workers: 1, cpus_per_worker: {cpus}, gpu: {1 / k:.6g}}}\nmax_concurrent: {k}\n"
    )
    cmd = [str(ROOT / ".venv" / "bin" / "avlab"), "sweep", str(space), "--name", f"packed{k}", "--home", str(home)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "AVLAB_HOME": str(home)})
    if out.returncode != 0:
        sys.stderr.write(out.stdout[-3000:] + out.stderr[-5000:])
        raise SystemExit(f"avlab sweep failed with exit code {out.returncode}")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("avlab-sweeps")
    runs = client.search_runs([exp.experiment_id], f"tags.`avlab.sweep_name` = 'packed{k}' and tags.`avlab.kind` = 'trial'")
    return [r.data.metrics["train_pairs_per_s"] for r in runs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packs", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("packed_trials.py measures trials sharing a GPU: this machine has none")
    cpus = max(1, (os.cpu_count() or 1) // max(args.packs))
    rows, alone = [], None
    for k in args.packs:
        with tempfile.TemporaryDirectory() as tmp:
            rates = sweep(k, args.preset, args.epochs, cpus, Path(tmp))
        total = sum(rates)
        alone = alone or (total if k == 1 else None)
        rows.append((k, len(rates), total, min(rates), total / alone if alone else float("nan")))
    lines = [
        f"{dt.date.today().isoformat()}, {torch.cuda.get_device_name(0)}, {os.cpu_count()} CPUs, commit "
        f"{results.commit()}, `benchmarks/packed_trials.py --preset {args.preset} --epochs {args.epochs}` "
        f"({cpus} CPUs per trial):",
        "",
        "| trials per GPU | trials | summed pairs/s | slowest trial pairs/s | × one trial |",
        "| --- | --- | --- | --- | --- |",
        *[f"| {k} | {n} | {t:.0f} | {m:.0f} | {x:.2f} |" for k, n, t, m, x in rows],
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_append:
        results.record("Training throughput of several small trials packed on one GPU", text)


if __name__ == "__main__":
    main()
