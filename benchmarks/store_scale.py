"""Store scale: avlab's read commands on stores of 1 000 and 5 000 runs, SQLite against PostgreSQL.

For each backend (a SQLite file; a throw-away PostgreSQL cluster on loopback, started with the
tests' helper, where its server binaries are installed) and each size N, it:

1. reproduces a cut-down claim for real (`avlab reproduce`, tiny preset, 2 configurations x 2
   seeds), which makes a real sweep, its parent run and 4 trial runs;
2. fills the store up to N trial runs with a sweep ``big`` whose parent is a copy of that sweep's
   and whose trials are copies of its trials (their parameters, tags and final metrics; seeds and
   identities renumbered), written through MLflow's client as avlab writes them;
3. times each command from its start to its exit (the interpreter's start and imports included),
   the median of three: ``avlab status`` and ``avlab report`` of ``big`` (N trials) and of the
   claim's sweep (4 trials in a store of N), and ``avlab reproduce --finished-only`` of the claim;
4. with ``--ui``, serves the store with ``avlab ui`` and opens ``big``'s experiment in headless
   Chromium (Playwright), timing the navigation until the runs table shows the sweep's row.

Targets (the issue on tracking at scale): ``status`` and ``report`` at most 2 s at 1 000 runs and
5 s at 5 000, import time included.

    .venv/bin/python benchmarks/store_scale.py [--sizes 1000 5000] [--ui]

It prints a table and records it in ``benchmarks/RESULTS.md`` (``--no-record`` to skip).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import results  # benchmarks/results.py, next to this script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
TITLE = "Store scale: status, report and reproduce on stores of 1 000 and 5 000 runs"
AVLAB = str(ROOT / ".venv" / "bin" / "avlab")
TINY = ["train.epochs=1", "train.batch_size=64", "data.paired_size=128", "data.unpaired_sound_size=64",
        "data.unpaired_image_size=64", "data.train_size=100", "data.test_size=60", "data.val_size=60",
        "data.transfer_train_size=0", "data.transfer_test_size=0"]


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out["RAY_AUTH_MODE"] = "disabled"
    return out


def avlab(args: list[str], home: Path, uri: str, cwd: Path) -> float:
    t0 = time.perf_counter()
    out = subprocess.run([AVLAB, *args, "--home", str(home), "--tracking-uri", uri], cwd=cwd, env=env(),
                         capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"avlab {' '.join(args)} failed ({out.returncode}):\n{out.stdout[-2000:]}{out.stderr[-3000:]}")
    return seconds


def write_claim(folder: Path) -> Path:
    from sweeps import write_mem_claim

    return write_mem_claim(folder)


def fill(uri: str, home: Path, n: int) -> float:
    """A sweep ``big`` of ``n`` trial runs copied from the store's one real sweep; seconds taken."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("avlab-sweeps")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`avlab.kind` = 'sweep'")
    trials = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    t0 = time.perf_counter()

    def copy(run, tags: dict[str, str], params: dict[str, str]) -> str:
        new = client.create_run(exp.experiment_id, run_name=tags.get("mlflow.runName", "big"),
                                tags={k: v for k, v in tags.items() if k != "mlflow.runName"})
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):
            client.log_batch(new.info.run_id, params=items[i : i + 100])
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, 0) for k, v in run.data.metrics.items()]
        for i in range(0, len(metrics), 500):
            client.log_batch(new.info.run_id, metrics=metrics[i : i + 500])
        client.set_terminated(new.info.run_id, "FINISHED")
        return new.info.run_id

    parent_tags = {**parent.data.tags, "avlab.sweep_name": "big", "mlflow.runName": "big"}
    parent_id = copy(parent, parent_tags, {**parent.data.params, "num_trials": str(n)})
    for i in range(n):
        run = trials[i % len(trials)]
        label = f"{run.data.tags.get('avlab.config_label', 'base')}"
        tags = {**run.data.tags, "mlflow.parentRunId": parent_id, "avlab.sweep_name": "big", "avlab.seed": str(i),
                "avlab.run_identity": f"big-{i}", "mlflow.runName": f"big/{label}/seed{i}"}
        copy(run, tags, {**run.data.params, "seed": str(i)})
    return time.perf_counter() - t0


