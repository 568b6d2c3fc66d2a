"""The ``avlab`` command line.

Exit codes: 0 success; 2 bad input (config, run file, override), reported in one line that names
the field, before Ray starts or an MLflow run is created; 1 anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

# The config (and with it torch, torchvision, scikit-learn) is imported by the commands that
# need it, so `--help`, `status`, `report` and `ui` start in a fraction of the time.
from orchestrator import data_commands
from orchestrator.errors import ConfigError, Interrupted, RunFailed

EXIT_BAD_INPUT = 2


def cmd_run(args: argparse.Namespace) -> int:
    from orchestrator.config import resolve_run_config
    from orchestrator.service import start_run

    cfg = resolve_run_config(args.items, preset=args.preset, workers=args.workers, gpu=args.gpu)  # ConfigError -> exit 2
    return start_run(cfg, home_arg=args.home, tracking_uri=args.tracking_uri, address=args.address)


def cmd_resume(args: argparse.Namespace) -> int:
    from orchestrator.service import resume

    return resume(args.name, home_arg=args.home, tracking_uri=args.tracking_uri, address=args.address,
                  retry_failed=args.retry_failed)


def cmd_sweep(args: argparse.Namespace) -> int:
    from orchestrator.service import start_sweep

    return start_sweep(args.search_space, seeds=args.seeds, preset=args.preset, overrides=args.overrides,
                       name=args.name, home_arg=args.home, tracking_uri=args.tracking_uri, address=args.address,
                       max_concurrent=args.max_concurrent, reuse_trials=args.reuse_trials)


def cmd_report(args: argparse.Namespace) -> int:
    import json

    from orchestrator import tracking
    from orchestrator.report import build_report, to_markdown, to_table, write_report

    home, client = tracking.open_home_store(args.home, args.tracking_uri)
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
        _, client = tracking.open_home_store(args.home, args.tracking_uri)
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
            from orchestrator.signals import sigterm_as_interrupt

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
