"""Sweep efficiency: where the wall time of the demo sweep goes.

It runs the exact command of ``make demo`` (``avlab sweep search_spaces/demo_learning.yaml``
with the demo's overrides, if any: 8 trials, 2 at once, 1 CPU each) in a temporary home, times the
whole command, and reads back from MLflow what every trial logged about its own time:

- ``launch_time_s``: for a multi-worker trial, its TorchTrainer launched -> the training module
  starts importing on the worker (Ray Train's controller, the worker process, the process group);
  for a single-worker trial, which trains in its own process, that process's start -> the trial
  function (0 when Tune reused a warm actor);
- ``import_time_s``: imports of the training code (0 in a warm actor);
- ``setup_time_s``: data pools, model, DDP wrapper, checkpoint restore;
- ``train_time_s``: the training epochs (steps and data loading);
- ``checkpoint_time_s``: per-epoch reports and checkpoints;
- ``eval_time_s``: the downstream evaluation;
- ``trial_time_s``: the whole trial function; what the phases above leave of it is the MLflow run
  creation and the trainer's teardown.

A trial's span is its MLflow run's (created -> ended), plus its process's start for a single-worker
trial (``avlab.launcher`` = ``trial``), whose process starts before the run.

The sweep's slot time is wall time × ``max_concurrent``; it is split into the driver's start
(process start -> the sweep's parent run), Ray's start-up (-> the first trial), the phases of every
trial, the gaps between trials (Tune scheduling the next), the last trial -> the parent run's end,
and the driver's end (report, plot, Ray's shutdown, the interpreter's exit). "Trial compute" is training plus evaluation: the work the user asked for.
Targets (issue 17): ≥ 85 % of the demo sweep's slot time inside trial compute, and ≤ 3 s per
reused single-worker trial outside training and evaluation (launch + import + setup + checkpoints +
the rest of the trial function), printed separately for trials in a fresh and in a reused actor.

    .venv/bin/python benchmarks/sweep_efficiency.py            # the demo sweep, ~5 min on 2 cores

``--space`` and ``--override`` run another sweep the same way. It prints a table and appends it
to ``benchmarks/RESULTS.md`` (``--no-append`` to skip).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import results  # benchmarks/results.py, next to this script

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("launch_time_s", "import_time_s", "setup_time_s", "train_time_s", "checkpoint_time_s", "eval_time_s")


def demo_overrides() -> list[str]:
    """The overrides of ``make demo``, read from the Makefile so the two never drift apart (none
    when the demo's search space carries its whole configuration)."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    match = re.search(r"^DEMO_OVERRIDES := (.*)$", text, re.MULTILINE)
    return match.group(1).split() if match else []


def run_sweep(space: str, overrides: list[str], home: Path, log: Path | None = None) -> tuple[float, float]:
    """Run ``avlab sweep`` as the user does; return when it started (epoch seconds) and its wall
    time in seconds. With ``log``, the command's output (its report at the end) is written there."""
    cmd = [str(ROOT / ".venv" / "bin" / "avlab"), "sweep", space, "--name", "bench", "--home", str(home), *overrides]
    started, t0 = time.time(), time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "AVLAB_HOME": str(home)})
    wall = time.perf_counter() - t0
    if log is not None:
        log.write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        sys.stderr.write(out.stdout[-3000:] + out.stderr[-5000:])
        raise SystemExit(f"avlab sweep failed with exit code {out.returncode}")
    return started, wall


