"""``avlab stop NAME``: stop a running sweep (or run) so that ``avlab resume NAME`` continues it.

A local job's driver (the ``avlab sweep``, ``run``, ``resume`` or ``reproduce`` process) is named
in its job file (``driver``: pid and host, written when it starts or resumes the job). ``stop``
sends it SIGTERM, which avlab handles like Ctrl-C: Ray stops, finished trials and every
checkpoint stay, trials that had logged their evaluation are FINISHED and the others KILLED, the
parent run KILLED. A sweep sent by ``avlab submit`` is stopped through Ray's job API (the
cluster sends its driver the same SIGTERM). Either way ``stop`` then settles what is still
RUNNING in MLflow (a driver killed harder than that leaves runs behind), so the store says
what ``avlab resume`` will continue.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from orchestrator.drivers import check_entry, is_here, is_live_driver
from orchestrator.errors import ConfigError, RunFailed

STOP_TIMEOUT_S = 300.0


_ACTIVE = False  # inside sigterm_as_interrupt


def _interrupt(signum, frame) -> None:  # noqa: ARG001
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (``avlab stop``, ``ray job stop``, a batch scheduler's cancel) handled like Ctrl-C
    while a job runs: the job settles its runs and can be resumed."""
    global _ACTIVE
    try:
        previous = signal.signal(signal.SIGTERM, _interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    _ACTIVE = True
    try:
        yield
    finally:
        _ACTIVE = False
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def ray_starting() -> Iterator[None]:
    """Around ``ray.init`` in a driver: a SIGTERM while Ray starts stops the job like one after.

    ``ray.init`` gives the driver SIGTERM handlers of its own, which exit at once (no run
    settled, the sweep marked failed), and its core worker installs a C++ crash handler that
    turns a SIGTERM into an abort with a stack dump. Inside ``sigterm_as_interrupt`` the crash
    handler is left out of the driver (Ray's workers keep theirs), a SIGTERM that Ray's handlers
    took while it started (they raise SystemExit, after stopping what had started) becomes the
    KeyboardInterrupt that avlab's handler raises, and avlab's handler is put back afterwards."""
    if not _ACTIVE:
        yield
        return
    import ray
    from ray._private import ray_constants

    ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True  # read when the driver's core worker starts
    try:
        yield
    except SystemExit:
        with contextlib.suppress(Exception):
            ray.shutdown()
        raise KeyboardInterrupt from None
    finally:
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, _interrupt)


def quiet_worker_sigterm() -> None:
    """In a Ray worker process of avlab's (a sweep trial, a run's task, a Ray Train worker).

    Ray stops a worker with SIGTERM, and its handler raises SystemExit wherever the worker's
    main thread is. When that is a weakref callback, a ``__del__`` or the garbage collector,
    Python cannot raise there: it prints "Exception ignored in ..." with the handler's traceback
    (which Ray streams to the avlab command's terminal, at the end of a sweep that went well) and
    carries on until Ray kills the process. This ``sys.unraisablehook`` takes that one case: the
    exit is asked for again with a new SIGTERM, sent a moment later from another thread so that
    the main thread handles it once out of the callback (a signal sent from inside would be
    handled inside again); every other unraisable exception goes to the hook before."""
    import threading

    previous = sys.unraisablehook
    if getattr(previous, "avlab_quiet_sigterm", False):
        return

    def hook(unraisable: Any) -> None:
        import traceback

        exc = unraisable.exc_value
        if isinstance(exc, SystemExit) and any(
                frame.f_code.co_name == "sigterm_handler" for frame, _ in traceback.walk_tb(unraisable.exc_traceback)):
            again = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM))
            again.daemon = True
            again.start()
            return
        previous(unraisable)

    hook.avlab_quiet_sigterm = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def settle(uri: str, manifest: dict[str, Any], *, status: str = "KILLED") -> tuple[int, int]:
    """Mark what is still RUNNING of the job as a stopped job leaves it: the run or the sweep's
    parent run ``status`` (FAILED when Ray was lost under it), each unfinished trial KILLED (it
    continues from its checkpoint); returns (trials ended, trials) for a sweep, (0, 0) for a run."""
    from mlflow.tracking import MlflowClient

    from orchestrator.sweep import _children

    client = MlflowClient(uri)
    if manifest["kind"] == "run":
        run = client.get_run(manifest["mlflow_run_id"])
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status=status)
        return 0, 0
    parent = manifest["parent_run_id"]
    children = _children(client, parent)
    for run in children:
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status="FINISHED" if "eval_time_s" in run.data.metrics else "KILLED")
    if client.get_run(parent).info.status == "RUNNING":
        client.set_terminated(parent, status=status)
    ended = sum(r.info.status in ("FINISHED", "FAILED") for r in _children(client, parent))
    return ended, len(children)


