"""``avlab sweep``: a Ray Tune ``Tuner`` over a search space; one trial = one ``TorchTrainer``.

Each trial resolves its config from the search space, opens its MLflow child run under the
sweep's parent run (found again by trial id, so a re-run trial keeps its run), and runs the
Ray Train V2 pattern: a ``TorchTrainer`` with a fixed name and ``TuneReportCallback``. Grids go
through Tune's ``grid_search`` (configurations x seeds); distributions through ``OptunaSearch``
with a seeded TPE sampler.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.tracking import MlflowClient

from orchestrator import jobs, tracking
from orchestrator.errors import ConfigError, RunFailed

if TYPE_CHECKING:  # the config is imported where it is used: `avlab report` and `status` need none
    from orchestrator.search_space import SearchSpace

SWEEP_EXPERIMENT = "avlab-sweeps"


def point_label(params: dict[str, Any], grid: tuple[str, ...] = ()) -> str:
    """Stable, readable label of one configuration, e.g. ``method.memory_size=500``; a variant
    is named by its label (its settings are in the run's params), then the grid values."""
    if not params:
        return "base"
    if "variant" in params:
        return ",".join([str(params["variant"]), *(f"{k}={params[k]}" for k in grid if k in params)])
    return ",".join(f"{k}={v}" for k, v in params.items())


def find_sweep_run(client: MlflowClient, name: str):
    exp = client.get_experiment_by_name(SWEEP_EXPERIMENT)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id],
        f"tags.`avlab.sweep_name` = '{name}' and tags.`avlab.kind` = 'sweep'",
        max_results=1,
    )
    return runs[0] if runs else None


def _trial_params(space: SearchSpace, config: dict[str, Any]) -> dict[str, Any]:
    if space.uses_optuna:
        return {path: config[path] for path in space.search}
    return dict(space.grid_points()[config["point"]])


def _run_trial(config: dict[str, Any], *, space: SearchSpace, sweep: dict[str, Any]) -> None:
    """The Tune trial: resolve the config, open the child run, fit one TorchTrainer."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from orchestrator.config import dump_yaml
    from orchestrator.launch import build_trainer, fit

    started = time.perf_counter()
    trial_id = ray.tune.get_context().get_trial_id()
    params = _trial_params(space, config)
    seed = config["seed"]
    cfg = space.config_for(params, seed)
    uri, home = sweep["tracking_uri"], Path(sweep["home"])
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(SWEEP_EXPERIMENT)
    # A grid trial is one (configuration, seed): found by its config's identity even if a restarted
    # driver gave it a new trial id. A proposal of a model-based search is found by its trial id.
    key = f"tags.`avlab.trial_id` = '{trial_id}'" if space.uses_optuna else f"tags.`avlab.run_identity` = '{cfg.identity()}'"
    found = client.search_runs(
        [exp.experiment_id], f"{key} and tags.`mlflow.parentRunId` = '{sweep['parent_run_id']}'", max_results=1
    )
    if found and found[0].info.status == "FINISHED" and "eval_time_s" in found[0].data.metrics:
        # Finished before the sweep's driver died, yet Tune had not recorded it: report, don't rerun.
        ray.tune.report(dict(found[0].data.metrics))
        return
    if found:
        run_id = found[0].info.run_id
        tracking.set_tags(client, run_id, {"trial_id": trial_id})
    else:
        run_id = tracking.create_run(
            tracking_uri=uri,
            home=home,
            experiment=SWEEP_EXPERIMENT,
            run_name=f"{sweep['name']}/{point_label(params, tuple(space.grid))}/seed{seed}",
            params={**cfg.flat(), **{f"varied.{k}": v for k, v in params.items()}},
            tags={
                "kind": "trial",
                "sweep_name": sweep["name"],
                "trial_id": trial_id,
                "config_label": point_label(params, tuple(space.grid)),
                "method": cfg.method_name,
                "preset": cfg.preset,
                "run_identity": cfg.identity(),
                "seed": str(seed),
            },
            config_yaml=dump_yaml(cfg),
            parent_run_id=sweep["parent_run_id"],
        )
    trainer = build_trainer(
        cfg,
        name=f"{sweep['name']}-{run_id}",  # stable across restarts, so the trainer resumes
        run_id=run_id,
        tracking_uri=uri,
        storage_path=f"{sweep.get('storage') or home / 'ray'}/trials",
        home=home,
        callbacks=[TuneReportCallback()],
    )
    ok = False
    try:
        fit(trainer, cfg, "trial", trial_id)
        failure = tracking.recorded_failure(client, run_id)
        if failure:
            raise RunFailed(f"trial {trial_id} failed: {failure}")
        # The trial's wall time, next to the training and evaluation time the worker logged.
        tracking.log_metrics(client, run_id, {"trial_time_s": time.perf_counter() - started},
                             step=max(cfg.train.epochs - 1, 0))
        ok = True
    finally:
        tracking.end_run(uri, run_id, ok=ok)


def _param_space(space: SearchSpace) -> dict[str, Any]:
    from ray import tune

    if not space.uses_optuna:
        return {
            "point": tune.grid_search(list(range(len(space.grid_points())))),
            "seed": tune.grid_search(list(space.seeds)),
        }
    dims: dict[str, Any] = {"seed": space.seeds[0]}
    for path, d in space.search.items():
        if d.type == "uniform":
            dims[path] = tune.uniform(d.low, d.high)
        elif d.type == "loguniform":
            dims[path] = tune.loguniform(d.low, d.high)
        elif d.type == "int":
            dims[path] = tune.randint(int(d.low), int(d.high) + 1)
        else:
            dims[path] = tune.choice(list(d.values))
    return dims


def build_searcher(space: SearchSpace, seed: int = 0):
    """OptunaSearch with a seeded TPE sampler (same seed, same proposals).

    Downstream metrics arrive only with a trial's final report (after evaluation), so per-epoch
    reports without the metric are not forwarded to Optuna."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    class FinalMetricOptunaSearch(OptunaSearch):
        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if self.metric in result:
                super().on_trial_result(trial_id, result)

    return FinalMetricOptunaSearch(
        metric=space.metric, mode=space.mode, sampler=optuna.samplers.TPESampler(seed=seed)
    )


