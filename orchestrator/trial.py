"""One trial of ``avlab sweep``, run by Ray Tune in the trial's process.

The trial resolves its config from the search space and opens its MLflow child run under the
sweep's parent run (found again by trial id or config identity, so a re-run trial keeps its run).
A single-worker trial then runs the training loop in its own process, holding its CPUs (and GPU
share) itself; a multi-worker trial runs the Ray Train V2 pattern: a ``TorchTrainer`` with a fixed
name and ``TuneReportCallback``. Both write their checkpoints to
``<storage>/trials/<sweep>-<run id>``, so a restarted trial continues where it was.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.tracking import MlflowClient

from orchestrator import environment, tracking
from orchestrator.runs import SWEEP_EXPERIMENT
from orchestrator.search_space import point_label, trial_params
from orchestrator.signals import quiet_worker_sigterm

if TYPE_CHECKING:
    from orchestrator.search_space import SearchSpace


@dataclass(frozen=True)
class SweepContext:
    """What every trial of a sweep is given by its driver: the sweep's name and parent run, its
    store, its home and storage root (``storage/trials`` holds the trials' checkpoints), the id
    of this driver process (a trial run started by another driver is not this one's), and
    whether identical finished trials of other sweeps are reused, and whether from any environment;
    for a dry run (``orchestrator.dry_run``), how long each trial holds its resources."""

    name: str
    parent_run_id: str
    tracking_uri: str
    home: str
    storage: str
    driver: str
    reuse_trials: bool = False
    reuse_any_environment: bool = False  # --reuse-across-environments: a donor's environment may differ
    dry_run_s: float | None = None  # --dry-run: trials train nothing, they record where they ran


# When this process ran its last trial: Tune reuses a trial's actor for the next trial, which then
# starts warm (nothing to import, data already rendered).
_LAST_TRIAL_END: float | None = None


def _launch_delay() -> float:
    """Seconds from this actor's process start to now for its first trial (process start-up,
    imports of the trial module), 0 for a trial that Tune gave a reused actor."""
    if _LAST_TRIAL_END is not None:
        return 0.0
    try:  # the process start time from /proc (Linux): clock ticks after boot
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return max(time.time() - (boot + start_ticks / os.sysconf("SC_CLK_TCK")), 0.0)
    except (OSError, ValueError, IndexError, StopIteration):  # not Linux: the timing is lost, nothing else
        return 0.0


def run_trial(config: dict[str, Any], *, space: SearchSpace, sweep: SweepContext) -> None:
    """The Tune trial: resolve the config, open (or find) the child run, train."""
    global _LAST_TRIAL_END
    started = time.perf_counter()
    launch_s = _launch_delay()
    quiet_worker_sigterm()
    # A trial that a scheduler stops ends in Tune's report, then closes its run and its monitor;
    # Tune waits this long (read when it resets this actor for the next trial, default 2 s) for
    # that before it gives up on reusing the actor and fails the next trial.
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "300")
    try:
        _trial(config, space=space, sweep=sweep, started=started, launch_s=launch_s)
    finally:
        _LAST_TRIAL_END = time.time()


def _trial_run(client: MlflowClient, space: SearchSpace, sweep: SweepContext, cfg: Any, trial_id: str) -> list:
    """The child run an earlier attempt or driver made for this trial ([] if none).

    A grid trial is one (configuration, seed): found by its config's identity even if a restarted
    driver gave it a new trial id. A proposal of a model-based search is found by its trial id."""
    exp = client.get_experiment_by_name(SWEEP_EXPERIMENT)
    key = f"tags.`avlab.trial_id` = '{trial_id}'" if space.uses_optuna else f"tags.`avlab.run_identity` = '{cfg.identity()}'"
    parent = f"tags.`mlflow.parentRunId` = '{sweep.parent_run_id}'"
    found = client.search_runs([exp.experiment_id], f"{key} and {parent}", max_results=1)
    if not found and space.uses_optuna:
        # A proposal that Tune had not yet recorded when an earlier driver died is made again by
        # the restored, seeded searcher, under a new trial id: it takes over that proposal's run
        # (one left by an earlier driver, never one of this driver's trials).
        same = client.search_runs([exp.experiment_id], f"tags.`avlab.run_identity` = '{cfg.identity()}' and {parent}",
                                  max_results=100)
        found = [r for r in same if r.data.tags.get(f"{tracking.TAG_PREFIX}driver") != sweep.driver][:1]
    return found


def _new_trial_run(space: SearchSpace, sweep: SweepContext, cfg: Any, params: dict[str, Any], seed: int,
                   trial_id: str, launcher: str) -> str:
    """A new child run of the sweep's parent for this trial, with its config and varied values."""
    from orchestrator.config import dump_yaml

    label = point_label(params, tuple(space.grid))
    return tracking.create_run(
        tracking_uri=sweep.tracking_uri,
        home=Path(sweep.home),
        experiment=SWEEP_EXPERIMENT,
        run_name=f"{sweep.name}/{label}/seed{seed}",
        params={**cfg.flat(), **{f"varied.{k}": v for k, v in params.items()}},
        tags={
            "kind": "trial",
            "sweep_name": sweep.name,
            "trial_id": trial_id,
            "config_label": label,
            "method": cfg.method_name,
            "preset": cfg.preset,
            "run_identity": cfg.identity(),
            "seed": str(seed),
            "launcher": launcher,
            "driver": sweep.driver,  # which driver process started it
            **({"dry_run": "true"} if sweep.dry_run_s is not None else {}),
        },
        config_yaml=dump_yaml(cfg),
        parent_run_id=sweep.parent_run_id,
    )


def _trial(config: dict[str, Any], *, space: SearchSpace, sweep: SweepContext, started: float,
           launch_s: float) -> None:
    import ray.tune

    trial_id = ray.tune.get_context().get_trial_id()
    params, seed = trial_params(space, config)
    cfg = space.config_for(params, seed)
    uri, home = sweep.tracking_uri, Path(sweep.home)
    client = MlflowClient(uri)
    found = _trial_run(client, space, sweep, cfg, trial_id)
    if found and found[0].info.status == "FINISHED" and tracking.ran_to_end(found[0]):
        # Finished before the sweep's driver died, yet Tune had not recorded it: report, don't rerun.
        ray.tune.report(dict(found[0].data.metrics))
        return
    if sweep.reuse_trials and sweep.dry_run_s is None:
        if found and found[0].data.tags.get(f"{tracking.TAG_PREFIX}{tracking.REUSED_FROM_TAG}"):
            # An earlier attempt died while it copied another trial's results: start that again.
            client.delete_run(found[0].info.run_id)
            found = []
        label = f"{point_label(params, tuple(space.grid))} seed {seed}"
        donor = None if found else _identical_finished_trial(client, cfg, sweep, label)
        if donor is not None:
            ray.tune.report(_take_results(client, space, sweep, cfg, params, seed, trial_id, donor))
            return
    # Which launcher trains it: this trial's own process, or a TorchTrainer's workers.
    launcher = "trial" if cfg.resources.workers == 1 else "ray-train"
    if found:
        run_id = found[0].info.run_id
        tracking.set_tags(client, run_id, {"trial_id": trial_id, "launcher": launcher, "driver": sweep.driver})
    else:
        run_id = _new_trial_run(space, sweep, cfg, params, seed, trial_id, launcher)
    if tracking.recorded_failure(client, run_id):
        # A deterministic error ended an earlier attempt: the trial is over, not retried (Tune
        # restarts a trial whatever its error). The sweep counts it among the failed ones.
        tracking.end_run(uri, run_id, ok=False)
        return
    # Stable across restarts, so a restarted trial finds its checkpoints.
    name = f"{sweep.name}-{run_id}"
    trials_path = f"{sweep.storage}/trials"
    ok = False
    try:
        from orchestrator.checkpoint import init_checkpoint

        init = init_checkpoint(cfg.train.init_from, home)  # checked by the driver; found here, in this trial's home
        if cfg.resources.workers == 1:
            _train_here(cfg, run_id=run_id, uri=uri, init=init, run_dir=f"{trials_path}/{name}", launch_s=launch_s,
                        dry_run_s=sweep.dry_run_s)
        else:
            from ray.tune.integration.ray_train import TuneReportCallback

            from orchestrator.launch import build_trainer, fit

            trainer = build_trainer(cfg, name=name, run_id=run_id, tracking_uri=uri, storage_path=trials_path,
                                    init_checkpoint=init, callbacks=[TuneReportCallback()], sweep_trial=True,
                                    dry_run_s=sweep.dry_run_s)
            fit(trainer, cfg, "trial", trial_id)
        if tracking.recorded_failure(client, run_id):
            return  # failed for good; the sweep reports the recorded line
        # The trial's wall time (with its process's start for a trial that trains in it), next to
        # the training and evaluation time the loop logged.
        wall = time.perf_counter() - started + (launch_s if launcher == "trial" else 0.0)
        tracking.log_metrics(client, run_id, {"trial_time_s": wall},
                             step=max(cfg.train.epochs - 1, 0))
        ok = True
    finally:
        tracking.end_run(uri, run_id, ok=ok)


def _identical_finished_trial(client: MlflowClient, cfg: Any, sweep: SweepContext, label: str):
    """The first finished trial of another sweep in the store with this trial's resolved config
    and seed (``cfg.identity()``), evaluated to the end, made by code of this results version
    (``tracking.RESULTS_VERSION``) in this environment (``avlab.env.id``), or None. Its numbers
    are this trial's: a trial's result is a function of its config and seed, given the code's
    numerics and the machine's kernels. An identical trial refused for its version or its
    environment is said, with the reason, and this trial trains; with
    ``sweep.reuse_any_environment`` a trial of another environment is taken (its tags say where
    it was computed)."""
    exp = client.get_experiment_by_name(SWEEP_EXPERIMENT)
    same = client.search_runs(
        [exp.experiment_id],
        f"tags.`avlab.run_identity` = '{cfg.identity()}' and tags.`avlab.kind` = 'trial' "
        "and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time ASC"], max_results=100,
    )
    here = environment.describe()["id"]
    refused = []
    for run in same:
        if run.data.tags.get("mlflow.parentRunId") == sweep.parent_run_id or not tracking.is_whole_result(run):
            continue
        version = run.data.tags.get(f"{tracking.TAG_PREFIX}{tracking.RESULTS_VERSION_TAG}", "1")
        if version != str(tracking.RESULTS_VERSION):
            refused.append(f"{run.info.run_name} has results version {version}, this code {tracking.RESULTS_VERSION}")
        elif environment.of_run(run) != here and not sweep.reuse_any_environment:
            refused.append(f"{run.info.run_name} was computed in environment {environment.of_run(run) or 'unrecorded'}, "
                           f"this one is {here}")
        else:
            return run
    if refused:
        print(f"[avlab] trial {label}: trains again, an identical finished trial is not reused: {refused[0]}"
              + (f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""), flush=True)
    return None


