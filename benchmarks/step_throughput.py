"""Training throughput of ``avlab run`` against a plain PyTorch loop, and DDP scaling.

avlab's number comes from the exact code path a user runs: ``avlab run`` (one worker: the loop of
``orchestrator/train.py`` in one Ray task; more workers: a Ray Train ``TorchTrainer``) in a temporary home, reading
the ``pairs_per_s`` that every epoch logs to MLflow. The plain loop is what one writes by hand
around the same model class, the same data pools (procedural pairs plus the two unpaired pools
with their augmented views), the same batch size and optimiser: shuffled ``DataLoader``s,
forward, ``zero_grad``, backward, ``step``; nothing else. It runs in its own process with the
same number of threads as the Ray worker. Both skip their first epoch (warm-up) and report the
median over the rest; the two take turns for ``--rounds`` rounds.

Taking turns compares minutes that differ: on a shared or throttled machine the same loop
varies by ± 20 % from one minute to the next. ``--concurrent`` (``--threads`` at most half the
CPUs) runs the two at the same time instead, each on its own core(s), and compares avlab's steady
epochs with the plain loop's epochs of the same minutes.

Then DDP on CPU (gloo): ``avlab run`` with 1 worker × 1 thread and 2 workers × 1 thread; the
scaling efficiency is 2-worker pairs/s over twice the 1-worker pairs/s.

    .venv/bin/python benchmarks/step_throughput.py              # tiny preset, ~10 min on 2 cores
    .venv/bin/python benchmarks/step_throughput.py --threads 1 --concurrent --skip-ddp   # side by side
    .venv/bin/python benchmarks/step_throughput.py --preset paper --gpu   # on a GPU machine

Target (issue 17): avlab ≥ 0.98 × the plain loop. It prints the tables and appends them to
``benchmarks/RESULTS.md`` (``--no-append`` to skip).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
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
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# A short evaluation: the benchmark reads training throughput only.
SMALL_EVAL = ["data.train_size=100", "data.test_size=100", "data.transfer_train_size=0",
              "data.transfer_test_size=0", "eval.features=[h]", "eval.linear=false", "eval.retrieval=false"]


def avlab_run(overrides: list[str], home: Path, name: str, windows: bool = False) -> list:
    """``avlab run`` as the user runs it; the per-epoch pairs/s it logged, in epoch order (with
    ``windows``: (start, end, pairs/s) per epoch, in seconds since the epoch of time)."""
    cmd = [str(ROOT / ".venv" / "bin" / "avlab"), "run", "--home", str(home), f"tracking.run_name={name}",
           *overrides]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stdout[-2000:] + out.stderr[-4000:])
        raise SystemExit(f"avlab run failed (exit {out.returncode})")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("avlab")
    run = client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'")[0]
    history = client.get_metric_history(run.info.run_id, "pairs_per_s")
    if not windows:
        return [m.value for m in sorted(history, key=lambda m: m.step)]
    # Each epoch's wall-clock window: it is logged when it ends, epoch_time_s after it began.
    took = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "epoch_time_s")}
    return [(m.timestamp / 1000 - took[m.step], m.timestamp / 1000, m.value)
            for m in sorted(history, key=lambda m: m.step)]


def plain_run(overrides: list[str], threads: int, gpu: bool) -> list[float]:
    """The plain loop in a fresh process (``--plain-worker``), like a Ray worker."""
    cmd = [sys.executable, __file__, "--plain-worker", json.dumps({"overrides": overrides, "threads": threads,
                                                                     "gpu": gpu})]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-4000:])
        raise SystemExit("plain loop failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def plain_worker(spec: dict) -> None:
    """A hand-written training loop over the same model, data and batch as ``avlab run``."""
    import torch
    from torch.utils.data import DataLoader

    from methods.registry import build_method
    from orchestrator.config import resolve
    from orchestrator.loaders import DeviceAugment, build_pretraining_data
    from methods.data import build_dataset

    torch.set_num_threads(spec["threads"])
    cfg = resolve({}, overrides=spec["overrides"])
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if spec["gpu"] else "cpu")
    model = build_method(cfg.method_name, cfg.method, build_dataset(cfg.data).info()).to(device)
    pools = build_pretraining_data(cfg, model)
    augment = DeviceAugment(cfg)
    batch = cfg.train.batch_size
    loaders = {k: DataLoader(p, batch_size=batch if k == "main" else (cfg.train.unpaired_batch_size or batch),
                             shuffle=True, drop_last=True, num_workers=cfg.train.data_workers,
                             persistent_workers=cfg.train.data_workers > 0, pin_memory=spec["gpu"])
               for k, p in pools.items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)

    def cycle(loader):
        while True:
            yield from loader

    unpaired = {k: cycle(v) for k, v in loaders.items() if k != "main"}
    steps = min(len(loaders["main"]), cfg.train.max_steps_per_epoch or len(loaders["main"]))
    rates = []
    for _ in range(cfg.train.epochs):
        model.train()
        if spec["gpu"]:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for step, b in enumerate(loaders["main"]):
            if step >= steps:
                break
            b = augment.paired_batch({k: v.to(device, non_blocking=True) for k, v in b.items()}, 0)
            for key, it in unpaired.items():
                raw = {k: v.to(device, non_blocking=True) for k, v in next(it).items()}
                b.update(augment.unpaired_views(key, raw, 0))
            loss = model(b).metrics["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if spec["gpu"]:
            torch.cuda.synchronize()
        rates.append(steps * batch / (time.perf_counter() - t0))
        if spec.get("stream"):  # (start, end, pairs/s) of each epoch as it ends
            end = time.time()
            print(json.dumps([end - (time.perf_counter() - t0), end, rates[-1]]), flush=True)
    print(json.dumps(rates))


def concurrent_round(single: list[str], args: argparse.Namespace, home: Path, name: str) -> tuple[float, float]:
    """avlab and the plain loop at the same time, one thread each on their own core, compared
    over the same wall-clock window: the plain loop trains (epochs of the same length) from
    before avlab's first epoch until avlab ends, and only its epochs inside avlab's steady window
    (avlab's epochs after the first) count. Both then see the same machine at the same moment,
    which taking turns cannot promise on a machine whose speed drifts between minutes. Ray's own
    processes run on either core, so they slow both loops (a sequential round charges them to
    avlab alone)."""
    longer = [o for o in single if not o.startswith("train.epochs=")] + [f"train.epochs={args.epochs * 6 + 20}"]
    spec = {"overrides": longer, "threads": args.threads, "gpu": False, "stream": True}
    plain = subprocess.Popen([sys.executable, __file__, "--plain-worker", json.dumps(spec)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        windows = avlab_run(single, home, name, windows=True)
    finally:
        plain.terminate()
        out, _ = plain.communicate(timeout=60)
    epochs = [json.loads(line) for line in out.splitlines() if line.startswith("[")]
    (start, _, _), (_, end, _) = windows[1], windows[-1]
    inside = [rate for t0, t1, rate in epochs[1:] if t0 >= start - 1.0 and t1 <= end + 1.0]
    if not inside:
        raise SystemExit(f"the plain loop had no epoch inside avlab's window ({len(epochs)} epochs): "
                         "raise --epochs or lower --steps")
    return statistics.median(rate for *_, rate in windows[1:]), statistics.median(inside)


def steady(rates: list[float]) -> float:
    """Median pairs/s without the first (warm-up) epoch."""
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL), plain loop on cuda")
    parser.add_argument("--steps", type=int, default=24, help="training steps per epoch")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="avlab and plain take turns this often")
    parser.add_argument("--concurrent", action="store_true",
                        help="run avlab and the plain loop at the same time (2 × --threads ≤ CPUs), compared "
                             "over the same minutes")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--override", action="append", default=[], help="key=value for both loops, e.g. train.data_workers=1")
    parser.add_argument("--skip-ddp", action="store_true")
    parser.add_argument("--no-append", action="store_true")
    parser.add_argument("--plain-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_worker:
        plain_worker(json.loads(args.plain_worker))
        return

    base = [f"preset={args.preset}", f"train.epochs={args.epochs}", f"train.max_steps_per_epoch={args.steps}",
            *SMALL_EVAL, *args.override]
    if args.gpu:
        base += ["resources.gpu=true"]
    single = [*base, "resources.workers=1", f"resources.cpus_per_worker={args.threads}"]
    if args.concurrent and (args.gpu or 2 * args.threads > (os.cpu_count() or 1)):
        parser.error(f"--concurrent: needs 2 × --threads ({2 * args.threads}) CPUs, this machine has "
                     f"{os.cpu_count()}, and no --gpu")
    avlab, plain = [], []
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        for r in range(args.rounds):
            if args.concurrent:
                a, b = concurrent_round(single, args, home, f"single-{r}")
                avlab.append(a)
                plain.append(b)
            else:
                avlab.append(steady(avlab_run(single, home, f"single-{r}")))
                plain.append(steady(plain_run(single, args.threads, args.gpu)))
            print(f"round {r + 1}: avlab {avlab[-1]:.0f} pairs/s, plain {plain[-1]:.0f} pairs/s", flush=True)
        ddp: dict[int, float] = {}
        if not args.skip_ddp:
            for workers in (1, 2):
                rates = avlab_run([*base, f"resources.workers={workers}", "resources.cpus_per_worker=1"],
                                  home, f"ddp-{workers}")
                ddp[workers] = steady(rates)
                print(f"DDP {workers} worker(s): {ddp[workers]:.0f} pairs/s", flush=True)

    ratio = statistics.median(avlab) / statistics.median(plain)
    commit = results.commit()
    device = "1 GPU per worker" if args.gpu else f"{os.cpu_count()} CPUs"
    command = (f"benchmarks/step_throughput.py --preset {args.preset}{' --gpu' if args.gpu else ''} "
               f"--steps {args.steps} --epochs {args.epochs} --rounds {args.rounds} --threads {args.threads}"
               + (" --concurrent" if args.concurrent else "")
               + "".join(f" --override {o}" for o in args.override) + (" --skip-ddp" if args.skip_ddp else ""))
    lines = [
        f"{dt.date.today().isoformat()}, {platform.machine()}, {device}, commit {commit}, `{command}` "
        f"(BMA, {args.preset} preset; median pairs/s of epochs 2-{args.epochs}, {args.steps} steps each"
        + ("; the plain loop at the same time, its epochs inside that window" if args.concurrent else "") + ").",
        "",
        "| loop | threads | pairs/s per round | median | ratio |",
        "| --- | --- | --- | --- | --- |",
        f"| plain PyTorch | {args.threads} | {', '.join(f'{x:.0f}' for x in plain)} | "
        f"{statistics.median(plain):.0f} | 1.000 |",
        f"| avlab run (1 worker: one Ray task) | {args.threads} | {', '.join(f'{x:.0f}' for x in avlab)} | "
        f"{statistics.median(avlab):.0f} | {ratio:.3f} |",
        "",
        f"Target avlab ≥ 0.98 × plain: {'met' if ratio >= 0.98 else 'not met'} ({ratio:.3f}).",
    ]
    if ddp:
        eff = ddp[2] / (2 * ddp[1])
        lines += [
            "",
            "| DDP (gloo) | pairs/s | per worker | scaling efficiency |",
            "| --- | --- | --- | --- |",
            f"| 1 worker × 1 thread | {ddp[1]:.0f} | {ddp[1]:.0f} | 1.00 |",
            f"| 2 workers × 1 thread | {ddp[2]:.0f} | {ddp[2] / 2:.0f} | {eff:.2f} |",
        ]
    text = "\n".join(lines)
    print(text)
    if not args.no_append:
        results.record("Training throughput: avlab against a plain PyTorch loop", text)


if __name__ == "__main__":
    main()
