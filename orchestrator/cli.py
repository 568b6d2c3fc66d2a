"""The ``avlab`` command line: the parser built from the subcommands (``orchestrator.commands``)
and their errors mapped to exit codes.

Exit codes: 0 success; 2 bad input (config, run file, override), reported in one line that names
the field, before Ray starts or an MLflow run is created; 1 anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Sequence

# The config (and with it torch, torchvision, scikit-learn) is imported by the commands that
# need it, so `--help`, `status`, `report` and `ui` start in a fraction of the time.
from orchestrator.commands import (check_cluster, data, evaluate, export, logs, metrics, report, reproduce, resume,
                                   results, run, status, stop, submit, sweep, ui)
from orchestrator.errors import ConfigError, Interrupted, RunFailed

EXIT_BAD_INPUT = 2
# In the order `avlab --help` lists them: first what a user needs first.
COMMANDS = (run, sweep, resume, report, status, reproduce, ui, check_cluster, export, evaluate, stop, submit, logs,
            metrics, data, results)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", default=argparse.SUPPRESS,
                        help="where runs, checkpoints and mlflow.db live (default: $AVLAB_HOME or ./avlab-runs)")
    common.add_argument("--tracking-uri", default=argparse.SUPPRESS,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite in --home)")
    parser = argparse.ArgumentParser(prog="avlab", description=__doc__.splitlines()[0], parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        before = set(sub.choices)
        module.register(sub, common)
        for name in set(sub.choices) - before:
            sub.choices[name].set_defaults(command_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # SQLAlchemy logs what it meets while closing a cursor that an interrupt cut short ("Error
    # closing cursor" and a traceback) through Python's last-resort handler onto stderr; the
    # interrupt itself is reported in one line, so its log records end here.
    logging.getLogger("sqlalchemy").addHandler(logging.NullHandler())
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    command = args.command_module
    # key.path=value overrides may also follow options (argparse stops positionals at them).
    target = command.EXTRA_ARGS
    if extra and target and all("=" in e and not e.startswith("-") for e in extra):
        setattr(args, target, [*getattr(args, target), *extra])
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    for name in ("home", "tracking_uri"):  # accepted before or after the subcommand
        if not hasattr(args, name):
            setattr(args, name, None)
    if command.DRIVES_JOB and args.address == "local":
        # Ray's "local" is a new local instance: avlab's own, on loopback, with this machine's
        # resource and memory checks (Ray's defaults would listen on every interface).
        args.address = None
    try:
        if command.WRITES_HOME:
            from orchestrator.tracking import resolve_home

            resolve_home(args.home, writable=True)  # these write into the home: a read-only one stops here
        if command.DRIVES_JOB:
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

    atexit._run_exitfuncs()  # what a normal exit runs: Ray's and MLflow's handlers among them
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    console()