def check_supported(space: SearchSpace) -> None:
    if space.uses_optuna and (space.grid or space.variants):
        raise ConfigError(f"{space.path.name}: search: combine it with neither grid nor variants")
    if space.uses_optuna and len(space.seeds) > 1:
        raise ConfigError(f"{space.path.name}: seeds: a model-based search runs one seed per proposal; use seeds: 1")
    if space.scheduler is not None:
        sched = space.scheduler
        for key in sched:
            if key not in ("type", "metric", "grace_period", "reduction_factor"):
                raise ConfigError(f"{space.path.name}: scheduler.{key}: unknown key; use type, metric, "
                                  "grace_period, reduction_factor")
        for key in ("grace_period", "reduction_factor"):
            value = sched.get(key, 2)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (key == "reduction_factor" and value < 2):
                raise ConfigError(f"{space.path.name}: scheduler.{key}: must be an integer >= {2 if key == 'reduction_factor' else 1}")
        metric = sched.get("metric", scheduler_metric(space))
        if metric not in ("image_h_knn_acc", "sound_h_knn_acc"):
            raise ConfigError(f"{space.path.name}: scheduler.metric: must be image_h_knn_acc or sound_h_knn_acc, "
                              "the metrics measured during pretraining")
        cfg = space.first_config()
        if cfg.eval.every_epochs < 1:
            raise ConfigError(f"{space.path.name}: scheduler: needs eval.every_epochs >= 1 in the base config, "
                              "so trials report a kNN accuracy while they train")


def scheduler_metric(space: SearchSpace) -> str:
    return "sound_h_knn_acc" if space.metric.startswith("sound") else "image_h_knn_acc"


def build_scheduler(space: SearchSpace):
    """ASHA on the kNN accuracy measured every ``eval.every_epochs`` (one Tune iteration = one epoch)."""
    if space.scheduler is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    sched = space.scheduler
    epochs = space.first_config().train.epochs
    return ASHAScheduler(
        time_attr="training_iteration",
        metric=sched.get("metric", scheduler_metric(space)),
        mode=space.mode,
        max_t=epochs + 1,  # + the final evaluation report
        grace_period=sched.get("grace_period", 2),
        reduction_factor=sched.get("reduction_factor", 2),
        stop_last_trials=False,  # a trial that reached max_t finishes its own evaluation and run
    )


def _close_trial_runs(client: MlflowClient, parent_id: str, results) -> None:
    """Settle each child run's status from Tune's view of its trial.

    A trial that a scheduler stopped never reaches its ``finally`` (or reaches it through the
    stop's exception): without an error in Tune it was stopped early (KILLED, tagged), unless it
    had logged its final evaluation (``eval_time_s``), in which case it finished."""
    exp = client.get_experiment_by_name(SWEEP_EXPERIMENT)
    errored = {(r.metrics or {}).get("trial_id") for r in results if r.error is not None}
    unknown_errors = None in errored  # an errored trial that never reported: trust FAILED runs
    for run in client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=5000):
        status = run.info.status
        if status == "FINISHED" or run.data.tags.get("avlab.trial_id") in errored or (
            unknown_errors and status == "FAILED"
        ):
            if status == "RUNNING":
                client.set_terminated(run.info.run_id, status="FAILED")
            continue
        if "eval_time_s" in run.data.metrics:
            client.set_terminated(run.info.run_id, status="FINISHED")
        else:
            client.set_tag(run.info.run_id, "avlab.stopped_early", "true")
            client.set_terminated(run.info.run_id, status="KILLED")


