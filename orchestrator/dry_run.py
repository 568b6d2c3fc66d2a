"""``avlab sweep --dry-run SECONDS``: a sweep whose trials train nothing. Each trial holds the
resources it asked for SECONDS, with a checkpoint per step, while its workers record where they
run (Ray node, host, GPU ids, ``CUDA_VISIBLE_DEVICES``, the device a real run would train on, DDP
rank and world over the run's process group). The driver then checks every attempt of every
trial against what the trial asked for and prints where each ran, so a cluster's placement of a
sweep (DDP trials across nodes, fractional trials packed onto shared GPUs, trials moved off a
lost node) is seen before it spends GPU hours.

The record of a trial is the artifact ``dry_run/placement.json`` of its MLflow child run: one
entry per attempt (a restarted trial appends one), each with its workers in rank order and the
wall-clock span in which it held them.
"""

from __future__ import annotations

import json
import math
import os
import socket
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from orchestrator.errors import ConfigError

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from orchestrator.worker_spec import WorkerSpec

ARTIFACT = "dry_run/placement.json"
TAG = "dry_run"  # avlab.dry_run on the parent and child runs: "true" while it runs, "done" on a trial that ended
STATE_FILE = "dry_run.json"  # a dry trial's checkpoint: the last step it held
MAX_STEPS = 10  # a dry trial checkpoints this many times at most (train.epochs if fewer)
MAX_SECONDS = 86400.0


def check_seconds(value: float | None, field: str = "--dry-run") -> float | None:
    """SECONDS of ``--dry-run``: finite, 0 to a day (0: each trial reports at once)."""
    if value is None:
        return None
    if not math.isfinite(value) or not 0 <= value <= MAX_SECONDS:
        raise ConfigError(f"{field}: seconds each trial holds its resources, between 0 and {MAX_SECONDS:.0f}; "
                          f"got {value:g}")
    return float(value)


def steps(epochs: int) -> int:
    return max(1, min(int(epochs), MAX_STEPS))


# [worker] -------------------------------------------------------------------------------------
def placement(rank: int, world: int, device: str) -> dict[str, Any]:
    """Where this worker runs, as Ray and torch.distributed see it."""
    import ray
    import torch.distributed as dist

    ctx = ray.get_runtime_context() if ray.is_initialized() else None
    try:
        gpus = [str(g) for g in ray.get_gpu_ids()] if ctx is not None else []
    except Exception:  # noqa: BLE001 - outside a Ray worker (a test calling the loop)
        gpus = []
    initialized = dist.is_available() and dist.is_initialized()
    return {
        "rank": rank,
        "world": world,
        "dist_rank": dist.get_rank() if initialized else None,
        "dist_world": dist.get_world_size() if initialized else None,
        "backend": str(dist.get_backend()) if initialized else None,
        "node": ctx.get_node_id() if ctx is not None else "local",
        "host": socket.gethostname(),
        "gpus": gpus,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "device": device,
        "pid": os.getpid(),
    }


def _read_state(checkpoint) -> dict[str, Any]:
    if checkpoint is None:
        return {}
    with checkpoint.as_directory() as folder:
        path = os.path.join(folder, STATE_FILE)
        if not os.path.exists(path):
            return {}
        with open(path) as f:
            return json.load(f)


def loop_per_worker(loop_config: dict[str, WorkerSpec]) -> None:
    """What Ray Train runs on every worker of a dry DDP trial (``orchestrator.train`` and the
    methods are never imported: a worker starts in the time of torch and Ray)."""
    from orchestrator.hosts import RayTrainHost
    from orchestrator.signals import quiet_worker_sigterm

    quiet_worker_sigterm()
    spec = loop_config["spec"]
    dry_loop(spec, RayTrainHost(), spec.dry_run_s or 0.0)


def in_trial(spec: WorkerSpec, run_dir: str) -> None:
    """A dry single-worker trial, in the trial's own process, its checkpoints in ``run_dir``."""
    from orchestrator.hosts import TrialHost

    host = TrialHost(run_dir, keep=spec.config["train"]["checkpoints_to_keep"], gpu=False)  # touches no GPU
    dry_loop(spec, host, spec.dry_run_s or 0.0)