def breakdown(home: Path, started: float, wall: float) -> tuple[dict[str, float], dict[str, float]]:
    """Slot-seconds per phase over the whole sweep, and facts about it."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("avlab-sweeps")
    parent = client.search_runs([exp.experiment_id], "tags.`avlab.kind` = 'sweep'")[0]
    trials = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    slots = int(parent.data.params["max_concurrent"])
    # A single-worker trial's process starts before its MLflow run: the trial begins there.
    first = min(r.info.start_time / 1e3 - (r.data.metrics.get("launch_time_s", 0.0)
                                          if r.data.tags.get("avlab.launcher") == "trial" else 0.0) for r in trials)
    last = max(r.info.end_time for r in trials) / 1e3
    parent_start = parent.info.start_time / 1e3
    out = dict.fromkeys(PHASES, 0.0)
    out["trial residual (MLflow run, trainer teardown)"] = 0.0  # what the trial's phases leave of it
    in_trials = 0.0
    for r in trials:
        m = r.data.metrics
        span = (r.info.end_time - r.info.start_time) / 1e3  # the trial's MLflow run: created -> ended
        if r.data.tags.get("avlab.launcher") == "trial":  # its process started before its MLflow run
            span += m.get("launch_time_s", 0.0)
        in_trials += span
        for k in PHASES:
            out[k] += m.get(k, 0.0)
        out["trial residual (MLflow run, trainer teardown)"] += span - sum(m.get(k, 0.0) for k in PHASES)
    # Parent run -> first trial: Ray and Tune start, the first trial actors (all slots wait).
    head = (first - parent_start) * slots
    # After the last trial: Tune's end, the trials' settling, the parent run's end.
    tail = (parent.info.end_time / 1e3 - last) * slots
    # Before the parent run exists: interpreter, imports, the checks of every trial's config.
    out["driver start (imports, config checks)"] = max(parent_start - started, 0.0) * slots
    # After the parent run has ended: the report and its plot, Ray's shutdown, the interpreter's exit.
    out["driver end (report, Ray shutdown, exit)"] = max(started + wall - parent.info.end_time / 1e3, 0.0) * slots
    out["Ray and Tune start (to the first trial)"] = head
    out["gaps between trials (scheduling)"] = (last - first) * slots - in_trials
    out["last trial -> parent run ended"] = tail
    # Per trial, what is not training or evaluation; a trial in a reused (warm) actor imported nothing.
    overhead = {"fresh": [], "reused": []}
    for r in trials:
        m = r.data.metrics
        span = (r.info.end_time - r.info.start_time) / 1e3
        if r.data.tags.get("avlab.launcher") == "trial":
            span += m.get("launch_time_s", 0.0)
        warm = m.get("launch_time_s", 1.0) == 0.0 and m.get("import_time_s", 1.0) == 0.0
        overhead["reused" if warm else "fresh"].append(span - m.get("train_time_s", 0.0) - m.get("eval_time_s", 0.0))
    facts = {"wall_s": wall, "slots": slots, "trials": len(trials), "overhead": overhead}
    return out, facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default="search_spaces/demo_learning.yaml")
    parser.add_argument("--override", action="append", default=None,
                        help="key=value for the sweep (default: the demo's overrides)")
    parser.add_argument("--no-append", action="store_true")
    parser.add_argument("--log", type=Path, default=None,
                        help="write the sweep's own output (Tune's table, the report) to this file")
    args = parser.parse_args()
    overrides = args.override if args.override is not None else demo_overrides()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        started, wall = run_sweep(args.space, overrides, home, args.log)
        phases, facts = breakdown(home, started, wall)
    total = facts["wall_s"] * facts["slots"]
    compute = phases["train_time_s"] + phases["eval_time_s"]
    rows = sorted(phases.items(), key=lambda kv: -kv[1])
    commit = results.commit()
    command = f"benchmarks/sweep_efficiency.py --space {args.space}" + (
        "" if args.override is None else "".join(f" --override {o}" for o in overrides))
    lines = [
        f"{dt.date.today().isoformat()}, {platform.machine()}, {os.cpu_count()} CPUs, commit {commit}, "
        f"`{command}`: {facts['trials']} trials, {facts['slots']} at once, wall {facts['wall_s']:.0f} s "
        f"= {total:.0f} slot-seconds.",
        "",
        "| phase | slot-seconds | share |",
        "| --- | --- | --- |",
        *[f"| {k.removesuffix('_s').replace('_', ' ')} | {v:.1f} | {v / total:.1%} |" for k, v in rows],
        "",
        f"Trial compute (training + evaluation): {compute:.0f} of {total:.0f} slot-seconds = "
        f"**{compute / total:.1%}** (target ≥ 85 %: {'met' if compute / total >= 0.85 else 'not met'}).",
        "",
        *[f"Per trial outside training and evaluation, {kind} actor ({len(v)} trials): "
          f"{sum(v) / len(v):.1f} s (min {min(v):.1f}, max {max(v):.1f})"
          for kind, v in facts["overhead"].items() if v],
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_append:
        results.record("Sweep efficiency (demo sweep)", text)


if __name__ == "__main__":
    main()
