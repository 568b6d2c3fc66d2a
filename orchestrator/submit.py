"""``avlab submit`` / ``avlab logs``: a sweep as a Ray job on a running cluster (Ray Jobs API).

``avlab submit SEARCH_SPACE.yaml --address http://HEAD:8265`` checks the search space here (a bad
file exits 2 before anything is sent), then hands the project's source to the cluster as the job's
``working_dir`` and runs ``python -m orchestrator.cli sweep ... --address auto`` there: the sweep
driver runs on the head node, its trials and their DDP workers on whichever nodes have room.
The submission is recorded in ``<home>/jobs/submitted/NAME.json`` (dashboard address, job id), so
``avlab logs NAME`` and ``avlab status NAME`` find the job again.

Where the sweep keeps its state is the cluster's business: ``AVLAB_HOME`` in the nodes' environment
(shared storage, see cluster.yaml), or ``--home`` / ``--tracking-uri`` when given here, which are
passed on as they are. The record lives in a ``submitted/`` folder of its own because the sweep on
the cluster writes ``<home>/jobs/NAME.json`` (what ``avlab resume`` reads) under the same name,
and the two homes may be one folder (a shared file system mounted here too).

Authentication. Ray 2.60 enables token authentication when ``ray start --head`` finds a token
(``~/.ray/auth_token``, or ``RAY_AUTH_MODE=token``); ``ray.init()`` on a new local cluster always
does. The dashboard then refuses requests without ``Authorization: Bearer <token>`` (401).
``JobSubmissionClient`` adds that header only when *this* process runs in token mode: it checks
``RAY_AUTH_MODE`` (unset means disabled for a client; Ray never turns it on by itself for an
explicit address, so a token is not sent to any address it is given) and then reads the token
from ``RAY_AUTH_TOKEN``, the file named by ``RAY_AUTH_TOKEN_PATH``, or ``~/.ray/auth_token``, in
that order. So, for a cluster with tokens: ``export RAY_AUTH_MODE=token`` and put the cluster's
token (``ray get-auth-token`` on the head) in one of those places. avlab adds nothing of its own
and reports a refused request in one line. The tests start their cluster with
``RAY_AUTH_MODE=disabled``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import ConfigError

FORMAT = 1
KIND = "submitted"
# The interpreter that runs the sweep on the cluster: the nodes' own (cluster.yaml puts the
# project's venv first on PATH). Tests point it at this checkout's venv.
JOB_PYTHON_ENV = "AVLAB_JOB_PYTHON"
# Never uploaded: run outputs, MLflow stores, data caches, virtual environments, VCS and build
# debris. Ray reads these as .gitignore patterns relative to the working_dir (it also honours
# the project's .gitignore).
EXCLUDES = (
    "avlab-runs/", ".venv/", "venv/", ".git/", "test-artifacts/", "**/.avlab-cache/", "**/__pycache__/",
    "*.egg-info/", ".pytest_cache/", "build/", "mlruns/", "mlartifacts/", "*.db",
)
_STAGE_IGNORE = shutil.ignore_patterns(
    "avlab-runs", ".venv", "venv", ".git", "test-artifacts", ".avlab-cache", "__pycache__", "*.egg-info",
    ".pytest_cache", "build", "mlruns", "mlartifacts", "*.db",
)
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class ClusterError(Exception):
    """The dashboard could not be reached or refused the request (exit 1, one line)."""


# ---------------------------------------------------------------------------------------------
# The submission record: <home>/jobs/submitted/NAME.json


def record_path(home: Path, name: str) -> Path:
    return home / "jobs" / KIND / f"{name}.json"


@dataclass(frozen=True)
class SubmissionRecord:
    """A submitted sweep: the dashboard it went to and its Ray job id (what ``logs``, ``status``
    and ``stop`` need), and what was sent (the entrypoint, the search space, the home and store
    passed on, the commit)."""

    name: str
    address: str
    job_id: str
    entrypoint: str = ""
    search_space: str = ""
    home: str | None = None
    tracking_uri: str | None = None
    git_commit: str = ""
    submitted_at: str = ""

    @classmethod
    def from_json(cls, data: Any, path: Path) -> SubmissionRecord:
        """The record a file holds; ConfigError naming ``path`` for anything else."""
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("kind") != KIND:
            raise ConfigError(f"{path}: not an avlab submission record (format {FORMAT}, kind {KIND})")
        wrong = [key for key in ("address", "job_id") if not isinstance(data.get(key), str)]
        if wrong:
            raise ConfigError(f"{path}: damaged avlab submission record ({', '.join(wrong)} missing or not a string)")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{"name": path.stem, **{k: v for k, v in data.items() if k in known}})

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "kind": KIND, **dataclasses.asdict(self)}


def read_record(home: Path, name: str) -> SubmissionRecord | None:
    """The record of a submitted sweep, or None if ``name`` was not submitted from this home."""
    path = record_path(home, name)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc})") from None
    return SubmissionRecord.from_json(data, path)


def write_record(home: Path, record: SubmissionRecord) -> Path:
    """Atomically, like ``orchestrator.jobs.write``."""
    path = record_path(home, record.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record.to_json(), indent=2, sort_keys=True))
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------
# Talking to the dashboard


AUTH_HINT = ("for a cluster with token authentication set RAY_AUTH_MODE=token and its token in RAY_AUTH_TOKEN, "
             "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token")


def _job_client(address: str):
    """A ``JobSubmissionClient`` for ``address``; unreachable or refused -> ClusterError."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except ConnectionError as exc:
        raise ClusterError(f"cannot reach the Ray dashboard at {address} ({exc})") from None
    except AuthenticationError as exc:
        raise ClusterError(f"the Ray dashboard at {address} refused the request: {_first_line(exc)}; {AUTH_HINT}") from None
    except RuntimeError as exc:  # version check refused (old Ray, not a dashboard)
        raise ClusterError(f"the Ray dashboard at {address} refused the connection: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    return next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def _job_call(what: str, job_id: str, call, *, unknown_is_bad_input: bool = True):
    """Run one client request; a job the cluster does not know is bad input (exit 2)."""
    from ray.exceptions import AuthenticationError

    try:
        return call()
    except AuthenticationError as exc:
        raise ClusterError(f"{what} {job_id}: {_first_line(exc)}; {AUTH_HINT}") from None
    except RuntimeError as exc:
        if unknown_is_bad_input and ("status code 404" in str(exc) or "does not exist" in str(exc)):
            raise ConfigError(f"NAME: the cluster has no Ray job {job_id!r}") from None
        raise ClusterError(f"{what} {job_id}: {_first_line(exc)}") from None


def _find_job(home: Path, name: str, address: str | None) -> tuple[str, str]:
    """(dashboard address, job id) of a submitted sweep's name, or of a raw job id with --address."""
    record = read_record(home, name)
    if record is not None:
        return address or record.address, record.job_id
    if address:
        return address, name
    raise ConfigError(f"NAME: no submitted sweep named {name!r} in {home / 'jobs' / KIND}; "
                      "for a Ray job id, pass --address http://HEAD:8265")


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def job_status_lines(home: Path, name: str) -> list[str] | None:
    """The Ray job behind a submitted sweep: status, start and end time, Ray's message.

    None if ``name`` was not submitted from ``home``. A cluster that cannot be reached gives a
    line saying so instead of an exception (the MLflow part of `avlab status` may still work)."""
    record = read_record(home, name)
    if record is None:
        return None
    address, job_id = record.address, record.job_id
    try:
        info = _job_call("Ray job", job_id, lambda: _job_client(address).get_job_info(job_id))
    except (ClusterError, ConfigError) as exc:
        return [f"Ray job {job_id} at {address}: status unknown ({exc})"]
    status = str(getattr(info.status, "value", info.status))
    lines = [f"Ray job {job_id} at {address}: {status}"]
    if info.start_time:
        end = info.end_time or time.time() * 1000
        span = _duration((end - info.start_time) / 1000)
        lines.append(f"  started {_when(info.start_time)}, "
                     + (f"ended {_when(info.end_time)} after {span}" if info.end_time else f"running for {span}"))
    if info.message:
        lines.append(f"  {info.message.strip().splitlines()[0]}")
    lines.append(f"  logs: avlab logs {name}" + ("" if status in TERMINAL else " --follow"))
    return lines


# ---------------------------------------------------------------------------------------------
# avlab submit


@dataclass(frozen=True)
class Submission:
    """What ``avlab submit`` sends: the sweep's flags as ``avlab sweep`` takes them, the
    dashboard's ``address``, and the ``home`` / ``tracking_uri`` passed on to the cluster."""

    search_space: str
    address: str
    overrides: tuple[str, ...] = ()
    name: str | None = None
    preset: str | None = None
    max_concurrent: int | None = None
    seeds: int | None = None
    reuse_trials: bool = False
    home: str | None = None
    tracking_uri: str | None = None
    dry_run_s: float | None = None  # --dry-run: the trials train nothing (``orchestrator.dry_run``)


def _check_search_space(args: Submission):
    """What ``avlab sweep`` checks before it starts anything, here, before anything is sent."""
    from orchestrator.search_space import load_search_space
    from orchestrator.sweep import check_supported

    space = load_search_space(args.search_space, seeds=args.seeds).with_overrides(args.preset, list(args.overrides))
    check_supported(space, reuse_trials=args.reuse_trials)
    from orchestrator.dry_run import check_seconds

    if check_seconds(args.dry_run_s) is not None and args.reuse_trials:
        raise ConfigError("--reuse-trials: a dry run trains nothing and takes nothing; drop one of them")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent: must be >= 1, got {args.max_concurrent}")
    # train.init_from names a run in the cluster's home, which only the sweep there can check.
    return space


@contextmanager
def _working_dir(search_space: Path, name: str) -> Iterator[tuple[Path, str]]:
    """(the folder to upload, the search space's path inside it).

    A search space inside the project goes up with the project as it is. One from elsewhere is
    put into a temporary copy of the project (without the excluded folders) under ``submitted/``,
    with its file name, so the sweep is named as it would be locally. Ray uploads the folder
    during ``submit_job``, so the copy can go once that returns."""
    from orchestrator.tracking import PROJECT_ROOT

    path = search_space.resolve()
    if path.is_relative_to(PROJECT_ROOT):
        yield PROJECT_ROOT, path.relative_to(PROJECT_ROOT).as_posix()
        return
    with tempfile.TemporaryDirectory(prefix=f"avlab-submit-{name}-") as tmp:
        stage = Path(tmp) / PROJECT_ROOT.name
        shutil.copytree(PROJECT_ROOT, stage, ignore=_STAGE_IGNORE, symlinks=True)
        (stage / "submitted").mkdir(exist_ok=True)
        shutil.copy2(path, stage / "submitted" / path.name)
        yield stage, f"submitted/{path.name}"


def entrypoint(args: Submission, space_path: str, name: str) -> str:
    """The job's shell command, run in the uploaded working_dir on the head node."""
    python = os.environ.get(JOB_PYTHON_ENV) or "python"
    cmd = [python, "-m", "orchestrator.cli", "sweep", space_path, *args.overrides, "--name", name, "--address", "auto"]
    for flag, value in (("--preset", args.preset), ("--max-concurrent", args.max_concurrent), ("--seeds", args.seeds)):
        if value is not None:
            cmd += [flag, str(value)]
    if args.reuse_trials:
        cmd.append("--reuse-trials")
    if args.dry_run_s is not None:
        cmd += ["--dry-run", f"{args.dry_run_s:g}"]
    if args.home:
        cmd += ["--home", str(Path(args.home).expanduser().resolve())]
    if args.tracking_uri:
        cmd += ["--tracking-uri", args.tracking_uri]
    command = shlex.join(cmd)
    if args.home:
        return command
    # Without AVLAB_HOME the sweep would keep checkpoints and mlflow.db inside this job's copy of
    # the project on the head node, which other nodes cannot reach and Ray deletes: refuse.
    message = ("avlab: error: AVLAB_HOME is not set on the cluster; export it on every node (shared storage) "
               "or pass --home to avlab submit")
    return f'if [ -z "$AVLAB_HOME" ]; then echo {shlex.quote(message)} >&2; exit 2; fi; exec {command}'


def submit(args: Submission) -> tuple[str, int, str]:
    """Send the sweep ``args`` describes to the cluster as a Ray job and record it; returns (its
    name, its number of trials, the Ray job id). Nothing is sent when a check fails."""
    space = _check_search_space(args)  # ConfigError -> exit 2, nothing sent

    from orchestrator import jobs, tracking

    home = tracking.resolve_home(args.home)
    if args.tracking_uri:
        tracking.check_tracking_uri(args.tracking_uri, "--tracking-uri")
    dry = "-dry-run" if args.dry_run_s is not None else ""
    name = args.name or f"{space.name}{dry}-{time.strftime('%Y%m%d-%H%M%S')}"
    jobs.check_name(name, "--name")
    if read_record(home, name) is not None or jobs.exists(home, name):
        raise ConfigError(f"--name: a run, sweep or submission named {name!r} already exists in {home}; "
                          "choose another name")
    address = args.address.rstrip("/")
    import logging

    for logger in ("ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env.packaging"):
        logging.getLogger(logger).setLevel(logging.WARNING)  # one "Uploading ..." line per file otherwise
    client = _job_client(address)
    with _working_dir(Path(args.search_space), name) as (working_dir, space_path):
        command = entrypoint(args, space_path, name)
        excludes = list(EXCLUDES)
        if home.is_relative_to(working_dir):  # a local home inside the project stays here
            excludes.append(f"/{home.relative_to(working_dir).as_posix()}/")
        runtime_env = {"working_dir": str(working_dir), "excludes": excludes}
        # .git stays here, so the trials' avlab.git_commit tag reads "unknown" on the cluster; the
        # commit submitted is kept with the job (dashboard metadata) and in the record.
        commit = tracking.git_commit()
        metadata = {"avlab.name": name, "avlab.search_space": space.name, "avlab.git_commit": commit}
        job_id = _job_call("submitting sweep", name, lambda: client.submit_job(
            entrypoint=command, runtime_env=runtime_env, metadata=metadata
        ), unknown_is_bad_input=False)
    write_record(home, SubmissionRecord(
        name=name, address=address, job_id=job_id, entrypoint=command, search_space=str(Path(args.search_space).resolve()),
        home=str(Path(args.home).expanduser().resolve()) if args.home else None, tracking_uri=args.tracking_uri,
        git_commit=commit, submitted_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    ))
    return name, space.num_trials(), job_id


# ---------------------------------------------------------------------------------------------
# avlab logs


def logs(home: Path, name: str, *, address: str | None, follow: bool) -> tuple[str, str]:
    """Write a submitted job's driver output to stdout (with ``follow``, as it comes, until the
    job ends); returns (its Ray job id, its status)."""
    address, job_id = _find_job(home, name, address)
    client = _job_client(address.rstrip("/"))
    if follow:
        _job_call("Ray job", job_id, lambda: client.get_job_status(job_id))  # unknown id -> exit 2

        async def tail() -> None:
            async for chunk in client.tail_job_logs(job_id):
                sys.stdout.write(chunk)
                sys.stdout.flush()

        import aiohttp

        try:
            _job_call("following Ray job", job_id, lambda: asyncio.run(tail()))
        except aiohttp.ClientError as exc:  # the dashboard went away, or refused the websocket
            raise ClusterError(f"following Ray job {job_id} at {address}: {_first_line(exc)}") from None
    else:
        sys.stdout.write(_job_call("Ray job", job_id, lambda: client.get_job_logs(job_id)))
        sys.stdout.flush()
    return job_id, str(_job_call("Ray job", job_id, lambda: client.get_job_status(job_id)).value)


# ---------------------------------------------------------------------------------------------
