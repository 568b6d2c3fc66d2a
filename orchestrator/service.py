"""The jobs avlab starts, as functions of typed arguments: a run, a sweep, and the resume of
either. Each checks its input first (a ConfigError before anything is created), then creates its
MLflow run and job file, trains, and prints its summary; the commands and ``avlab reproduce``
call them."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.errors import ConfigError, Interrupted, RunFailed

if TYPE_CHECKING:
    from orchestrator.config import ExperimentConfig


def start_run(cfg: ExperimentConfig, *, home_arg: str | Path | None = None, tracking_uri: str | None = None,
              address: str | None = None, ray_dashboard: bool = False) -> int:
    """Check, create and run one training run of ``cfg`` to its end; the exit code. Bad input is a
    ConfigError before anything is created; a failed run a RunFailed; Ctrl-C an Interrupted."""
    from orchestrator import jobs, tracking
    from orchestrator.config import dump_yaml
    from orchestrator.drivers import driver_entry

    home = tracking.resolve_home(home_arg)
    uri = tracking.resolve_tracking_uri(home, tracking_uri)
    name = cfg.tracking.run_name or f"{cfg.method_name}-{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    jobs.check_name(name, "tracking.run_name")
    if jobs.exists(home, name):
        # Ray Train would pick up that run's checkpoints under the same name.
        raise ConfigError(f"tracking.run_name: a run or sweep named {name!r} already exists in {home}; "
                          f"`avlab resume {name}` continues it, or choose another name")
    checked = preflight(cfg, home=home, address=address)
    home.mkdir(parents=True, exist_ok=True)
    tracking.prepare_store(uri)
    print(f"[avlab] run {name}: method={cfg.method_name} preset={cfg.preset} "
          f"workers={cfg.resources.workers} gpu={cfg.resources.gpu}", flush=True)
    with jobs.reserved(home, name, "run", "tracking.run_name"):  # of two runs given one name, one starts
        run_id = tracking.create_run(
            tracking_uri=uri,
            home=home,
            experiment=cfg.tracking.experiment,
            run_name=name,
            params=cfg.flat(),
            tags={
                "method": cfg.method_name,
                "preset": cfg.preset,
                "run_identity": cfg.identity(),
                "run_name": name,
                "kind": "run",
            },
            config_yaml=dump_yaml(cfg),
        )
        storage = tracking.storage_root(home)
        jobs.write(home, jobs.JobRecord(kind="run", name=name, run_id=run_id, tracking_uri=uri, config=cfg.to_dict(),
                                        address=address, storage=storage, driver=driver_entry()))
    return _execute_run(cfg, name=name, run_id=run_id, uri=uri, address=address, storage=storage,
                        init_checkpoint=checked.init_checkpoint, ray_dashboard=ray_dashboard)


@dataclass(frozen=True)
class Preflight:
    """What ``preflight`` found, for the launch to use instead of finding it again:
    ``init_checkpoint``, the verified checkpoint folder ``train.init_from`` names ("" for none),
    and for a local run the memory budget per worker the run was checked against."""

    init_checkpoint: str
    per_worker_bytes: int | None = None


def preflight(cfg: ExperimentConfig, *, home: Path, address: str | None) -> Preflight:
    """Everything a run is checked for before anything is created (ConfigError, exit 2): this
    machine's CPUs, GPUs and memory for a local run (the Ray cluster answering otherwise), the
    ``train.init_from`` checkpoint, and a real dataset's files, decoded into the feature cache
    that the workers then read."""
    from orchestrator.checkpoint import init_checkpoint

    budget = None
    if address is None:
        from orchestrator.footprint import check_fits, local_budget
        from orchestrator.launch import check_local_resources

        check_local_resources(cfg.resources)
        budget, where = local_budget(cfg)
        check_fits(cfg, per_worker_bytes=budget, where=where)  # a run that cannot fit stops here
    else:
        from orchestrator.launch import check_ray_address

        check_ray_address(address)
    init = init_checkpoint(cfg.train.init_from, home)  # a bad path or run name stops here
    if cfg.data.manifest and address is None:
        # A local run decodes its dataset into the feature cache first, so an unusable file stops
        # it with exit 2 before Ray, MLflow or training start; the workers then reuse the cache.
        from methods.data.decode import DataError
        from methods.data.real import ManifestAV

        try:
            ManifestAV(cfg.data).cache
        except DataError as exc:
            raise ConfigError(f"data.manifest: {str(exc).splitlines()[0]}") from None
    return Preflight(init_checkpoint=init, per_worker_bytes=budget)


def _ui_hint(uri: str) -> str:
    """The command that shows ``uri``: ``avlab ui`` for a local store, the server itself otherwise."""
    if uri.startswith(("http://", "https://")):
        return uri
    avlab = Path(sys.executable).parent / "avlab"
    if not uri.startswith("sqlite:///"):  # a database of its own: the UI on it, wherever the home is
        return f"{avlab} ui --tracking-uri {uri}"
    home = uri.removeprefix("sqlite:///").removesuffix("/mlflow.db")
    return f"{avlab} ui --home {home}"


@contextlib.contextmanager
def _one_line_when_ray_stops(kind: str, name: str):
    """Ray stopped underneath a job (its raylet or GCS killed, the node lost): one line that says
    so and how to continue, instead of Ray's traceback. The job's checkpoints are intact."""
    try:
        yield
    except Exception as exc:
        from ray.exceptions import RayActorError, RaySystemError

        if not isinstance(exc, (RayActorError, RaySystemError)):
            raise
        lines = str(exc).strip().splitlines()
        raise RunFailed(f"Ray stopped under {kind} {name} ({type(exc).__name__}: {lines[0] if lines else ''}); "
                        f"`avlab resume {name}` continues it from its last checkpoint") from None


def _execute_run(cfg: ExperimentConfig, *, name: str, run_id: str, uri: str, address: str | None, storage: str,
                 init_checkpoint: str, ray_dashboard: bool) -> int:
    from orchestrator import tracking
    from orchestrator.launch import launch_run

    ok = interrupted = False
    try:
        with _one_line_when_ray_stops("run", name):
            metrics = launch_run(cfg, name=name, run_id=run_id, tracking_uri=uri, address=address, storage=storage,
                                 init_checkpoint=init_checkpoint, ray_dashboard=ray_dashboard)
        ok = True
    except KeyboardInterrupt:
        # Ctrl-C: stop Ray first (the run's task or workers end with their driver, so nothing logs
        # after this), then mark the run KILLED, not failed: it continues from its last checkpoint.
        import ray
        from mlflow.tracking import MlflowClient

        interrupted = True
        ray.shutdown()
        MlflowClient(uri).set_terminated(run_id, status="KILLED")
        raise Interrupted(f"run {name} interrupted; `avlab resume {name}` continues it from its last checkpoint") from None
    finally:
        if not interrupted:
            tracking.end_run(uri, run_id, ok=ok)
    print(f"[avlab] finished {name} (MLflow run {run_id})")
    from methods.metric_names import HEADLINE_METRICS, OPTIONAL_HEADLINE_METRICS

    for key in (*HEADLINE_METRICS, *OPTIONAL_HEADLINE_METRICS):
        if key in metrics:
            print(f"  {key:<22} {metrics[key]:.4f}")
    print(f"[avlab] see it in MLflow: {_ui_hint(uri)}")
    return 0


def resume(name: str, *, home_arg: str | Path | None = None, tracking_uri: str | None = None,
           address: str | None = None, retry_failed: bool = False, ray_dashboard: bool = False) -> int:
    """Continue a run or sweep whose driver stopped (killed, lost head node) where it stopped; with
    ``retry_failed``, train its failed trials (or the failed run) again. The exit code."""
    from mlflow.tracking import MlflowClient

    from orchestrator import jobs, tracking
    from orchestrator.config import ExperimentConfig

    home = tracking.resolve_home(home_arg)
    jobs.check_name(name, "NAME")
    record = jobs.read(home, name)  # ConfigError -> exit 2
    path = jobs.job_path(home, name)
    uri = tracking.check_tracking_uri(tracking_uri, "--tracking-uri") if tracking_uri else record.tracking_uri
    tracking.check_reachable(uri, "--tracking-uri" if tracking_uri else str(path))
    address = address or record.address
    if address is not None:  # before the MLflow run is touched: a dead cluster leaves it as it was
        from orchestrator.launch import check_ray_address

        recorded = "" if address else f" (from {path})"
        check_ray_address(address, f"--address{recorded}")
    client = MlflowClient(uri)
    kind, run_id = record.kind, record.run_id
    try:
        run = client.get_run(run_id)
    except Exception:  # noqa: BLE001 - MLflow raises several types for a missing run
        raise ConfigError(f"{path}: its MLflow run {run_id} is not in {uri}") from None
    if run.info.status == "FINISHED":
        print(f"[avlab] {kind} {name} already finished (MLflow run {run_id}); nothing to resume")
        return 0
    retry = retry_failed
    failure = tracking.recorded_failure(client, run_id) if kind == "run" else ""
    if failure and not retry:  # deterministic: every attempt would fail the same way, so none starts
        raise RunFailed(f"run {name} failed: {failure}; once fixed, `avlab resume {name} --retry-failed` "
                        "trains it again")
    from orchestrator.search_space import SearchSpace

    try:  # the job file's config or search space, checked again before anything changes
        job = ExperimentConfig.from_dict(record.config) if kind == "run" else SearchSpace.from_dict(record.space)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if address is None:  # this machine may be smaller than the one the job started on
        from orchestrator.launch import check_local_resources

        if kind == "run":
            check_local_resources(job.resources)
        else:
            _check_sweep_resources(job)
    init = ""
    if kind == "run":  # its starting weights (for a run with no checkpoint yet), found before anything changes
        from orchestrator.checkpoint import init_checkpoint

        init = init_checkpoint(job.train.init_from, home)
    if retry:  # after the checks above: a job that cannot start keeps its failures as they were
        from orchestrator.retry import clear_for_retry

        clear_for_retry(client, kind, name, run_id, failure)
    client.update_run(run_id, status="RUNNING")
    jobs.write(home, record.with_driver())  # `avlab stop` finds this process
    tracking.set_tags(client, run_id, {"resumed": str(int(run.data.tags.get("avlab.resumed", "0")) + 1)})
    storage = record.storage or tracking.storage_root(home)  # checkpoints and Tune state stay where they were put
    print(f"[avlab] resuming {kind} {name} (MLflow run {run_id}, was {run.info.status})", flush=True)
    if kind == "run":
        return _execute_run(job, name=name, run_id=run_id, uri=uri, address=address, storage=storage,
                            init_checkpoint=init, ray_dashboard=ray_dashboard)

    from orchestrator.sweep import fit_sweep

    t0 = time.perf_counter()
    with _one_line_when_ray_stops("sweep", name):
        fit_sweep(job, name=name, home=home, tracking_uri=uri, address=address,
                  max_concurrent=record.max_concurrent, parent_id=run_id, restore=True,
                  reuse_trials=record.reuse_trials, reuse_any_environment=record.reuse_any_environment,
                  storage=storage, ray_dashboard=ray_dashboard, dry_run_s=record.dry_run_s)
    _finish_sweep(client, name, home, uri, time.perf_counter() - t0, job, dry_run=record.dry_run_s is not None)
    return 0


def _finish_sweep(client, name: str, home: Path, uri: str, seconds: float, space, *, dry_run: bool = False) -> None:
    if dry_run:  # nothing trained: where the trials ran, checked against what they asked for
        from orchestrator.dry_run import finish
        from orchestrator.runs import find_sweep_run

        found = finish(client, name, find_sweep_run(client, name).info.run_id)
        print(f"[avlab] dry run {name} finished in {seconds:.0f} s; see it in MLflow: {_ui_hint(uri)}")
        if found:
            raise RunFailed(f"dry run {name}: {len(found)} placement problem{'s' * (len(found) != 1)}: the "
                            "cluster did not place the trials as they asked (listed above)")
        return
    from orchestrator.optuna_store import save_study
    from orchestrator.report import build_report, to_markdown, write_report

    paths = write_report(client, name, home / "reports" / name)
    report = build_report(client, name)
    study = save_study(client, home, name, space, report["parent_run_id"])
    print()
    print(to_markdown(report))
    print(f"[avlab] sweep {name} finished in {seconds:.0f} s; report: {paths['markdown']}, plot: {paths['png']}")
    print(f"[avlab] see it in MLflow: {_ui_hint(uri)}")
    if study:
        print(f"[avlab] the Optuna study {name}: optuna-dashboard {study}")


def _check_sweep_resources(space) -> None:
    """Every configuration of a local sweep fits this machine's CPUs, GPUs and memory."""
    from orchestrator.footprint import check_fits, local_budget
    from orchestrator.launch import check_local_resources

    configs = {cfg.identity(): cfg for cfg in (space.config_for(p, space.seeds[0]) for p in space.grid_points())}
    for cfg in configs.values():
        try:
            check_local_resources(cfg.resources)
            budget, where = local_budget(cfg)
            check_fits(cfg, per_worker_bytes=budget, where=where)
        except ConfigError as exc:
            raise ConfigError(f"{space.path.name}: {exc}") from None