def run_sweep(
    space: SearchSpace,
    *,
    name: str,
    home: Path,
    tracking_uri: str,
    address: str | None,
    max_concurrent: int,
) -> str:
    """Create the sweep's parent run and job file, then run the whole sweep; return the parent id."""
    client = MlflowClient(tracking_uri)
    tracking.get_or_create_experiment(client, SWEEP_EXPERIMENT, home)
    parent_id = tracking.create_run(
        tracking_uri=tracking_uri,
        home=home,
        experiment=SWEEP_EXPERIMENT,
        run_name=name,
        params={
            "search_space": space.path.name,
            "metric": space.metric,
            "mode": space.mode,
            "seeds": list(space.seeds),
            "max_concurrent": max_concurrent,
            "num_trials": space.num_trials(),
            "searcher": "optuna-tpe" if space.uses_optuna else "grid",
            "plot.x": space.plot.get("x", ""),
            "plot.log_x": bool(space.plot.get("log_x", False)),
        },
        tags={"kind": "sweep", "sweep_name": name, "search_space": space.name},
        config_yaml=space.path.read_text(),
    )
    jobs.write(home, name, {
        "kind": "sweep", "space": space.to_dict(), "parent_run_id": parent_id, "tracking_uri": tracking_uri,
        "address": address, "max_concurrent": max_concurrent, "storage": tracking.storage_root(home),
    })
    fit_sweep(space, name=name, home=home, tracking_uri=tracking_uri, address=address,
              max_concurrent=max_concurrent, parent_id=parent_id, restore=False)
    return parent_id


def experiment_path(home: Path, name: str) -> str:
    """The Tune experiment folder (or URI) of sweep ``name``."""
    return f"{tracking.storage_root(home)}/sweeps/{name}"


def fit_sweep(
    space: SearchSpace,
    *,
    name: str,
    home: Path,
    tracking_uri: str,
    address: str | None,
    max_concurrent: int,
    parent_id: str,
    restore: bool,
) -> None:
    """Run (or, with ``restore``, continue) the Tune experiment; settle the MLflow runs.

    Restoring keeps trial ids (``resume_errored``, not ``restart_errored``): finished trials are
    not run again, unfinished and errored ones continue from their trainers' checkpoints, and the
    search algorithm's state comes back from the experiment folder."""
    from ray import tune

    from orchestrator.launch import init_ray

    client = MlflowClient(tracking_uri)
    ok = False
    try:
        # Per-epoch reports carry losses; the sweep metric comes with the final (evaluated) one.
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
        init_ray(address)
        sweep = {"name": name, "parent_run_id": parent_id, "tracking_uri": tracking_uri, "home": str(home),
                 "storage": tracking.storage_root(home)}
        trainable = tune.with_resources(
            tune.with_parameters(_run_trial, space=space, sweep=sweep),
            # The trial only drives its TorchTrainer; the training workers hold the CPUs. It stays on
            # the head node (on-demand on a cluster): a driver on a spot node that dies would
            # fail its trial instead of letting Ray Train restart the workers elsewhere.
            {"CPU": 0, "memory": 64 * 1024**2, "node:__internal_head__": 0.001},
        )
        path = experiment_path(home, name)
        if restore and tune.Tuner.can_restore(path):
            tuner = tune.Tuner.restore(
                path, trainable=trainable, resume_unfinished=True, resume_errored=True, restart_errored=False
            )
        else:  # the driver died before Tune saved anything: start the experiment afresh
            tuner = tune.Tuner(
                trainable,
                param_space=_param_space(space),
                # metric and mode live on the searcher and the scheduler (Tune refuses them twice).
                tune_config=tune.TuneConfig(
                    search_alg=build_searcher(space) if space.uses_optuna else None,
                    num_samples=space.num_samples if space.uses_optuna else 1,
                    scheduler=build_scheduler(space),
                    max_concurrent_trials=max_concurrent,
                    # A finished trial's actor runs the next trial: no new process and no second
                    # import of torch, MLflow and avlab per trial (its TorchTrainer is new anyway).
                    # Not under a scheduler: a trial it stops is still inside fit() when Tune
                    # resets the actor for the next one, and Tune fails that next trial.
                    reuse_actors=space.scheduler is None,
                ),
                run_config=tune.RunConfig(name=name, storage_path=path.rsplit("/", 1)[0], verbose=1),
            )
        t0 = time.perf_counter()
        results = tuner.fit()
        if not any(m.key == "wall_time_s" for m in client.get_metric_history(parent_id, "wall_time_s")):
            tracking.log_metrics(client, parent_id, {"wall_time_s": time.perf_counter() - t0}, step=0)
        _close_trial_runs(client, parent_id, results)
        errors = [r.error for r in results if r.error is not None]
        ok = not errors
        if errors:
            lines = [line for line in str(errors[0]).splitlines() if line.strip()]
            raise RunFailed(f"sweep {name}: {len(errors)} of {len(results)} trials failed; first: "
                            f"{lines[-1].strip() if lines else type(errors[0]).__name__}")
    finally:
        tracking.end_run(tracking_uri, parent_id, ok=ok)