def ui_time(home: Path, uri: str, cwd: Path) -> float | None:
    """Seconds from opening ``big``'s experiment in headless Chromium to the sweep's row in its runs table."""
    import shutil

    from mlflow.tracking import MlflowClient

    import faults

    chromium = shutil.which("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    if not chromium:
        return None
    port = faults.free_port()
    exp = MlflowClient(uri).get_experiment_by_name("avlab-sweeps").experiment_id
    server = subprocess.Popen([AVLAB, "ui", "--home", str(home), "--tracking-uri", uri, "--port", str(port)], cwd=cwd,
                              env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        for line in server.stdout:
            if "MLflow UI at" in line:
                break
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            url = f"http://127.0.0.1:{port}/#/experiments/{exp}?workflowType=machine_learning"
            page.goto(f"http://127.0.0.1:{port}/")  # the app's code loaded once, outside the timing
            page.wait_for_load_state("load")
            t0 = time.perf_counter()
            page.goto(url)
            page.get_by_role("link", name="big", exact=True).wait_for(timeout=120_000)  # the sweep's row
            seconds = time.perf_counter() - t0
            browser.close()
        return seconds
    finally:
        server.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=30)


def measure(backend: str, uri: str, n: int, work: Path, with_ui: bool) -> dict[str, float | None]:
    home = work / f"{backend}-{n}"
    claim = write_claim(work)
    avlab(["reproduce", str(claim), "--seeds", "2", *TINY], home, uri, work)
    out: dict[str, float | None] = {"fill": fill(uri, home, n - 4)}
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("avlab-sweeps")
    small = next(r.data.tags["avlab.sweep_name"] for r in client.search_runs([exp.experiment_id], "tags.`avlab.kind` = 'sweep'")
                 if r.data.tags["avlab.sweep_name"] != "big")
    commands = {
        "status big": ["status", "big"],
        "report big": ["report", "big", "--format", "json"],
        "status small": ["status", small],
        "report small": ["report", small, "--format", "json"],
        "reproduce --finished-only": ["reproduce", str(claim), "--seeds", "2", "--finished-only", *TINY],
    }
    for name, args in commands.items():
        out[name] = statistics.median(avlab(args, home, uri, work) for _ in range(3))
    out["ui"] = ui_time(home, uri, work) if with_ui else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--ui", action="store_true", help="also time the MLflow UI's runs page (Chromium)")
    parser.add_argument("--no-sqlite", action="store_true")
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    import postgres  # tests/postgres.py: the throw-away cluster

    rows = []
    with tempfile.TemporaryDirectory(prefix="avlab-store-") as tmp:
        work = Path(tmp)
        for n in args.sizes:
            if not args.no_sqlite:
                uri = f"sqlite:///{work / f'sqlite-{n}.db'}"
                rows.append(("SQLite", n, measure("sqlite", uri, n, work, args.ui)))
                print(rows[-1], flush=True)
            if not args.no_postgres and postgres.binaries():
                with postgres.running() as cluster:
                    rows.append(("PostgreSQL", n, measure("postgres", cluster.create(f"s{n}"), n, work, args.ui)))
                print(rows[-1], flush=True)
    names = ["status big", "report big", "status small", "report small", "reproduce --finished-only", "ui"]
    table = ["| store | trial runs | " + " | ".join(f"`{n}` (s)" if n != "ui" else "UI runs page (s)" for n in names)
             + " | filling it (s) |", "| --- | --- | " + " | ".join("---" for _ in names) + " | --- |"]
    for backend, n, out in rows:
        cells = ["-" if out[k] is None else f"{out[k]:.2f}" for k in names]
        table.append(f"| {backend} | {n} | " + " | ".join(cells) + f" | {out['fill']:.0f} |")
    when = dt.date.today().isoformat()
    header = (f"Measured {when} on {platform.machine()}, {os.cpu_count()} CPUs, commit {results.commit()}: "
              f"`benchmarks/store_scale.py --sizes {' '.join(map(str, args.sizes))}{' --ui' if args.ui else ''}` "
              "(each command's wall time from its start, the median of three; `big` is a sweep of all the store's "
              "trial runs, `small` the claim's sweep of 4 trials in the same store)")
    text = "\n".join([header, "", *table])
    print(text)
    if not args.no_record:
        results.record(TITLE, text)


if __name__ == "__main__":
    main()
