"""Sweep scale: whether avlab's own cost per trial stays flat over a long sweep.

It runs ``avlab sweep`` on a search space of N trials (default 200)
so small that training is a small part of each (20 memory sizes x 10 seeds, tiny preset, one epoch of two steps, probes on
40 / 20 / 20 items), 2 at a time, in a temporary home, and samples the driver's memory (the
``avlab`` process's resident set, and its whole process tree's) every 2 s. From MLflow it reads
every trial's span (run created -> ended, with its process's start for a fresh actor) and what it
logged, in the order the trials started, and compares the first ten trials with the last ten:

- outside training: the trial's span less ``train_time_s``;
- outside training and evaluation: less ``eval_time_s`` too;
- the slot's gap: the previous trial on that slot ended -> this one started (Tune scheduling).

Target (the issue on tracking at scale): per-trial overhead within 20 % from the first ten trials
(fresh actors aside) to the last ten; the driver's memory not growing with the trials.

    .venv/bin/python benchmarks/sweep_scale.py              # 200 trials, ~20 min on 2 cores

It prints a table and records it in ``benchmarks/RESULTS.md`` (``--no-record`` to skip).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psutil

import results  # benchmarks/results.py, next to this script

ROOT = Path(__file__).resolve().parents[1]
TITLE = "Sweep scale: per-trial overhead and driver memory over a 200-trial sweep"
RUN = ["train.epochs=1", "train.batch_size=32", "data.paired_size=64", "data.unpaired_sound_size=0",
       "data.unpaired_image_size=0", "data.train_size=40", "data.test_size=20", "data.val_size=20",
       "data.transfer_train_size=0", "data.transfer_test_size=0"]


def space_text(trials: int) -> str:
    """``trials`` trials: memory sizes 16, 17, ... (the same cost), 10 seeds each (fewer below 10 trials)."""
    seeds = min(10, trials)
    sizes = [16 + i for i in range(max(trials // seeds, 1))]
    return (f"description: 'sweep scale: {len(sizes)} memory sizes x {seeds} seeds'\n"
            "base:\n  preset: tiny\n"
            f"grid:\n  method.memory_size: {sizes}\n"
            f"seeds: {seeds}\nmetric: image_h_linear_acc\nmode: max\n"
            "resources: {workers: 1, cpus_per_worker: 1}\nmax_concurrent: 2\n")


def sample_memory(proc: subprocess.Popen, samples: list[tuple[float, float, float]], stop: threading.Event) -> None:
    """(seconds since start, driver RSS MiB, process tree RSS MiB) every 2 s until ``stop``."""
    t0 = time.monotonic()
    while not stop.is_set():
        try:
            driver = psutil.Process(proc.pid)
            own = driver.memory_info().rss
            tree = own + sum(c.memory_info().rss for c in driver.children(recursive=True) if c.is_running())
            samples.append((time.monotonic() - t0, own / 2**20, tree / 2**20))
        except psutil.Error:
            pass
        stop.wait(2.0)


def trial_rows(home: Path) -> list[dict[str, float]]:
    """Each trial's start, end, span and logged phases, in the order they started."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("avlab-sweeps")
    runs = client.search_runs([exp.experiment_id], "tags.`avlab.kind` = 'trial'", max_results=50_000)
    rows = []
    for r in runs:
        m = r.data.metrics
        launch = m.get("launch_time_s", 0.0) if r.data.tags.get("avlab.launcher") == "trial" else 0.0
        start = r.info.start_time / 1e3 - launch
        end = r.info.end_time / 1e3
        rows.append({"start": start, "end": end, "span": end - start, "train": m.get("train_time_s", 0.0),
                     "eval": m.get("eval_time_s", 0.0), "fresh": launch > 0.0 or m.get("import_time_s", 0.0) > 0.0})
    rows.sort(key=lambda row: row["start"])
    # The gap on each slot: the latest end among earlier trials that had ended when this one began.
    ends: list[float] = []
    for row in rows:
        done = [e for e in ends if e <= row["start"]]
        row["gap"] = row["start"] - max(done) if done else 0.0
        if done:
            ends.remove(max(done))
        ends.append(row["end"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="avlab-scale-") as tmp:
        home = Path(tmp) / "home"
        space = Path(tmp) / "scale.yaml"
        space.write_text(space_text(args.trials))
        cmd = [str(ROOT / ".venv" / "bin" / "avlab"), "sweep", str(space), "--name", "scale", "--home", str(home), *RUN]
        samples: list[tuple[float, float, float]] = []
        stop = threading.Event()
        t0 = time.perf_counter()
        log = Path(tmp) / "sweep.log"
        with log.open("w") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, "AVLAB_HOME": str(home)})
            sampler = threading.Thread(target=sample_memory, args=(proc, samples, stop), daemon=True)
            sampler.start()
            code = proc.wait()
        stop.set()
        wall = time.perf_counter() - t0
        if code != 0:
            raise SystemExit(f"avlab sweep failed with exit code {code}:\n{log.read_text()[-4000:]}")
        rows = trial_rows(home)
    warm = [r for r in rows if not r["fresh"]]
    first, last = warm[:10], warm[-10:]

    def mean(group, key) -> float:
        return statistics.fmean(key(r) for r in group)

    measures = {
        "span (s)": lambda r: r["span"],
        "outside training (s)": lambda r: r["span"] - r["train"],
        "outside training and evaluation (s)": lambda r: r["span"] - r["train"] - r["eval"],
        "gap before it on its slot (s)": lambda r: r["gap"],
    }
    table = ["| per trial (warm actors) | trials 1-10 | last 10 | last / first |", "| --- | --- | --- | --- |"]
    for name, key in measures.items():
        a, b = mean(first, key), mean(last, key)
        table.append(f"| {name} | {a:.2f} | {b:.2f} | {b / a:.2f} |" if a > 0 else f"| {name} | {a:.2f} | {b:.2f} | - |")
    early = [s for s in samples if s[0] <= 120]
    late = samples[-max(len(samples) // 10, 1):]
    memory = (f"Driver memory (RSS of the `avlab` process): {statistics.fmean(s[1] for s in early):.0f} MiB in the first "
              f"2 minutes, {statistics.fmean(s[1] for s in late):.0f} MiB over the last tenth of the sweep, peak "
              f"{max(s[1] for s in samples):.0f} MiB; its whole process tree (Ray, trial actors) "
              f"{statistics.fmean(s[2] for s in early):.0f} -> {statistics.fmean(s[2] for s in late):.0f} MiB.")
    when = dt.date.today().isoformat()
    header = (f"Measured {when} on {platform.machine()}, {os.cpu_count()} CPUs, commit {results.commit()}: "
              f"`benchmarks/sweep_scale.py --trials {args.trials}` ({len(rows)} trials, {len(rows) - len(warm)} in "
              f"fresh actors, 2 at a time, wall {wall:.0f} s)")
    text = "\n".join([header, "", *table, "", memory])
    print(text)
    if not args.no_record:
        results.record(TITLE, text)


if __name__ == "__main__":
    main()
