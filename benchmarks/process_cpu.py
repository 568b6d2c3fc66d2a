"""Where a command's CPU time goes: run it, sample /proc every --interval seconds, and sum the CPU
time (user + system) of every process it starts, by kind (avlab drivers, Tune trial processes,
Ray Train workers and controllers, Ray's own daemons, pytest workers, ...).

    .venv/bin/python benchmarks/process_cpu.py -- .venv/bin/avlab sweep search_spaces/demo_learning.yaml
    .venv/bin/python benchmarks/process_cpu.py -- .venv/bin/python -m pytest -n 2 --dist loadfile

A process counts from the first sample that sees it as a descendant of the command (Ray's
workers descend from the raylet, which descends from the driver); it keeps counting after its
parent dies. What a process used after the last sample that saw it is lost (under one interval).
Linux only. Prints a table; nothing is written (copy it into RESULTS.md with its context).
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")
# (substring of the command line, kind), first match wins; Ray renames its workers "ray::<what>".
KINDS = [
    ("raylet/raylet", "Ray raylet"), ("gcs_server", "Ray GCS"), ("dashboard/agent.py", "Ray agents"),
    ("ray::DashboardAgent", "Ray agents"), ("ray::RuntimeEnvAgent", "Ray agents"), ("runtime_env/agent", "Ray agents"),
    ("dashboard/dashboard.py", "Ray dashboard head"), ("ray-dashboard-", "Ray dashboard head"),
    ("log_monitor", "Ray log monitor"), ("autoscaler/_private/monitor.py", "Ray autoscaler monitor"),
    ("ray::RayTrainWorker", "Ray Train workers"), ("ray::TrainController", "Ray Train controller"),
    ("ray::SynchronizationActor", "Ray Train helper actors"), ("ray::DatasetManager", "Ray Train helper actors"),
    ("ray::_AutoscalingCoordinatorActor", "Ray Train helper actors"),
    ("ray::ImplicitFunc", "Tune trial processes"), ("ray::run_trial", "Tune trial processes"),
    ("ray::avlab-run", "avlab run tasks"), ("ray::IDLE", "Ray idle workers"), ("ray::", "other Ray workers"),
    ("default_worker.py", "other Ray workers"), ("bin/avlab", "avlab commands"), ("orchestrator.cli", "avlab commands"),
    ("execnet", "pytest workers"), ("-c import sys;exec(eval(sys.stdin", "pytest workers"), ("pytest", "pytest"),
    ("mlflow", "MLflow server"), ("huey", "MLflow server"), ("uvicorn", "MLflow server"), ("chromium", "browser"),
]


def kind(cmd: str) -> str:
    return next((name for pattern, name in KINDS if pattern in cmd), "other: " + cmd[:50])


def table() -> dict[int, tuple[int, float, str]]:
    """pid -> (parent pid, CPU seconds, command line)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK, cmd)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples (0.5)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ...")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    if not (args.interval > 0):
        parser.error("--interval: must be > 0")
    t0 = time.perf_counter()
    proc = subprocess.Popen(command)
    ours: dict[int, tuple[float, str]] = {}  # pid -> (CPU seconds, kind)
    while True:
        done = proc.poll() is not None
        now = table()
        members = set(ours) | {proc.pid}
        grew = True
        while grew:  # descendants of the command, transitively
            new = {pid for pid, (parent, _, _) in now.items() if parent in members} - members
            members |= new
            grew = bool(new)
        for pid in members & set(now):
            _, cpu, cmd = now[pid]
            previous = ours.get(pid)
            name = kind(cmd)
            if previous and name.startswith(("other", "other Ray")) and not previous[1].startswith("other"):
                name = previous[1]  # a worker keeps the name it had while it worked
            ours[pid] = (cpu, name)
        if done:
            break
        time.sleep(args.interval)
    wall = time.perf_counter() - t0
    total, count = collections.Counter(), collections.Counter()
    for cpu, name in ours.values():
        total[name] += cpu
        count[name] += 1
    cpu = sum(total.values())
    print(f"\nwall {wall:.1f} s, CPU {cpu:.1f} s ({cpu / wall:.2f} cores on average), exit {proc.returncode}\n")
    print("| kind | processes | CPU s | share |\n| --- | --- | --- | --- |")
    for name, seconds in total.most_common():
        print(f"| {name} | {count[name]} | {seconds:.1f} | {seconds / cpu:.1%} |")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