def _wait_gone(driver: dict[str, Any], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_live_driver(driver):
            return True
        time.sleep(0.5)
    return not is_live_driver(driver)


def _stop_submitted(home: Path, name: str, record: dict[str, Any], timeout: float) -> None:
    from orchestrator import submit

    address, job_id = record["address"], record["job_id"]
    client = submit._job_client(address)
    submit._job_call("stop Ray job", job_id, lambda: client.stop_job(job_id))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = str(getattr(s := submit._job_call("Ray job", job_id, lambda: client.get_job_status(job_id)), "value", s))
        if status in submit.TERMINAL:
            _settle_if_here(home, name)
            print(f"[avlab] stopped {name}: Ray job {job_id} is {status}; `avlab resume {name}` continues it")
            return
        time.sleep(1.0)
    raise RunFailed(f"stop: Ray job {job_id} at {address} did not stop within {timeout:.0f} s")


def _settle_if_here(home: Path, name: str) -> None:
    """After a cluster stopped a submitted sweep: Ray gives its driver a few seconds after SIGTERM
    before SIGKILL, which may leave runs RUNNING. When this home holds the sweep's job file (a
    home shared with the cluster) and its store answers, settle them as a local stop does."""
    from orchestrator import jobs

    if not jobs.exists(home, name):
        return
    manifest = jobs.read(home, name)
    try:
        settle(manifest["tracking_uri"], manifest)
    except Exception as exc:  # noqa: BLE001 - a store only the cluster reaches: the driver settled it or `resume` will
        print(f"[avlab] the MLflow store of {name} is not reachable from here ({type(exc).__name__}); "
              "its runs are settled when it is resumed", file=sys.stderr)


def _job_status(manifest: dict[str, Any], path: Path) -> str:
    """The status of the job's MLflow run (a sweep's parent run), RUNNING when the store does not
    answer: a finished, failed or stopped job has no driver to signal, whatever process now has
    the recorded number. A store that is not there, or does not hold the job's run, means the job
    file (``path``) is not this store's: ConfigError, and nothing is created or signalled."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = manifest["tracking_uri"]
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise ConfigError(f"{path}: its store {uri.removeprefix('sqlite:///')} does not exist; "
                          "nothing of this job can be stopped or settled from here")
    run_id = manifest["mlflow_run_id"] if manifest["kind"] == "run" else manifest["parent_run_id"]
    try:
        return MlflowClient(uri).get_run(run_id).info.status
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise ConfigError(f"{path}: its MLflow run {run_id} is not in its store; "
                              "the job file does not belong to this store") from None
        return "RUNNING"  # a store that does not answer: a live driver is still stopped
    except Exception:  # noqa: BLE001 - a store that does not answer: a live driver is still stopped
        return "RUNNING"


def cmd_stop(args: argparse.Namespace) -> int:
    from orchestrator import jobs, submit, tracking

    home = tracking.resolve_home(args.home)
    jobs.check_name(args.name, "NAME")  # a name is a file under <home>/jobs, never a path
    if args.timeout is not None and not (0 < args.timeout <= 86400):
        raise ConfigError(f"--timeout: must be in (0, 86400] seconds, got {args.timeout}")
    timeout = args.timeout or STOP_TIMEOUT_S
    record = submit.read_record(home, args.name)
    if record is not None:
        _stop_submitted(home, args.name, record, timeout)
        return 0
    manifest = jobs.read(home, args.name)
    kind = manifest["kind"]
    driver = check_entry(manifest.get("driver"), jobs.manifest_path(home, args.name))
    if driver and not is_here(driver):
        raise ConfigError(f"NAME: {kind} {args.name} is driven from {driver['host']}, not this machine; "
                          "run `avlab stop` there")
    # Only a live driver of this very job is signalled, and only while its run says it is running.
    status = _job_status(manifest, jobs.manifest_path(home, args.name))
    if status == "FINISHED":
        print(f"[avlab] {kind} {args.name} has finished; nothing to stop")
        return 0
    running = status == "RUNNING" and is_live_driver(driver)
    if running:
        os.kill(driver["pid"], signal.SIGTERM)
        if not _wait_gone(driver, timeout):
            raise RunFailed(f"stop: the driver of {kind} {args.name} (pid {driver['pid']}) did not stop within "
                            f"{timeout:.0f} s; `kill -9 {driver['pid']}`, then `avlab stop {args.name}` again "
                            "settles its runs")
    try:
        ended, total = settle(manifest["tracking_uri"], manifest)
    except Exception as exc:  # noqa: BLE001 - a store away: the runs are settled when the job resumes
        print(f"[avlab] {kind} {args.name} {'stopped' if running else 'was not running'}; its MLflow store does not "
              f"answer ({type(exc).__name__}), so its runs are settled when `avlab resume {args.name}` continues it")
        return 0
    state = "stopped" if running else "was not running"
    count = f" with {ended} of {total} trials ended" if kind == "sweep" else ""
    print(f"[avlab] {kind} {args.name} {state}{count}; `avlab resume {args.name}` continues it")
    return 0


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add the `stop` subcommand to the avlab parser."""
    p = sub.add_parser("stop", parents=[common],
                       help="stop a running sweep or run, local or submitted; `avlab resume` continues it")
    p.add_argument("name", metavar="NAME", help="the sweep's (or run's) name")
    p.add_argument("--timeout", type=float, help=f"seconds to wait for it to stop (default {STOP_TIMEOUT_S:.0f})")
    p.set_defaults(func=cmd_stop)
