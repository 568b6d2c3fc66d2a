"""What a finished trial may give another: only results of the same configuration and seed, made
by code of the same results version, in the same environment; and the reference numbers that
say when a change to the code moved a result (so that ``tracking.RESULTS_VERSION`` is raised)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from orchestrator import environment, tracking
from orchestrator.config import dump_yaml, resolve
from orchestrator.runs import SWEEP_EXPERIMENT
from orchestrator.trial import SweepContext, _identical_finished_trial


def _trial(uri, home, cfg, parent, name, **tags):
    run_id = tracking.create_run(tracking_uri=uri, home=home, experiment=SWEEP_EXPERIMENT, run_name=name,
                                 params={}, tags={"kind": "trial", "run_identity": cfg.identity(), **tags},
                                 config_yaml=dump_yaml(cfg), parent_run_id=parent)
    client = MlflowClient(uri)
    client.log_metric(run_id, "eval_time_s", 1.0)
    client.set_terminated(run_id, "FINISHED")
    return run_id


def test_an_identical_trial_is_reused_only_with_this_results_version_and_environment(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.prepare_store(uri)
    cfg = resolve(None, preset="tiny", overrides=["seed=3"])
    other = tracking.create_run(tracking_uri=uri, home=tmp_path, experiment=SWEEP_EXPERIMENT, run_name="old",
                                params={}, tags={"kind": "sweep"}, config_yaml="")
    here = environment.describe()["id"]
    env = {f"env.{k}": v for k, v in environment.describe().items()}
    # Oldest first: made before results versions (no tag counts as 1), then in another
    # environment, then one that is the same in every respect.
    old = _trial(uri, tmp_path, cfg, other, "old-version", **{**env, "results_version": "1"})
    _trial(uri, tmp_path, cfg, other, "elsewhere", **{**env, "env.id": "0123456789"})
    same = _trial(uri, tmp_path, cfg, other, "same", **env)
    sweep = SweepContext("new", "parent-of-new", uri, str(tmp_path), str(tmp_path), "d")
    client = MlflowClient(uri)
    assert client.get_run(same).data.tags["avlab.results_version"] == str(tracking.RESULTS_VERSION)
    assert _identical_finished_trial(client, cfg, sweep, "base seed 3").info.run_id == same

    client.delete_run(same)
    assert _identical_finished_trial(client, cfg, sweep, "base seed 3") is None
    said = capsys.readouterr().out
    assert (f"trial base seed 3: trains again, an identical finished trial is not reused: old-version has results "
            f"version 1, this code {tracking.RESULTS_VERSION} (and 1 more)") in said
    client.delete_run(old)
    assert _identical_finished_trial(client, cfg, sweep, "base seed 3") is None
    assert f"elsewhere was computed in environment 0123456789, this one is {here}" in capsys.readouterr().out
    # --reuse-across-environments: the other environment's trial is taken (never the old version's).
    anywhere = dataclasses.replace(sweep, reuse_any_environment=True)
    found = _identical_finished_trial(client, cfg, anywhere, "base seed 3")
    assert found.info.run_name == "elsewhere" and environment.of_run(found) == "0123456789"
    # Another configuration (another seed) is never a candidate.
    assert _identical_finished_trial(client, resolve(None, preset="tiny", overrides=["seed=4"]), sweep, "x") is None


REFERENCE = Path(__file__).resolve().parent / "reference_numbers.json"


def _reference_numbers() -> dict[str, float]:
    """Numbers that every change to what a trial computes moves: each method's loss on its tiny
    preset's first batch, before and after one optimiser step, from the seed a run starts from;
    the logistic probe's accuracy and iterations on fixed features."""
    from torch.utils.data import DataLoader

    from methods.data import build_dataset
    from methods.evaluate import linear_probe
    from methods.registry import METHODS, build_method
    from orchestrator.loaders import DeviceAugment, build_pretraining_data
    from orchestrator.train import seed_everything

    torch.set_num_threads(1)
    out: dict[str, float] = {}
    for name in METHODS:
        cfg = resolve({}, preset="tiny", overrides=[f"method.name={name}"])  # items are made as asked for
        data = build_dataset(cfg.data)
        seed_everything(cfg.seed * 1000)
        method = build_method(name, cfg.method, data.info())
        method.configure_training(cfg.train.epochs)
        pools = build_pretraining_data(cfg, method)
        augment = DeviceAugment(cfg)
        loaders = {k: iter(DataLoader(p, batch_size=16)) for k, p in pools.items()}  # a batch of 16
        batch = augment.paired_batch(next(loaders["main"]), 0)
        for key in ("usound", "uimage"):
            if key in loaders:
                batch.update(augment.unpaired_views(key, next(loaders[key]), 0))
        opt = torch.optim.SGD(method.parameters(), lr=0.01)
        for step in range(2):
            loss = method(batch).metrics["loss"]
            out[f"{name}_loss_step{step}"] = loss.item()
            opt.zero_grad()
            loss.backward()
            opt.step()
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 300)
    X = np.maximum((rng.standard_normal((5, 16))[y] * 0.5 + rng.standard_normal((300, 16))) @ rng.standard_normal((16, 64)), 0)
    probe = linear_probe(X[:200], y[:200], X[200:], y[200:])
    out["probe_accuracy"] = probe.accuracy  # its iterations may differ by one on another CPU: not compared
    return out


def test_the_reference_numbers_are_those_of_this_results_version():
    """A change that moves a reference number beyond last-bit noise (relative 1e-4) changes what
    trials compute: raise ``tracking.RESULTS_VERSION`` (so no finished trial of the old code is
    reused as this code's) and write the new numbers with AVLAB_WRITE_REFERENCE=1."""
    threads = torch.get_num_threads()
    try:
        numbers = _reference_numbers()
    finally:
        torch.set_num_threads(threads)
    if os.environ.get("AVLAB_WRITE_REFERENCE") == "1":
        REFERENCE.write_text(json.dumps({"results_version": tracking.RESULTS_VERSION, "numbers": numbers},
                                        indent=1) + "\n")
    stored = json.loads(REFERENCE.read_text())
    assert stored["results_version"] == tracking.RESULTS_VERSION, (
        f"{REFERENCE.name} holds the numbers of results version {stored['results_version']}: write this "
        f"version's with AVLAB_WRITE_REFERENCE=1")
    moved = {k: (stored["numbers"].get(k), v) for k, v in numbers.items()
             if k not in stored["numbers"] or v != pytest.approx(stored["numbers"][k], rel=1e-4, abs=1e-9)}
    assert not moved, (f"numbers moved {moved}: raise tracking.RESULTS_VERSION, then write them with "
                       f"AVLAB_WRITE_REFERENCE=1")