def start_sweep(search_space: str | Path, *, seeds: int | None = None, preset: str | None = None,
                overrides: Sequence[str] = (), name: str | None = None, home_arg: str | Path | None = None,
                tracking_uri: str | None = None, address: str | None = None, max_concurrent: int | None = None,
                reuse_trials: bool = False, reuse_any_environment: bool = False,
                ray_dashboard: bool = False, dry_run_s: float | None = None) -> int:
    """Check, create and run the sweep of ``search_space`` to its end, then write its report; the
    exit code. ``reuse_any_environment``: reused trials may come from another environment.
    ``dry_run_s``: the trials train nothing, hold their resources that long and record where
    they ran (``orchestrator.dry_run``); the end prints that instead of a report."""
    from orchestrator.search_space import load_search_space
    from orchestrator.sweep import check_supported

    space = load_search_space(search_space, seeds=seeds).with_overrides(preset, list(overrides))
    reuse = reuse_trials
    if reuse_any_environment and not reuse:
        raise ConfigError("--reuse-across-environments: it widens --reuse-trials; add --reuse-trials")
    from orchestrator.dry_run import check_seconds

    dry_run_s = check_seconds(dry_run_s)
    if dry_run_s is not None and reuse:
        raise ConfigError("--reuse-trials: a dry run trains nothing and takes nothing; drop one of them")
    check_supported(space, reuse_trials=reuse)
    if address is None:
        _check_sweep_resources(space)
    else:
        from orchestrator.launch import check_ray_address

        check_ray_address(address)
    max_concurrent = max_concurrent or space.max_concurrent
    if max_concurrent < 1:
        raise ConfigError(f"--max-concurrent: must be >= 1, got {max_concurrent}")

    from orchestrator import jobs, tracking
    from orchestrator.runs import find_sweep_run
    from orchestrator.sweep import run_sweep

    home = tracking.resolve_home(home_arg)
    uri = tracking.resolve_tracking_uri(home, tracking_uri)
    dry = "-dry-run" if dry_run_s is not None else ""
    name = name or f"{space.name}{dry}-{time.strftime('%Y%m%d-%H%M%S')}"
    jobs.check_name(name, "--name")
    from orchestrator.checkpoint import resolve_init

    for init in {space.config_for(p, space.seeds[0]).train.init_from for p in space.grid_points()} - {""}:
        resolve_init(init, home)  # every trial's starting weights exist before anything starts
    if jobs.exists(home, name):
        raise ConfigError(f"--name: a run or sweep named {name!r} already exists in {home}; "
                          f"`avlab resume {name}` continues it, or choose another name")
    home.mkdir(parents=True, exist_ok=True)
    tracking.prepare_store(uri)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    if find_sweep_run(client, name) is not None:
        raise ConfigError(f"--name: a sweep named {name!r} already exists; choose another name")
    print(f"[avlab] {'dry run of ' if dry else ''}sweep {name}: {space.num_trials()} trials "
          f"({space.num_configurations()} configurations x {len(space.seeds)} seeds), "
          f"metric {space.metric} ({space.mode})"
          + (f", chosen on {space.chosen(space.metric)}" if space.selects else "")
          + f", max {max_concurrent} at once", flush=True)
    t0 = time.perf_counter()
    with _one_line_when_ray_stops("sweep", name), jobs.reserved(home, name, "sweep", "--name"):
        run_sweep(space, name=name, home=home, tracking_uri=uri, address=address, max_concurrent=max_concurrent,
                  reuse_trials=reuse, reuse_any_environment=reuse_any_environment, ray_dashboard=ray_dashboard,
                  dry_run_s=dry_run_s)
    _finish_sweep(client, name, home, uri, time.perf_counter() - t0, space, dry_run=dry_run_s is not None)
    return 0