def dry_loop(spec: WorkerSpec, host, seconds: float) -> None:
    """One attempt of a dry trial on ``host`` (``orchestrator.hosts``): record the workers, hold
    the resources ``seconds`` in all (from the step the last checkpoint reached), report."""
    import torch.distributed as dist
    from mlflow.tracking import MlflowClient

    from orchestrator import checkpoint as ckpt
    from orchestrator import tracking

    rank, world = host.rank, host.world
    gpu = bool(spec.config["resources"]["gpu"])
    device = str(getattr(host, "device", "cpu")) if world > 1 else ("cuda:0" if gpu else "cpu")
    start = int(_read_state(host.latest_checkpoint()).get("step", -1)) + 1
    mine = placement(rank, world, device)
    workers: list[Any] = [None] * world
    if world > 1:
        dist.all_gather_object(workers, mine)
    else:
        workers = [mine]
    client = MlflowClient(spec.tracking_uri) if rank == 0 else None
    attempts: list[dict[str, Any]] = []
    if client is not None:
        # The earlier attempts are in the run's record (written at every step), which outlives
        # a checkpoint that a lost node took with it before its group registered it.
        attempts = _recorded(client, spec.run_id)
        now = time.time()
        attempts.append({"started": now, "last": now, "from_step": start, "workers": workers})
        tracking.tag_nodes(client, spec.run_id, [w["node"] for w in workers])
        client.log_dict(spec.run_id, {"attempts": attempts}, ARTIFACT)
        tracking.say(f"dry run: attempt {len(attempts)} from step {start} on " + ", ".join(
            f"rank {w['rank']} {w['host']} GPU {','.join(w['gpus']) or '-'}" for w in workers[:4])
            + (f" and {world - 4} more" if world > 4 else ""))
    n = steps(spec.config["train"]["epochs"])
    for step in range(start, n):
        time.sleep(seconds / n)
        metrics = {"epoch": step, "dry_run_step": step}
        if client is None:
            host.report(metrics)
            continue
        attempts[-1]["last"] = time.time()
        client.log_dict(spec.run_id, {"attempts": attempts}, ARTIFACT)
        with tempfile.TemporaryDirectory() as tmp:
            with open(os.path.join(tmp, STATE_FILE), "w") as f:
                json.dump({"step": step}, f)
            host.report(metrics, tmp, ckpt.dir_name(step))
    if client is not None:
        tracking.set_tags(client, spec.run_id, {TAG: "done"})
    host.report({"epoch": n - 1})


