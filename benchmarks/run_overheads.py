"""What the extras every run does cost: MLflow system metrics and the exported encoders.

It runs ``avlab run`` on the tiny preset (one worker) in three settings, alternating, ``--repeats``
times each, in a temporary home:

- ``all on`` (the default): system metrics every 10 s and the encoders as safetensors and as
  MLflow models;
- ``no system metrics``: ``tracking.system_metrics=false``;
- ``no MLflow models``: ``tracking.log_model=false`` (the safetensors stay);

and reads back from MLflow each run's ``train_pairs_per_s`` (training throughput),
``export_time_s`` (the encoders) and ``trial``-independent wall time of the whole command. It
also prints the installed size of the packages these features added (safetensors, psutil,
nvidia-ml-py). Targets: system metrics cost under 2 % of training throughput.

    .venv/bin/python benchmarks/run_overheads.py            # ~4 min on 2 cores

It prints a table and appends it to ``benchmarks/RESULTS.md`` (``--no-append`` to skip).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import distribution
from pathlib import Path

import results  # benchmarks/results.py, next to this script

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "all on": [],
    "no system metrics": ["tracking.system_metrics=false"],
    "no MLflow models": ["tracking.log_model=false"],
}
RUN = ["--preset", "tiny", "train.epochs=2", "data.transfer_train_size=0", "data.transfer_test_size=0"]


def installed_mb(name: str) -> float:
    dist = distribution(name)
    return sum(os.path.getsize(dist.locate_file(f)) for f in dist.files or [] if dist.locate_file(f).exists()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-append", action="store_true", help="print only; leave RESULTS.md")
    args = parser.parse_args()
    from mlflow.tracking import MlflowClient

    avlab = str(Path(sys.executable).parent / "avlab")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    measured: dict[str, list[tuple[float, float, float]]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory(prefix="avlab-overheads-") as tmp:
        home = Path(tmp) / "home"
        for repeat in range(args.repeats):
            for name, overrides in SETTINGS.items():
                run_name = f"r{repeat}-{name.replace(' ', '-')}"
                t0 = time.perf_counter()
                out = subprocess.run([avlab, "run", *RUN, *overrides, f"tracking.run_name={run_name}",
                                      "--home", str(home)], capture_output=True, text=True, env=env, cwd=ROOT)
                wall = time.perf_counter() - t0
                if out.returncode != 0:
                    sys.exit(f"{name}: avlab run failed:\n{out.stderr[-3000:]}")
                client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
                run = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                         f"attributes.run_name = '{run_name}'")[0]
                m = run.data.metrics
                measured[name].append((m["train_pairs_per_s"], m.get("export_time_s", 0.0), wall))
                print(f"{name:>18}: {m['train_pairs_per_s']:.0f} pairs/s, export {m.get('export_time_s', 0):.2f} s, "
                      f"command {wall:.1f} s", flush=True)
    base = statistics.fmean(p for p, _, _ in measured["no system metrics"])
    lines = ["| setting | train pairs/s | vs no system metrics | export s | command s |", "| --- | --- | --- | --- | --- |"]
    for name, values in measured.items():
        pairs = statistics.fmean(p for p, _, _ in values)
        lines.append(f"| {name} | {pairs:.0f} | {pairs / base:.3f} | {statistics.fmean(e for _, e, _ in values):.2f} | "
                     f"{statistics.fmean(w for _, _, w in values):.1f} |")
    sizes = ", ".join(f"{n} {installed_mb(n):.1f} MB" for n in ("safetensors", "psutil", "nvidia-ml-py"))
    text = "\n".join(lines) + (f"\n\nInstalled size of the packages these features added: {sizes}.\n"
                               f"`avlab run {' '.join(RUN)}`, one worker, {args.repeats} runs per setting, "
                               f"alternating; commit {results.commit()}.")
    print(text)
    if not args.no_append:
        results.record("Run overheads: system metrics and exported encoders (tiny preset)", text)


if __name__ == "__main__":
    main()
