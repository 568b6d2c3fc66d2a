"""``avlab sweep``: a Ray Tune ``Tuner`` over a search space.

The driver side: an MLflow parent run, the Tuner (grids through Tune's ``grid_search`` over
configurations x seeds; distributions through ``OptunaSearch`` with a seeded TPE sampler), each
trial's resources, and the settling of the child runs when Tune returns or is stopped. What runs
inside a trial is ``orchestrator.trial``.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from orchestrator import jobs, tracking
from orchestrator.errors import ConfigError, Interrupted, RunFailed
from orchestrator.drivers import driver_entry

from orchestrator.runs import SWEEP_EXPERIMENT, children
from orchestrator.search_space import SearchSpace, grid_trials, trial_params


def trial_resources(space: SearchSpace, config: dict[str, Any]):
    """What one trial holds. A single-worker trial trains in its own process: its worker's CPUs
    and GPU share. A multi-worker trial only drives its TorchTrainer (the workers hold the
    resources); it stays on the head node (on-demand on a cluster): a driver on a spot node that
    dies would fail its trial instead of letting Ray Train restart the workers elsewhere."""
    from ray.tune import PlacementGroupFactory


    return PlacementGroupFactory(trial_bundles(space.config_for(*trial_params(space, config)).resources))


def trial_bundles(res) -> list[dict[str, float]]:
    if res.workers == 1:
        return [{"CPU": res.cpus_per_worker, **({"GPU": res.gpu_share} if res.gpu else {})}]
    return [{"CPU": 0, "memory": 64 * 1024**2, "node:__internal_head__": 0.001}]


def _param_space(space: SearchSpace) -> dict[str, Any]:
    from ray import tune

    if not space.uses_optuna:

        return {"trial": tune.grid_search([trial.key for trial in space.trials()])}
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
            if all(m in result for m in (self.metric if isinstance(self.metric, list) else [self.metric])):
                super().on_trial_result(trial_id, result)

    # It chooses, so it reads each objective on the validation split (``space.chosen``).
    if space.objectives:  # several objectives: Optuna's multi-objective TPE
        metrics, modes = [space.chosen(m) for m, _ in space.objectives], [d for _, d in space.objectives]
        return FinalMetricOptunaSearch(metric=metrics, mode=modes, sampler=optuna.samplers.TPESampler(seed=seed))
    return FinalMetricOptunaSearch(
        metric=space.chosen(space.metric), mode=space.mode, sampler=optuna.samplers.TPESampler(seed=seed)
    )


def check_supported(space: SearchSpace, *, reuse_trials: bool = False) -> None:
    if reuse_trials and space.scheduler is not None:
        raise ConfigError("--reuse-trials: not with a scheduler (it decides on each epoch's report as trials train)")
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
        metric = space.chosen(sched.get("metric", scheduler_metric(space)))
        cfg = space.first_config()
        if cfg.eval.every_epochs < 1:
            raise ConfigError(f"{space.path.name}: scheduler: needs eval.every_epochs >= 1 in the base config, "
                              "so trials report a kNN accuracy while they train")
        from methods.metric_names import metric_names
        from methods.evaluate.suite import quick_probe_config

        # What the quick probe measures on the validation split while trials train (accuracies:
        # higher is better); a space written before that read the test split and resumes so.
        probed = metric_names(quick_probe_config(cfg.eval), prefix=space.choose_on)
        if metric not in probed:
            raise ConfigError(f"{space.path.name}: scheduler.metric: must be one of {', '.join(probed)}, "
                              "the metrics measured during pretraining")


def scheduler_metric(space: SearchSpace) -> str:
    """The quick probe's accuracy of the metric's modality, on the split the space chooses on."""
    plain = space.metric.removeprefix(space.choose_on)
    return space.chosen("sound_h_knn_acc" if plain.startswith("sound") else "image_h_knn_acc")


def build_scheduler(space: SearchSpace):
    """ASHA on the kNN accuracy measured every ``eval.every_epochs`` (one Tune iteration = one epoch)."""
    if space.scheduler is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    sched = space.scheduler
    epochs = space.first_config().train.epochs
    return ASHAScheduler(
        time_attr="training_iteration",
        metric=space.chosen(sched.get("metric", scheduler_metric(space))),
        mode=space.mode,
        max_t=epochs + 1,  # + the final evaluation report
        grace_period=sched.get("grace_period", 2),
        reduction_factor=sched.get("reduction_factor", 2),
        stop_last_trials=False,  # a trial that reached max_t finishes its own evaluation and run
    )


def _close_trial_runs(client: MlflowClient, parent_id: str, results) -> list[str]:
    """Settle each child run's status from Tune's view of its trial; return the lines of the
    trials that a deterministic error ended (Tune saw them return).

    A trial that a scheduler stopped never reaches its ``finally`` (or reaches it through the
    stop's exception): without an error in Tune it was stopped early (KILLED, tagged), unless it
    had logged its final evaluation (``eval_time_s``), in which case it finished."""
    errored = {(r.metrics or {}).get("trial_id") for r in results if r.error is not None}
    unknown_errors = None in errored  # an errored trial that never reported: trust FAILED runs
    failed = []
    for run in children(client, parent_id):
        status = run.info.status
        line = run.data.tags.get(f"{tracking.TAG_PREFIX}{tracking.FAILED_TAG}")
        if line:
            if status != "FAILED":
                client.set_terminated(run.info.run_id, status="FAILED")
            if run.data.tags.get("avlab.trial_id") not in errored:
                failed.append(f"trial {run.data.tags.get('avlab.trial_id', '?')}: {line}")
            continue
        if status == "FINISHED" or run.data.tags.get("avlab.trial_id") in errored or (
            unknown_errors and status == "FAILED"
        ):
            if status == "RUNNING":
                client.set_terminated(run.info.run_id, status="FAILED")
            continue
        if tracking.ran_to_end(run):
            client.set_terminated(run.info.run_id, status="FINISHED")
        else:
            client.set_tag(run.info.run_id, "avlab.stopped_early", "true")
            client.set_terminated(run.info.run_id, status="KILLED")
    return failed


def _interrupted(client: MlflowClient, parent_id: str, name: str, expected: int) -> Interrupted:
    """After Ctrl-C: stop Ray (the trials' actors end with their driver, so none settles its run
    after this), then settle the child runs of the trials it stopped (none with a recorded
    failure): one that had logged its evaluation is FINISHED (``avlab resume`` reports it without
    running it again), the others are KILLED, not failed, and continue from their checkpoints."""
    import ray

    ray.shutdown()
    for run in children(client, parent_id):
        if run.info.status == "FINISHED" or run.data.tags.get(f"{tracking.TAG_PREFIX}{tracking.FAILED_TAG}"):
            continue
        client.set_terminated(run.info.run_id, status="FINISHED" if tracking.ran_to_end(run) else "KILLED")
    ended = sum(r.info.status in ("FINISHED", "FAILED") for r in children(client, parent_id))
    return Interrupted(f"sweep {name} interrupted with {ended} of {expected} trials ended; `avlab resume {name}` continues it")


def describe(space: SearchSpace) -> str:
    """The parent run's description until the report replaces it: what the sweep varies and
    what it optimises, where the MLflow UI shows it first."""
    varied = [*space.grid, *space.search, *(k for v in space.variants.values() for k in v)]
    lines = [f"**{space.name}**: {space.description}".rstrip(": "), "",
             "- " + ("metrics" if space.objectives else "metric") + ": "
             + ", ".join(f"`{m}` ({d})" for m, d in space.all_objectives),
             f"- varied: {', '.join(f'`{k}`' for k in dict.fromkeys(varied))}"]
    if space.variants:
        lines.append(f"- variants: {', '.join(space.variants)}")
    if space.selects:
        lines.append(f"- chosen on the validation split (`{space.chosen(space.metric)}`); the test split only reports")
    lines.append(f"- {space.num_trials()} trials, seeds {', '.join(map(str, space.seeds))}")
    return "\n".join(lines) + "\n"


def run_sweep(
    space: SearchSpace,
    *,
    name: str,
    home: Path,
    tracking_uri: str,
    address: str | None,
    max_concurrent: int,
    reuse_trials: bool = False,
    reuse_any_environment: bool = False,
    ray_dashboard: bool = False,
    dry_run_s: float | None = None,
) -> str:
    """Create the sweep's parent run and job file, then run the whole sweep; return the parent id.
    With ``reuse_trials``, a trial identical to a finished trial of another sweep takes its results
    (computed in any environment with ``reuse_any_environment``). With ``dry_run_s``, the trials
    train nothing and record where they ran (``orchestrator.dry_run``)."""
    storage = tracking.storage_root(home)
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
            # What the search or scheduler chose on: the metric on the validation split ("" for a grid).
            "chosen_on": space.chosen(space.metric) if space.selects else "",
            "seeds": list(space.seeds),
            "max_concurrent": max_concurrent,
            "num_trials": space.num_trials(),
            "searcher": "optuna-tpe" if space.uses_optuna else "grid",
            "objectives": ",".join(f"{m}:{d}" for m, d in space.all_objectives),
            "plot.x": space.plot.get("x", ""),
            "plot.log_x": bool(space.plot.get("log_x", False)),
        },
        tags={"kind": "sweep", "sweep_name": name, "search_space": space.name,
              **({"dry_run": "true"} if dry_run_s is not None else {})},
        config_yaml=space.path.read_text(),
    )
    client.set_tag(parent_id, "mlflow.note.content", describe(space))
    jobs.write(home, jobs.JobRecord(
        kind="sweep", name=name, run_id=parent_id, tracking_uri=tracking_uri, space=space.to_dict(),
        max_concurrent=max_concurrent, reuse_trials=reuse_trials, reuse_any_environment=reuse_any_environment,
        address=address, storage=storage, driver=driver_entry(), dry_run_s=dry_run_s,
    ))
    fit_sweep(space, name=name, home=home, tracking_uri=tracking_uri, address=address, max_concurrent=max_concurrent,
              parent_id=parent_id, restore=False, reuse_trials=reuse_trials,
              reuse_any_environment=reuse_any_environment, storage=storage,
              ray_dashboard=ray_dashboard, dry_run_s=dry_run_s)
    return parent_id


def _tuner(space: SearchSpace, trainable: Any, path: str, *, name: str, restore: bool, max_concurrent: int) -> Any:
    """The sweep's Tuner: restored from its experiment folder, or new (the driver died before
    Tune saved anything, or this is the first start)."""
    from ray import tune

    if restore and tune.Tuner.can_restore(path):
        return tune.Tuner.restore(
            path, trainable=trainable, resume_unfinished=True, resume_errored=True, restart_errored=False
        )
    return tune.Tuner(
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
            # Under a scheduler only for one-worker trials: a trial it stops waits in Tune's
            # report, which ends its thread at once; a multi-worker trial stopped is still
            # inside fit() when Tune resets the actor for the next one, and Tune fails that one.
            reuse_actors=space.scheduler is None or space.first_config().resources.workers == 1,
        ),
        run_config=tune.RunConfig(
            name=name, storage_path=path.rsplit("/", 1)[0], verbose=1,
            failure_config=tune.FailureConfig(max_failures=space.first_config().train.max_failures),
        ),
    )


def _settle(client: MlflowClient, parent_id: str, name: str, results: Any, trials: int) -> bool:
    """Close the trials' child runs; True when every trial succeeded, else RunFailed with the
    first failure's line (``trials``: how many the sweep has; a retried trial is in ``results``
    twice)."""
    failed = _close_trial_runs(client, parent_id, results)
    errors = [r.error for r in results if r.error is not None]
    if not errors and not failed:
        return True
    if errors:
        lines = [line for line in str(errors[0]).splitlines() if line.strip()]
        first = lines[-1].strip() if lines else type(errors[0]).__name__
    else:
        first = failed[0]
    them = "them" if len(failed) > 1 else "it"
    retry = f"; once fixed, `avlab resume {name} --retry-failed` trains {them} again" if failed else ""
    raise RunFailed(f"sweep {name}: {len(errors) + len(failed)} of {trials} trials failed; "
                    f"first: {first}{retry}")


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
    reuse_trials: bool = False,
    reuse_any_environment: bool = False,
    storage: str | None = None,
    ray_dashboard: bool = False,
    dry_run_s: float | None = None,
) -> None:
    """Run (or, with ``restore``, continue) the Tune experiment; settle the MLflow runs. Its
    checkpoints and Tune state go under ``storage`` (default ``tracking.storage_root(home)``;
    a resumed sweep's is the one its job record names).

    Restoring keeps trial ids (``resume_errored``, not ``restart_errored``): finished trials are
    not run again, unfinished and errored ones continue from their checkpoints, and the search
    algorithm's state comes back from the experiment folder. A trial whose process or node is lost
    is restarted from its checkpoint up to ``train.max_failures`` times (the base config's)."""
    from ray import tune

    from orchestrator.launch import init_ray, watching_node
    from orchestrator.runs import settle
    from orchestrator.trial import SweepContext, run_trial

    client = MlflowClient(tracking_uri)
    ok = interrupted = False
    expected = space.num_samples if space.uses_optuna else len(grid_trials(space))
    try:
        # Per-epoch reports carry losses; the sweep metric comes with the final (evaluated) one.
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
        # Ctrl-C raises KeyboardInterrupt here: Tune's handler would end fit() as if the sweep had
        # finished, and may count the trials it stopped as terminated.
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        # A single-worker trial trains in its Tune actor: it keeps the sweep's working directory
        # (relative paths in a config, such as a manifest, mean what they mean to the driver)
        # instead of Tune's trial folder.
        os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
        init_ray(address, dashboard=ray_dashboard)
        storage = storage or tracking.storage_root(home)
        sweep = SweepContext(name=name, parent_run_id=parent_id, tracking_uri=tracking_uri, home=str(home),
                             storage=storage, driver=secrets.token_hex(6), reuse_trials=reuse_trials,
                             reuse_any_environment=reuse_any_environment, dry_run_s=dry_run_s)
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, space=space, sweep=sweep),
            lambda config: trial_resources(space, config),
        )
        tuner = _tuner(space, trainable, tracking.experiment_path(storage, name), name=name, restore=restore,
                       max_concurrent=max_concurrent)
        t0 = time.perf_counter()
        try:
            with watching_node("sweep", name, lambda: settle(tracking_uri, "sweep", parent_id, status="FAILED")):
                results = tuner.fit()
        except KeyboardInterrupt:
            results = None
        if results is None or results.num_terminated + results.num_errors < expected:
            # Ctrl-C (Tune's own handler is off, so it reaches us; Tune's experiment state is
            # saved as it goes, as for a lost driver). The sweep is not over: its unfinished
            # trials continue from their checkpoints on resume.
            interrupted = True
            raise _interrupted(client, parent_id, name, expected)
        results = list(results)
        from orchestrator.retry import RETRY_TAG, retry_pending, retry_tuner

        if retries := retry_pending(client, parent_id):  # `--retry-failed`, or a retry interrupted
            print(f"[avlab] sweep {name}: retrying {len(retries)} failed trial{'s' * (len(retries) != 1)}", flush=True)
            try:
                with watching_node("sweep", name, lambda: settle(tracking_uri, "sweep", parent_id, status="FAILED")):
                    again = retry_tuner(space, trainable, retries, storage=storage, name=name,
                                         max_concurrent=max_concurrent).fit()
            except KeyboardInterrupt:
                again = None
            if again is None or again.num_terminated + again.num_errors < len(retries):
                interrupted = True  # the trials left keep their retry mark: the next resume retries them
                raise _interrupted(client, parent_id, name, expected)
            results += list(again)
            for run in retries:  # ended now, FINISHED or FAILED again: nothing left to retry
                client.delete_tag(run.info.run_id, f"{tracking.TAG_PREFIX}{RETRY_TAG}")
        if not any(m.key == "wall_time_s" for m in client.get_metric_history(parent_id, "wall_time_s")):
            tracking.log_metrics(client, parent_id, {"wall_time_s": time.perf_counter() - t0}, step=0)
        ok = _settle(client, parent_id, name, results, expected)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM while Ray starts or the Tuner is built
        interrupted = True
        raise _interrupted(client, parent_id, name, expected) from None
    finally:
        if interrupted:
            client.set_terminated(parent_id, status="KILLED")
        else:
            tracking.end_run(tracking_uri, parent_id, ok=ok)