def _recorded(client: MlflowClient, run_id: str) -> list[dict[str, Any]]:
    """The attempts a run's record holds ([] before its first)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            with open(client.download_artifacts(run_id, ARTIFACT, tmp)) as f:
                return list(json.load(f)["attempts"])
    except Exception:  # noqa: BLE001 - MLflow raises several types for a missing artifact
        return []


# [driver] -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DryTrial:
    """One trial's record: its label, what it asked for, and its attempts (``dry_loop``'s)."""

    label: str
    workers: int
    cpus_per_worker: int
    gpu_share: float
    attempts: list[dict[str, Any]]
    status: str = "FINISHED"


def problems(trials: Iterable[DryTrial]) -> list[str]:
    """Every way the placement differs from what the trials asked for, one line each: a worker
    group of the wrong size or with wrong ranks, a worker without its GPU (or with one it did
    not ask for), a whole GPU given to two workers of a trial, and a GPU whose trials held more
    than all of it at one time. Empty when the cluster placed everything as declared."""
    out: list[str] = []
    held: dict[tuple[str, str], list[tuple[float, float, float, str]]] = defaultdict(list)
    for trial in trials:
        if not trial.attempts:
            out.append(f"{trial.label}: no worker recorded where it ran ({trial.status})")
            continue
        for a, attempt in enumerate(trial.attempts, 1):
            where = f"{trial.label} attempt {a}"
            workers = attempt["workers"]
            if len(workers) != trial.workers or sorted(w["rank"] for w in workers) != list(range(trial.workers)):
                out.append(f"{where}: {len(workers)} workers with ranks {[w['rank'] for w in workers]}, "
                           f"asked for {trial.workers}")
            for w in workers:
                if trial.workers > 1 and (w.get("dist_world") != trial.workers or w.get("dist_rank") != w["rank"]):
                    out.append(f"{where}: rank {w['rank']} is rank {w.get('dist_rank')} of {w.get('dist_world')} "
                               f"in its process group, not of {trial.workers}")
                want = 1 if trial.gpu_share > 0 else 0
                if len(w["gpus"]) != want:
                    out.append(f"{where}: rank {w['rank']} was given GPU {w['gpus'] or 'none'}, "
                               f"asked for {trial.gpu_share:g}")
                    continue
                visible = (w.get("cuda_visible_devices") or "").split(",")
                if want and w["gpus"][0] not in visible:
                    out.append(f"{where}: rank {w['rank']}'s GPU {w['gpus'][0]} is not in its "
                               f"CUDA_VISIBLE_DEVICES={w.get('cuda_visible_devices')!r}")
                for gpu in w["gpus"]:
                    held[(w["node"], gpu)].append((attempt["started"], attempt["last"], trial.gpu_share, where))
            if trial.gpu_share >= 1:
                seen: dict[tuple[str, str], int] = {}
                for w in workers:
                    for gpu in w["gpus"]:
                        if (w["node"], gpu) in seen:
                            out.append(f"{where}: ranks {seen[(w['node'], gpu)]} and {w['rank']} share GPU {gpu} "
                                       f"of node {w['node'][:8]}")
                        seen[(w["node"], gpu)] = w["rank"]
    for (node, gpu), spans in held.items():
        peak, who = _peak_share(spans)
        if peak > 1 + 1e-6:
            out.append(f"GPU {gpu} of node {node[:8]}: {', '.join(who)} held {peak:g} of it at once")
    return out


def _peak_share(spans: list[tuple[float, float, float, str]]) -> tuple[float, list[str]]:
    """The largest sum of shares held at one instant, and who held them then."""
    best, who = 0.0, []
    for start, _, _, _ in spans:
        now = [(share, name) for s, e, share, name in spans if s <= start <= e]
        total = sum(share for share, _ in now)
        if total > best:
            best, who = total, sorted({name for _, name in now})
    return best, who


def packing(trials: Iterable[DryTrial]) -> dict[float, int]:
    """For each GPU share below 1: the most trials of that share that held one GPU at once."""
    spans: dict[tuple[str, str], list[tuple[float, float, float, str]]] = defaultdict(list)
    for trial in trials:
        for a, attempt in enumerate(trial.attempts):
            for w in attempt["workers"]:
                for gpu in w["gpus"]:
                    spans[(w["node"], gpu)].append((attempt["started"], attempt["last"], trial.gpu_share,
                                                    f"{trial.label}#{a}"))
    out: dict[float, int] = {}
    for held in spans.values():
        for start, _, share, _ in held:
            if share >= 1:
                continue
            count = sum(1 for s, e, sh, _ in held if sh == share and s <= start <= e)
            out[share] = max(out.get(share, 0), count)
    return out


def read_trials(client: MlflowClient, parent_id: str) -> list[DryTrial]:
    """The dry run's trials, from their child runs' records."""
    from orchestrator.runs import children

    out = []
    for run in children(client, parent_id, params=("resources.",)):
        params = run.data.params
        gpu = params.get("resources.gpu", "False")
        share = 1.0 if gpu == "True" else 0.0 if gpu == "False" else float(gpu)
        attempts = _recorded(client, run.info.run_id)
        label = run.info.run_name.split("/", 1)[-1].replace("/", " ")
        out.append(DryTrial(label=label, workers=int(params.get("resources.workers", 1)),
                            cpus_per_worker=int(params.get("resources.cpus_per_worker", 1)), gpu_share=share,
                            attempts=attempts, status=run.info.status))
    return sorted(out, key=lambda t: t.label)


def table(trials: list[DryTrial]) -> str:
    """Where each trial's attempts ran: hosts (short node ids) and GPU ids by rank."""
    nodes = sorted({w["node"] for t in trials for a in t.attempts for w in a["workers"]})
    short = {n: f"n{i}" for i, n in enumerate(nodes)}
    lines = ["| trial | asked | attempt | where (rank: node/GPU) | held |", "| --- | --- | --- | --- | --- |"]
    for t in trials:
        asked = f"{t.workers} x ({t.cpus_per_worker} CPU" + (f", {t.gpu_share:g} GPU)" if t.gpu_share else ")")
        for a, attempt in enumerate(t.attempts or [{}], 1):
            workers = attempt.get("workers", [])
            where = " ".join(f"{w['rank']}:{short[w['node']]}/{','.join(w['gpus']) or '-'}" for w in workers) or "-"
            span = f"{attempt['last'] - attempt['started']:.0f} s" if workers else t.status
            lines.append(f"| {t.label} | {asked} | {a} | {where} | {span} |")
    legend = ", ".join(f"{short[n]} = {n[:12]} ({_host(trials, n)})" for n in nodes)
    return "\n".join(lines) + (f"\n\nnodes: {legend}" if nodes else "")


def _host(trials: list[DryTrial], node: str) -> str:
    return next(w["host"] for t in trials for a in t.attempts for w in a["workers"] if w["node"] == node)


def finish(client: MlflowClient, name: str, parent_id: str) -> list[str]:
    """Print the dry run's placement table and verdict; the problems found (empty: as declared)."""
    trials = read_trials(client, parent_id)
    found = problems(trials)
    print()
    print(table(trials))
    packed = packing(trials)
    restarted = sum(len(t.attempts) > 1 for t in trials)
    split = [t.label for t in trials if any(len({w["node"] for w in a["workers"]}) > 1 for a in t.attempts)]
    nodes = {w["node"] for t in trials for a in t.attempts for w in a["workers"]}
    summary = (f"[avlab] dry run {name}: {len(trials)} trials on {len(nodes)} node{'s' * (len(nodes) != 1)}"
               + (f", {restarted} restarted elsewhere or again" if restarted else "")
               + "".join(f", up to {n} trials of {share:g} GPU on one GPU at once"
                         for share, n in sorted(packed.items())))
    print(summary)
    if split:  # not a problem (Ray's pack strategy allows it), but DDP over a network is slower
        print(f"[avlab] dry run {name}: the workers of {', '.join(split)} straddled nodes; resources.placement="
              "strict_pack keeps a trial's workers on one node")
    if found:
        print(f"[avlab] dry run {name}: {len(found)} placement problem{'s' * (len(found) != 1)}:")
        for line in found:
            print(f"  - {line}")
    else:
        print(f"[avlab] dry run {name}: every trial got the workers, ranks and GPUs it asked for")
    return found

