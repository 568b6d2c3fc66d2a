"""A two-thread training step when another process holds a core: OpenMP's wait policy.

torch on Linux uses GNU OpenMP, whose threads spin at each barrier before they sleep. On idle
cores that is free; when another process holds one of the two cores (a second trial, a pytest
worker, anything on a workstation), one of the two threads is often preempted and its partner
spins through its time slice at every barrier. ``OMP_WAIT_POLICY=PASSIVE`` makes waiting threads
sleep, ``GOMP_SPINCOUNT`` shortens the spin. avlab sets neither: on idle cores both cost about a
quarter of the step's speed (benchmarks/RESULTS.md); a user who trains beside other work can set
them in the environment of the command that starts Ray, or give each trial one thread.

Each measurement is a fresh process (the policy is read when OpenMP starts) that trains the
tiny-preset BMA-Memory step (forward, backward, Adam) on one fixed batch of 128 pairs and prints
pairs/s; "beside a busy process" starts a pure-Python busy loop first and stops it after. The
settings take turns for ``--rounds`` rounds; one thread is measured once per round for scale.

    .venv/bin/python benchmarks/omp_contention.py            # ~3 min on 2 cores

It prints a table and appends it to ``benchmarks/RESULTS.md`` (``--no-append`` to skip).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import results  # benchmarks/results.py, next to this script

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"spin (OpenMP default)": {}, "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
            "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"}}


def step_worker(threads: int, steps: int) -> None:
    import time

    import torch
    from torch.utils.data import DataLoader

    sys.path.insert(0, str(ROOT))
    from methods.data import build_dataset
    from methods.registry import build_method
    from orchestrator.config import resolve
    from orchestrator.loaders import DeviceAugment, build_pretraining_data

    torch.set_num_threads(threads)
    cfg = resolve({}, overrides=["data.paired_size=256", "data.unpaired_sound_size=128",
                                 "data.unpaired_image_size=128"])
    torch.manual_seed(0)
    model = build_method(cfg.method_name, cfg.method, build_dataset(cfg.data).info())
    pools = build_pretraining_data(cfg, model)
    augment = DeviceAugment(cfg)
    loaders = {k: DataLoader(p, batch_size=128, drop_last=True) for k, p in pools.items()}
    batch = augment.paired_batch(next(iter(loaders["main"])), 0)
    for key, loader in loaders.items():
        if key != "main":
            batch.update(augment.unpaired_views(key, next(iter(loader)), 0))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        loss = model(batch).metrics["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(2):  # warm-up
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    print(128 * steps / (time.perf_counter() - t0))


def measure(env: dict[str, str], threads: int, steps: int, busy: bool) -> float:
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        out = subprocess.run([sys.executable, __file__, "--worker", str(threads), str(steps)], cwd=ROOT,
                             env={**os.environ, **env}, capture_output=True, text=True, check=True)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--no-append", action="store_true")
    parser.add_argument("--worker", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        step_worker(*args.worker)
        return
    rates: dict[tuple[str, bool], list[float]] = {}
    for r in range(args.rounds):
        for busy in (False, True):
            for name, env in SETTINGS.items():
                rates.setdefault((name, busy), []).append(measure(env, 2, args.steps, busy))
            rates.setdefault(("one thread", busy), []).append(measure({}, 1, args.steps, busy))
        print(f"round {r + 1}: " + ", ".join(f"{n}{' busy' if b else ''} {v[-1]:.0f}" for (n, b), v in rates.items()),
              flush=True)
    rows = ["| threads, wait policy | idle cores: pairs/s per round | median | beside a busy process: pairs/s "
            "per round | median |", "| --- | --- | --- | --- | --- |"]
    for name in (*SETTINGS, "one thread"):
        label = "1 thread" if name == "one thread" else f"2 threads, {name}"
        quiet, busy = rates[(name, False)], rates[(name, True)]
        rows.append(f"| {label} | {', '.join(f'{x:.0f}' for x in quiet)} | {statistics.median(quiet):.0f} | "
                    f"{', '.join(f'{x:.0f}' for x in busy)} | {statistics.median(busy):.0f} |")
    text = "\n".join([
        f"{dt.date.today().isoformat()}, {platform.machine()}, {os.cpu_count()} CPUs, commit {results.commit()}, "
        f"`benchmarks/omp_contention.py --rounds {args.rounds} --steps {args.steps}` (tiny-preset BMA-Memory step "
        f"on one batch of 128 pairs; each number a fresh process).", "", *rows])
    print(text)
    if not args.no_append:
        results.record("A two-thread step beside a busy process: OpenMP's wait policy", text)


if __name__ == "__main__":
    main()