def _take_results(client: MlflowClient, space: SearchSpace, sweep: SweepContext, cfg: Any, params: dict[str, Any],
                  seed: int, trial_id: str, donor) -> dict[str, float]:
    """This trial's child run with ``donor``'s every metric, step by step, and a tag naming the run
    that holds the weights; no training. Returns the final metrics (Tune's report)."""
    source = donor.data.tags.get(f"{tracking.TAG_PREFIX}{tracking.REUSED_FROM_TAG}") or donor.info.run_id
    run_id = _new_trial_run(space, sweep, cfg, params, seed, trial_id, "reused")
    # The numbers are the donor's, and so is the code that made them (unrecorded before the tag).
    code = donor.data.tags.get(f"{tracking.TAG_PREFIX}{tracking.SOURCE_HASH_TAG}", "unrecorded")
    # Tagged first: a restarted attempt that finds this run half-copied deletes it and starts again.
    # So are the environment that computed them and the results version (equal to this code's).
    provenance = {k.removeprefix(tracking.TAG_PREFIX): v for k, v in donor.data.tags.items()
                  if k.startswith(f"{tracking.TAG_PREFIX}{environment.TAG}")}
    tracking.set_tags(client, run_id, {tracking.REUSED_FROM_TAG: source, tracking.SOURCE_HASH_TAG: code,
                                       "reused_from_sweep": donor.data.tags.get("avlab.sweep_name", ""), **provenance})
    tracking.copy_metric_histories(client, donor.info.run_id, run_id, donor.data.metrics)
    tracking.end_run(sweep.tracking_uri, run_id, ok=True)
    same = "the same code" if code == tracking.source_hash() else f"code {code}, this code is {tracking.source_hash()}"
    print(f"[avlab] trial {point_label(params, tuple(space.grid))} seed {seed}: not trained again; the results of "
          f"the identical finished trial {donor.info.run_name} (MLflow run {source}; {same})", flush=True)
    return dict(donor.data.metrics)


def _train_here(cfg, *, run_id: str, uri: str, init: str, run_dir: str, launch_s: float,
                dry_run_s: float | None = None) -> None:
    """A single-worker trial: the training loop in this process (``orchestrator.hosts.TrialHost``)."""
    from orchestrator.worker_spec import worker_spec

    if dry_run_s is not None:  # trains nothing (``orchestrator.dry_run``)
        from orchestrator.dry_run import in_trial

        in_trial(worker_spec(cfg, run_id=run_id, tracking_uri=uri, init_checkpoint=init, dry_run_s=dry_run_s), run_dir)
        return
    t0 = time.perf_counter()
    warm = "orchestrator.train" in sys.modules
    from orchestrator.train import train_in_trial

    spec = worker_spec(cfg, run_id=run_id, tracking_uri=uri, init_checkpoint=init, launch_time_s=launch_s,
                       import_time_s=0.0 if warm else time.perf_counter() - t0, sweep_trial=True)
    train_in_trial(spec, run_dir)
