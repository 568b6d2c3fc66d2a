"""The ``avlab`` command line.

Exit codes: 0 success; 2 bad input (config, run file, override), reported in one line that names
the field, before Ray starts or an MLflow run is created; 1 anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

# The config (and with it torch, torchvision, scikit-learn) is imported by the commands that
# need it, so `--help`, `status`, `report` and `ui` start in a fraction of the time.
from orchestrator import data_commands
from orchestrator.errors import ConfigError, Interrupted, RunFailed

if TYPE_CHECKING:
    from orchestrator.config import ExperimentConfig

EXIT_BAD_INPUT = 2


def _split_run_args(items: Sequence[str]) -> tuple[str | None, list[str]]:
    """First item without '=' is the run file; the rest are key.path=value overrides."""
    run_file, overrides = None, []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif run_file is None:
            run_file = item
        else:
            raise ConfigError(f"arguments: unexpected {item!r}; overrides are key.path=value")
    return run_file, overrides


def resolve_run_config(args: argparse.Namespace) -> ExperimentConfig:
    from orchestrator.config import load_run_file, resolve

    run_file, overrides = _split_run_args(args.items)
    run = load_run_file(run_file) if run_file else {}
    if args.workers is not None:
        overrides.append(f"resources.workers={args.workers}")
    if args.gpu:
        overrides.append("resources.gpu=true")
    return resolve(run, preset=args.preset, overrides=overrides)


def cmd_run(args: argparse.Namespace) -> int:
    cfg = resolve_run_config(args)  # ConfigError -> exit 2, nothing started yet

    from orchestrator import jobs, tracking
    from orchestrator.config import dump_yaml
    from orchestrator.drivers import driver_entry

    home = tracking.resolve_home(args.home)
    uri = tracking.resolve_tracking_uri(home, args.tracking_uri)
    name = cfg.tracking.run_name or f"{cfg.method_name}-{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    jobs.check_name(name, "tracking.run_name")
    if args.address is None:
        from orchestrator.footprint import check_fits, local_budget
        from orchestrator.launch import check_local_resources

        check_local_resources(cfg.resources)
        budget, where = local_budget(cfg)
        check_fits(cfg, per_worker_bytes=budget, where=where)  # a run that cannot fit stops here
    else:
        from orchestrator.launch import check_ray_address

        check_ray_address(args.address)
    if cfg.train.init_from:
        from orchestrator.checkpoint import resolve_init

        resolve_init(cfg.train.init_from, home)  # a bad path or run name stops here, exit 2
    if jobs.exists(home, name):
        # Ray Train would pick up that run's checkpoints under the same name.
        raise ConfigError(f"tracking.run_name: a run or sweep named {name!r} already exists in {home}; "
                          f"`avlab resume {name}` continues it, or choose another name")
    if cfg.data.manifest and args.address is None:
        # A local run decodes its dataset into the feature cache first, so an unusable file stops
        # it with exit 2 before Ray, MLflow or training start; the workers then reuse the cache.
        from methods.data.decode import DataError
        from methods.data.real import ManifestAV

        try:
            ManifestAV(cfg.data).cache
        except DataError as exc:
            raise ConfigError(f"data.manifest: {str(exc).splitlines()[0]}") from None
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
        jobs.write(home, name, {"kind": "run", "config": cfg.to_dict(), "mlflow_run_id": run_id,
                                "tracking_uri": uri, "address": args.address, "storage": tracking.storage_root(home),
                                "driver": driver_entry()})
    return _execute_run(cfg, name=name, run_id=run_id, uri=uri, home=home, address=args.address)


def _ui_hint(uri: str) -> str:
    """The command that shows ``uri``: ``avlab ui`` for a local store, the server itself otherwise."""
    if uri.startswith(("http://", "https://")):
        return uri
    home = uri.removeprefix("sqlite:///").removesuffix("/mlflow.db")
    return f"{Path(sys.executable).parent / 'avlab'} ui --home {home}"


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


def _execute_run(cfg: ExperimentConfig, *, name: str, run_id: str, uri: str, home: Path, address: str | None) -> int:
    from orchestrator import tracking
    from orchestrator.launch import launch_run

    ok = interrupted = False
    try:
        with _one_line_when_ray_stops("run", name):
            metrics = launch_run(cfg, name=name, run_id=run_id, tracking_uri=uri, home=home, address=address)
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


def cmd_resume(args: argparse.Namespace) -> int:
    """Continue a run or sweep whose driver stopped (killed, lost head node) where it stopped."""
    from mlflow.tracking import MlflowClient

    from orchestrator import jobs, tracking
    from orchestrator.config import ExperimentConfig

    home = tracking.resolve_home(args.home)
    jobs.check_name(args.name, "NAME")
    manifest = jobs.read(home, args.name)  # ConfigError -> exit 2
    uri = tracking.check_tracking_uri(args.tracking_uri, "--tracking-uri") if args.tracking_uri else manifest["tracking_uri"]
    tracking.check_reachable(uri, "--tracking-uri" if args.tracking_uri else str(jobs.manifest_path(home, args.name)))
    address = args.address or manifest.get("address")
    if address is not None:  # before the MLflow run is touched: a dead cluster leaves it as it was
        from orchestrator.launch import check_ray_address

        recorded = "" if args.address else f" (from {jobs.manifest_path(home, args.name)})"
        check_ray_address(address, f"--address{recorded}")
    client = MlflowClient(uri)
    kind, name = manifest["kind"], args.name
    run_id = manifest["mlflow_run_id"] if kind == "run" else manifest["parent_run_id"]
    try:
        run = client.get_run(run_id)
    except Exception:  # noqa: BLE001 - MLflow raises several types for a missing run
        raise ConfigError(f"{jobs.manifest_path(home, name)}: its MLflow run {run_id} is not in {uri}") from None
    if run.info.status == "FINISHED":
        print(f"[avlab] {kind} {name} already finished (MLflow run {run_id}); nothing to resume")
        return 0
    retry = bool(getattr(args, "retry_failed", False))
    failure = tracking.recorded_failure(client, run_id) if kind == "run" else ""
    if failure and not retry:  # deterministic: every attempt would fail the same way, so none starts
        raise RunFailed(f"run {name} failed: {failure}; once fixed, `avlab resume {name} --retry-failed` "
                        "trains it again")
    from orchestrator.search_space import SearchSpace

    try:  # the job file's config or search space, checked again before anything changes
        job = ExperimentConfig.from_dict(manifest["config"]) if kind == "run" else SearchSpace.from_dict(manifest["space"])
    except ConfigError as exc:
        raise ConfigError(f"{jobs.manifest_path(home, name)}: {exc}") from None
    if address is None:  # this machine may be smaller than the one the job started on
        from orchestrator.launch import check_local_resources

        if kind == "run":
            check_local_resources(job.resources)
        else:
            _check_sweep_resources(job)
    if retry:  # after the checks above: a job that cannot start keeps its failures as they were
        from orchestrator.retry import clear_for_retry

        clear_for_retry(client, kind, name, run_id, failure)
    client.update_run(run_id, status="RUNNING")
    from orchestrator.drivers import driver_entry

    jobs.write(home, name, {**{k: v for k, v in manifest.items() if k not in ("format", "name")},
                            "driver": driver_entry()})  # `avlab stop` finds this process
    tracking.set_tags(client, run_id, {"resumed": str(int(run.data.tags.get("avlab.resumed", "0")) + 1)})
    if manifest.get("storage"):  # checkpoints and Tune state are where the job first put them
        os.environ["AVLAB_STORAGE"] = manifest["storage"]
    print(f"[avlab] resuming {kind} {name} (MLflow run {run_id}, was {run.info.status})", flush=True)
    if kind == "run":
        return _execute_run(job, name=name, run_id=run_id, uri=uri, home=home, address=address)

    from orchestrator.sweep import fit_sweep

    t0 = time.perf_counter()
    with _one_line_when_ray_stops("sweep", name):
        fit_sweep(job, name=name, home=home, tracking_uri=uri, address=address,
                  max_concurrent=manifest["max_concurrent"], parent_id=run_id, restore=True,
                  reuse_trials=bool(manifest.get("reuse_trials", False)))
    _finish_sweep(client, name, home, uri, time.perf_counter() - t0, job)
    return 0


def _finish_sweep(client, name: str, home: Path, uri: str, seconds: float, space) -> None:
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


def cmd_sweep(args: argparse.Namespace) -> int:
    from orchestrator.search_space import load_search_space
    from orchestrator.sweep import check_supported

    space = load_search_space(args.search_space, seeds=args.seeds).with_overrides(args.preset, args.overrides)
    reuse = getattr(args, "reuse_trials", False)
    check_supported(space, reuse_trials=reuse)
    if args.address is None:
        _check_sweep_resources(space)
    else:
        from orchestrator.launch import check_ray_address

        check_ray_address(args.address)
    max_concurrent = args.max_concurrent or space.max_concurrent
    if max_concurrent < 1:
        raise ConfigError(f"--max-concurrent: must be >= 1, got {max_concurrent}")

    from orchestrator import jobs, tracking
    from orchestrator.sweep import find_sweep_run, run_sweep

    home = tracking.resolve_home(args.home)
    uri = tracking.resolve_tracking_uri(home, args.tracking_uri)
    name = args.name or f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
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
    print(f"[avlab] sweep {name}: {space.num_trials()} trials ({space.num_configurations()} configurations x "
          f"{len(space.seeds)} seeds), metric {space.metric} ({space.mode}), max {max_concurrent} at once", flush=True)
    t0 = time.perf_counter()
    with _one_line_when_ray_stops("sweep", name), jobs.reserved(home, name, "sweep", "--name"):
        run_sweep(space, name=name, home=home, tracking_uri=uri, address=args.address, max_concurrent=max_concurrent,
                  reuse_trials=reuse)
    _finish_sweep(client, name, home, uri, time.perf_counter() - t0, space)
    return 0


def _client(args: argparse.Namespace):
    from orchestrator import tracking

    home = tracking.resolve_home(args.home)
    uri = tracking.resolve_tracking_uri(home, args.tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise ConfigError(f"--home: no avlab store at {home}")
    return home, tracking.open_store(uri)


def cmd_report(args: argparse.Namespace) -> int:
    import json

    from orchestrator.report import build_report, to_markdown, to_table, write_report

    home, client = _client(args)
    report = build_report(client, args.name)
    if args.out:
        paths = write_report(client, args.name, Path(args.out))
        print(f"[avlab] wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    if args.format == "json":
        print(json.dumps(report, indent=2, sort_keys=True))
    elif args.format == "markdown":
        print(to_markdown(report))
    else:
        print(to_table(report))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from orchestrator import tracking
    from orchestrator.report import status_lines
    from orchestrator.submit import job_status_lines

    job = job_status_lines(tracking.resolve_home(args.home), args.name)  # a sweep sent by `avlab submit`
    if job is not None:
        print("\n".join(job))
    try:
        _, client = _client(args)
        print("\n".join(status_lines(client, args.name)))
    except ConfigError:
        if job is None:
            raise
        print(f"no trials of {args.name} in this MLflow store yet (the cluster's store may be elsewhere)")
    return 0


RAY_DASHBOARD_HELP = "with a local Ray: also start its dashboard, on 127.0.0.1 (or set AVLAB_RAY_DASHBOARD=1)"


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", default=argparse.SUPPRESS,
                        help="where runs, checkpoints and mlflow.db live (default: $AVLAB_HOME or ./avlab-runs)")
    common.add_argument("--tracking-uri", default=argparse.SUPPRESS,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite in --home)")
    parser = argparse.ArgumentParser(prog="avlab", description=__doc__.splitlines()[0], parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", parents=[common], help="pretrain one configuration, then evaluate it downstream")
    run.add_argument("items", nargs="*", metavar="[RUN.yaml] [key.path=value ...]",
                     help="an optional YAML run file, then config overrides")
    run.add_argument("--preset", help="tiny (2 CPU cores, minutes; for tests), small (2 CPU cores, minutes; the methods learn) or paper (the papers' sizes)")
    run.add_argument("--workers", type=int, help="DDP training workers (resources.workers)")
    run.add_argument("--gpu", action="store_true", help="one GPU per worker, NCCL (resources.gpu)")
    run.add_argument("--address", help="Ray cluster address (default: start a local Ray instance)")
    run.add_argument("--ray-dashboard", action="store_true", help=RAY_DASHBOARD_HELP)
    run.set_defaults(func=cmd_run)

    sweep = sub.add_parser("sweep", parents=[common], help="run an ablation: a search space on Ray Tune")
    sweep.add_argument("search_space", metavar="SEARCH_SPACE.yaml")
    sweep.add_argument("overrides", nargs="*", metavar="key.path=value", help="applied to every trial")
    sweep.add_argument("--preset", help="replaces the search space's base preset")
    sweep.add_argument("--name", help="sweep name (default: <search space>-<time>)")
    sweep.add_argument("--address", help="Ray cluster address (default: start a local Ray instance)")
    sweep.add_argument("--max-concurrent", type=int, help="trials at once (default: the search space's)")
    sweep.add_argument("--seeds", type=int, help="seeds per configuration (default: the search space's)")
    sweep.add_argument("--reuse-trials", action="store_true",
                       help="a trial whose resolved config and seed equal a finished trial of another sweep in "
                            "the store takes its results instead of training (tagged avlab.reused_from)")
    sweep.add_argument("--ray-dashboard", action="store_true", help=RAY_DASHBOARD_HELP)
    sweep.set_defaults(func=cmd_sweep)

    resume = sub.add_parser("resume", parents=[common],
                            help="continue an interrupted run or sweep where it stopped")
    resume.add_argument("name", metavar="NAME", help="the run's or sweep's name")
    resume.add_argument("--address", help="Ray cluster address (default: the one the job started with)")
    resume.add_argument("--retry-failed", action="store_true",
                        help="train again the trials (or the run) that a deterministic error ended, once its cause "
                             "is fixed: they continue from their last checkpoint; finished trials stay as they are")
    resume.add_argument("--ray-dashboard", action="store_true", help=RAY_DASHBOARD_HELP)
    resume.set_defaults(func=cmd_resume)

    report = sub.add_parser("report", parents=[common], help="an ablation's table and plot")
    report.add_argument("name")
    report.add_argument("--format", choices=("table", "markdown", "json"), default="table")
    report.add_argument("--out", help="also write report.md / report.json / report.png here")
    report.set_defaults(func=cmd_report)

    status = sub.add_parser("status", parents=[common], help="trial states of a sweep and the best so far")
    status.add_argument("name")
    status.set_defaults(func=cmd_status)

    from orchestrator import cluster_files, evaluate_run, export, metrics, reproduce, stop, submit, ui

    reproduce.register(sub, common, ray_dashboard_help=RAY_DASHBOARD_HELP)
    ui.register(sub, common)
    cluster_files.register(sub, common)
    export.register(sub, common)
    evaluate_run.register(sub, common)
    stop.register(sub, common)
    submit.register(sub, common)
    metrics.register(sub, common)
    data_commands.register(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key.path=value overrides may also follow options (argparse stops positionals at them).
    target = {"run": "items", "metrics": "items", "sweep": "overrides", "submit": "overrides", "data": "overrides",
              "reproduce": "items", "evaluate": "overrides"}.get(args.command)
    if extra and target and all("=" in e and not e.startswith("-") for e in extra):
        setattr(args, target, [*getattr(args, target), *extra])
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    for name in ("home", "tracking_uri"):  # accepted before or after the subcommand
        if not hasattr(args, name):
            setattr(args, name, None)
    if args.command in ("run", "sweep", "resume", "reproduce") and args.address == "local":
        # Ray's "local" is a new local instance: avlab's own, on loopback, with this machine's
        # resource and memory checks (Ray's defaults would listen on every interface).
        args.address = None
    if getattr(args, "ray_dashboard", False):
        os.environ["AVLAB_RAY_DASHBOARD"] = "1"  # read where the local Ray starts (launch.init_ray)
    try:
        if args.command in ("run", "sweep", "resume", "reproduce", "evaluate", "submit"):
            from orchestrator.tracking import resolve_home

            resolve_home(args.home, writable=True)  # these write into the home: a read-only one stops here
        if args.command in ("run", "sweep", "resume", "reproduce"):
            from orchestrator.launch import worker_wait_s

            worker_wait_s()  # AVLAB_WORKER_WAIT_S, checked before anything starts
            from orchestrator.drivers import adopt_orphans
            from orchestrator.stop import sigterm_as_interrupt

            adopt_orphans()  # what Ray's daemons start and leave behind stays ours to end
            try:
                with sigterm_as_interrupt():  # `avlab stop`: handled like Ctrl-C
                    return args.func(args)
            finally:
                _end_local_processes()
        return args.func(args)
    except ConfigError as exc:
        _last_line(f"avlab: error: {exc}")
        return EXIT_BAD_INPUT
    except RunFailed as exc:  # deterministic: not retried, one line, the run is marked FAILED
        _last_line(f"avlab: {exc}")
        return 1
    except Interrupted as exc:  # Ctrl-C with the state saved: one line that says how to continue
        _last_line(f"avlab: {exc}")
        return 130
    except KeyboardInterrupt:
        _last_line("avlab: interrupted")
        return 130


def _end_local_processes() -> None:
    """At the end of a job command, whatever its outcome: stop the local Ray (a cluster keeps
    running) and end every process it left (``drivers.end_leftovers``), so nothing the command
    started outlives it."""
    from orchestrator.drivers import end_leftovers

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        try:
            ray.shutdown()
        except Exception:  # noqa: BLE001 - the processes are ended below either way
            pass
    end_leftovers()


def _last_line(message: str) -> None:
    """Print the command's one-line error as its last line of output. While this process is a Ray
    driver, Ray streams its daemons' and workers' log lines to our stderr from a thread (a raylet's
    "disk over 95% full" warning, say) and one could land after the error: disconnect first (a
    local Ray stops, as it would at exit; a cluster keeps running), so nothing follows the line."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        try:
            ray.shutdown()
        except Exception:  # noqa: BLE001 - the line matters more than a clean disconnect
            pass
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)


def console() -> None:
    """The ``avlab`` command: ``main``, then the process ends. Once Ray has run in this process
    (stopped by then), the interpreter's own finalisation can crash in Ray's native threads after
    the command is over (a segmentation fault after an interrupted sweep's last line): the exit
    handlers run and the output is flushed as at a normal exit, then the process ends with the
    command's exit code without that finalisation."""
    code = main()
    if "ray" not in sys.modules:
        sys.exit(code)
    import atexit
    import logging

    atexit._run_exitfuncs()  # what a normal exit runs: Ray's and MLflow's handlers among them
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    console()
