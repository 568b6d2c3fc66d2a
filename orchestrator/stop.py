"""Stopping a running sweep (or run) so that ``avlab resume NAME`` continues it (``avlab stop``).

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

import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.drivers import check_entry, is_here, is_live_driver
from orchestrator.errors import ConfigError, RunFailed
from orchestrator.jobs import JobRecord

if TYPE_CHECKING:
    from orchestrator.submit import SubmissionRecord

STOP_TIMEOUT_S = 300.0


def _wait_gone(driver: dict[str, Any], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_live_driver(driver):
            return True
        time.sleep(0.5)
    return not is_live_driver(driver)


def _stop_submitted(home: Path, name: str, record: SubmissionRecord, timeout: float) -> str:
    from orchestrator import submit

    address, job_id = record.address, record.job_id
    client = submit._job_client(address)
    submit._job_call("stop Ray job", job_id, lambda: client.stop_job(job_id))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = str(getattr(s := submit._job_call("Ray job", job_id, lambda: client.get_job_status(job_id)), "value", s))
        if status in submit.TERMINAL:
            _settle_if_here(home, name)
            return f"[avlab] stopped {name}: Ray job {job_id} is {status}; `avlab resume {name}` continues it"
        time.sleep(1.0)
    raise RunFailed(f"stop: Ray job {job_id} at {address} did not stop within {timeout:.0f} s")


def _settle_if_here(home: Path, name: str) -> None:
    """After a cluster stopped a submitted sweep: Ray gives its driver a few seconds after SIGTERM
    before SIGKILL, which may leave runs RUNNING. When this home holds the sweep's job file (a
    home shared with the cluster) and its store answers, settle them as a local stop does."""
    from orchestrator import jobs

    if not jobs.exists(home, name):
        return
    record = jobs.read(home, name)
    try:
        from orchestrator.runs import settle  # MLflow's client: imported where a store is read

        settle(record.tracking_uri, record.kind, record.run_id)
    except Exception as exc:  # noqa: BLE001 - a store only the cluster reaches: the driver settled it or `resume` will
        print(f"[avlab] the MLflow store of {name} is not reachable from here ({type(exc).__name__}); "
              "its runs are settled when it is resumed", file=sys.stderr)


def _job_status(record: JobRecord, path: Path) -> str:
    """The status of the job's MLflow run (a sweep's parent run), RUNNING when the store does not
    answer: a finished, failed or stopped job has no driver to signal, whatever process now has
    the recorded number. A store that is not there, or does not hold the job's run, means the job
    file (``path``) is not this store's: ConfigError, and nothing is created or signalled."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri, run_id = record.tracking_uri, record.run_id
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise ConfigError(f"{path}: its store {uri.removeprefix('sqlite:///')} does not exist; "
                          "nothing of this job can be stopped or settled from here")
    try:
        return MlflowClient(uri).get_run(run_id).info.status
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise ConfigError(f"{path}: its MLflow run {run_id} is not in its store; "
                              "the job file does not belong to this store") from None
        return "RUNNING"  # a store that does not answer: a live driver is still stopped
    except Exception:  # noqa: BLE001 - a store that does not answer: a live driver is still stopped
        return "RUNNING"


def stop(home: Path, name: str, timeout: float | None) -> str:
    """Stop job ``name`` of ``home`` (see the module's docstring), waiting up to ``timeout``
    seconds (default ``STOP_TIMEOUT_S``) for its driver to end; returns the line that says what
    happened."""
    from orchestrator import jobs, submit

    jobs.check_name(name, "NAME")  # a name is a file under <home>/jobs, never a path
    if timeout is not None and not (0 < timeout <= 86400):
        raise ConfigError(f"--timeout: must be in (0, 86400] seconds, got {timeout}")
    timeout = timeout or STOP_TIMEOUT_S
    submitted = submit.read_record(home, name)
    if submitted is not None:
        return _stop_submitted(home, name, submitted, timeout)
    record = jobs.read(home, name)
    kind, path = record.kind, jobs.job_path(home, name)
    driver = check_entry(record.driver, path)
    if driver and not is_here(driver):
        raise ConfigError(f"NAME: {kind} {name} is driven from {driver['host']}, not this machine; "
                          "run `avlab stop` there")
    # Only a live driver of this very job is signalled, and only while its run says it is running.
    status = _job_status(record, path)
    if status == "FINISHED":
        return f"[avlab] {kind} {name} has finished; nothing to stop"
    running = status == "RUNNING" and is_live_driver(driver)
    if running:
        os.kill(driver["pid"], signal.SIGTERM)
        if not _wait_gone(driver, timeout):
            raise RunFailed(f"stop: the driver of {kind} {name} (pid {driver['pid']}) did not stop within "
                            f"{timeout:.0f} s; `kill -9 {driver['pid']}`, then `avlab stop {name}` again "
                            "settles its runs")
    try:
        from orchestrator.runs import settle

        ended, total = settle(record.tracking_uri, kind, record.run_id)
    except Exception as exc:  # noqa: BLE001 - a store away: the runs are settled when the job resumes
        return (f"[avlab] {kind} {name} {'stopped' if running else 'was not running'}; its MLflow store does not "
                f"answer ({type(exc).__name__}), so its runs are settled when `avlab resume {name}` continues it")
    state = "stopped" if running else "was not running"
    count = f" with {ended} of {total} trials ended" if kind == "sweep" else ""
    return f"[avlab] {kind} {name} {state}{count}; `avlab resume {name}` continues it"
