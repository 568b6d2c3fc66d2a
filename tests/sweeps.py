"""What the sweep tests share: a sweep's trial runs, what a run measured, a trial actor's SIGKILL, a claim."""

import os
import signal
from pathlib import Path

from orchestrator.metrics import COST_METRICS, USAGE_METRICS

from conftest import TINY_RUN

# test_sweep.py's module sweep: 2 configurations x 2 seeds.
MEM_SPACE = (
    "base:\n  preset: tiny\ngrid:\n  method.memory_size: [10, 100]\nseeds: 2\n"
    "metric: image_h_linear_acc\nmode: max\nresources: {workers: 1, cpus_per_worker: 1}\n"
    "max_concurrent: 2\nplot: {x: method.memory_size, log_x: true}\n"
)
# Two epochs, so a trial killed in its second epoch has a checkpoint to resume from.
# The encoders as MLflow models too: test_export_best_trial_registers_and_reloads_bit_for_bit.
MEM_RUN = [o for o in TINY_RUN if not o.startswith(("train.epochs", "tracking.log_model"))] + ["train.epochs=2"]


def write_mem_claim(folder: Path) -> Path:
    """A cut-down claim beside its search space in ``folder`` (memory 16 beats 8, tiny preset, two
    trials at a time, one seed unless ``--seeds``); the claim file's path."""
    (folder / "mem.yaml").write_text("base:\n  preset: tiny\ngrid:\n  method.memory_size: [8, 16]\nseeds: 1\n"
                                     "metric: image_h_linear_acc\nmode: max\n"
                                     "resources: {workers: 1, cpus_per_worker: 1}\nmax_concurrent: 2\n")
    claim = folder / "mem_claim.yaml"
    claim.write_text("claim: a larger memory helps\npaper: BMA-Memory (paper 001)\nwhere: Fig. 6\n"
                     "quote: more memory helps\nsearch_space: mem.yaml\nmetric: image_h_linear_acc\n"
                     "rule: {type: greater, a: method.memory_size=16, b: method.memory_size=8}\n")
    return claim


def kill_the_trial_actor(proc, log: Path, ready, without: tuple[str, ...] = ()) -> tuple[int, str]:
    """Once ``ready()``, SIGKILL the sweep's one Tune trial actor (no process of ``without`` may
    exist beside it); wait for the sweep to end; its exit code and log."""
    import faults

    def actors() -> list[int]:
        if not ready():
            return []
        return [pid for pid, cmd in faults.processes(proc.pid).items() if cmd.startswith("ray::ImplicitFunc")]

    faults.wait_for(lambda: bool(actors()), timeout=600, what="a trial with a checkpoint", proc=proc, log=log)
    found, table = actors(), faults.processes(proc.pid)
    assert len(found) == 1, table
    assert not [cmd for cmd in table.values() if without and cmd.startswith(without)], table
    os.kill(found[0], signal.SIGKILL)
    try:
        code = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            faults.kill_node(proc)
    return code, log.read_text()


def trial_runs(home: Path, sweep: str) -> dict[tuple[str, str], object]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("avlab-sweeps").experiment_id])
    children = [r for r in runs if r.data.tags.get("avlab.kind") == "trial" and r.data.tags["avlab.sweep_name"] == sweep]
    by_trial = {(r.data.tags["avlab.config_label"], r.data.tags["avlab.seed"]): r for r in children}
    assert len(by_trial) == len(children)  # one child run per trial, never two
    return by_trial


def measured(run) -> dict[str, float]:
    """What a run measured of its model: all but timings, costs and the machines' system metrics."""
    return {k: v for k, v in run.data.metrics.items()
            if not (k.endswith("_s") or k in COST_METRICS or k in USAGE_METRICS or k.startswith("system/"))}
