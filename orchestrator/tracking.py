"""MLflow tracking: one run per ``avlab run`` (a child run per trial in sweeps), found again by id.

The driver creates the run and logs the resolved config; the rank-0 training worker logs per-epoch
metrics with ``step=epoch`` and the downstream results into the same run id, so a restarted
worker keeps writing to its own run.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from orchestrator.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TAG_PREFIX = "avlab."
# MLflow's tracking stores: a local folder (no scheme or file), a database through SQLAlchemy
# (``postgresql+psycopg2://`` names a driver too), a tracking server, Databricks.
TRACKING_SCHEMES = ("", "file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")


def resolve_home(home: str | os.PathLike[str] | None = None, *, writable: bool = False) -> Path:
    """``--home`` > ``AVLAB_HOME`` > ./avlab-runs; with ``writable``, a home this process can
    write in (or create), checked before the command creates anything."""
    chosen = home or os.environ.get("AVLAB_HOME") or "avlab-runs"
    source = "AVLAB_HOME" if not home and os.environ.get("AVLAB_HOME") else "--home"
    try:
        path = Path(chosen).expanduser().resolve()
        path.stat()
    except FileNotFoundError:
        pass
    except (OSError, RuntimeError) as exc:  # a symlink loop, a component that is a file, no access
        why = "a symlink loop" if isinstance(exc, RuntimeError) or exc.errno == errno.ELOOP else exc.strerror
        raise ConfigError(f"{source}: {chosen} cannot be used as the home ({why})") from None
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{source}: {path} is a file; the home is a folder (it holds mlflow.db, jobs/ and ray/)")
    if writable:
        _check_writable(path, source)
    return path


def _check_writable(home: Path, source: str) -> None:
    """``home``, or the folder it would be made in, takes a new file (made and removed at once:
    permissions, ACLs, a read-only mount and a full disk all answer here, as they would later)."""
    existing = home
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".avlab-write-check-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        where = "" if existing == home else f" (its nearest existing folder {existing})"
        raise ConfigError(f"{source}: {home} cannot be written{where}: {exc.strerror}; "
                          f"choose a writable folder with --home or AVLAB_HOME") from None


def storage_root(home: Path) -> str:
    """Where Ray Train and Tune keep checkpoints and experiment state: ``AVLAB_STORAGE`` (a
    shared folder or an ``s3://`` / ``gs://`` URI every node can reach) > ``<home>/ray``."""
    chosen = os.environ.get("AVLAB_STORAGE", "").strip()
    if not chosen:
        return str(home / "ray")
    if "://" in chosen:
        return chosen.rstrip("/")
    return str(Path(chosen).expanduser().resolve())


def experiment_path(storage: str, name: str) -> str:
    """The Tune experiment folder (or URI) of sweep ``name`` under the storage root ``storage``."""
    return f"{storage}/sweeps/{name}"



def resolve_tracking_uri(home: Path, uri: str | None = None) -> str:
    """``--tracking-uri`` > ``MLFLOW_TRACKING_URI`` > sqlite file in the home folder; a store
    named by the user is checked (``check_tracking_uri``) and must be usable from here
    (``check_reachable``) before the command starts anything."""
    if uri:
        field = "--tracking-uri"
    elif os.environ.get("MLFLOW_TRACKING_URI"):
        uri, field = os.environ["MLFLOW_TRACKING_URI"], "MLFLOW_TRACKING_URI"
    else:
        return f"sqlite:///{home / 'mlflow.db'}"
    check_tracking_uri(uri, field)
    check_reachable(uri, field)
    return uri


# Query parameters that hold a secret: a password (``password``, ``sslpassword``, ``pwd``), a
# token, an API or access key, a signature (cloud storage URLs). ``sslkey`` or ``passfile`` name a
# file and stay allowed.
_SECRET_PARAM = re.compile(r"pass(word|wd)$|^pwd$|secret|token|credential|signature|^sig$|(^|[_.-])key$|"
                           r"(api|access|account|private|auth)[_.-]?key", re.IGNORECASE)


def check_tracking_uri(uri: str, field: str) -> str:
    """``uri`` if MLflow has a tracking store for its scheme and it carries no credentials (in its
    user part or its query); else a ConfigError naming ``field``, without the secret."""
    try:
        parsed = urllib.parse.urlparse(uri)
        scheme = parsed.scheme.lower().split("+", 1)[0]
        password = parsed.password
    except ValueError as exc:  # e.g. an unclosed [ of an IPv6 host
        raise ConfigError(f"{field}: not a URI ({exc})") from None
    # The URI is written into <home>/jobs/NAME.json (and shown in logs): no secrets in it.
    secret = next((key for key, _ in urllib.parse.parse_qsl(parsed.query, keep_blank_values=True)
                   if _SECRET_PARAM.search(key)), None)
    if password is not None or (scheme in ("http", "https") and parsed.username) or secret is not None:
        where = f"its query parameter {secret!r}" if secret is not None and password is None else "its user part"
        raise ConfigError(f"{field}: the URI carries credentials ({where}), and avlab writes it into "
                          f"<home>/jobs/*.json; give them through MLFLOW_TRACKING_USERNAME and "
                          f"MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN (a tracking server) or the "
                          f"database's own client configuration instead")
    if scheme not in TRACKING_SCHEMES:
        raise ConfigError(f"{field}: unknown scheme {scheme!r} in {uri!r}; use one of "
                          f"{', '.join(s + '://' for s in TRACKING_SCHEMES if s)} or a folder path")
    if scheme == "sqlite" and ("?" in uri or parsed.params):
        # MLflow and avlab take everything after sqlite:/// as the file's path.
        raise ConfigError(f"{field}: a sqlite URI takes no query (the part from '?'); "
                          f"give the database file alone, sqlite:///PATH")
    return uri


PROBE_TIMEOUT_S = 5.0  # a tracking server that does not answer a request in this time is not there


def check_reachable(uri: str, field: str) -> None:
    """The store of ``uri`` can be used from this machine, in seconds rather than after MLflow's
    retries (minutes): a tracking server answers one request, without retries, within
    ``PROBE_TIMEOUT_S`` (any HTTP reply will do); a database's Python driver is installed. Else a
    ConfigError naming ``field`` and where."""
    scheme = urllib.parse.urlparse(uri).scheme.lower()
    if scheme in ("http", "https"):
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.rest_utils import http_request

        creds = get_default_host_creds(uri.rstrip("/"))
        try:
            http_request(creds, "/health", "GET", max_retries=0, timeout=PROBE_TIMEOUT_S, raise_on_status=False)
            # /health needs no login; a search does, so a server behind MLflow's login refuses
            # missing or wrong credentials here rather than at the first trial's first request.
            reply = http_request(creds, "/api/2.0/mlflow/experiments/search", "GET", max_retries=0,
                                 timeout=PROBE_TIMEOUT_S, raise_on_status=False, params={"max_results": 1})
        except Exception as exc:  # noqa: BLE001 - every way of not answering means the same here
            raise ConfigError(f"{field}: no tracking server answers at {_where(uri)} ({_reason(exc)}); "
                              f"start it, or check the URI") from None
        if reply.status_code in (401, 403):
            given = ("the credentials of MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
                     if os.environ.get("MLFLOW_TRACKING_USERNAME") or os.environ.get("MLFLOW_TRACKING_TOKEN")
                     else "a request without credentials")
            raise ConfigError(f"{field}: the tracking server at {_where(uri)} refused {given} "
                              f"(HTTP {reply.status_code}); set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
                              f"(or MLFLOW_TRACKING_TOKEN) to a login of that server") from None
    elif scheme.split("+", 1)[0] in ("postgresql", "mysql", "mssql"):
        from sqlalchemy.engine import make_url

        try:
            dialect = make_url(uri).get_dialect()
            dialect.import_dbapi()
        except ImportError as exc:
            module = getattr(exc, "name", None) or str(exc)
            raise ConfigError(f"{field}: a {scheme}:// store needs the Python package {module!r}, which is not "
                              f"installed here; install it (or name an installed driver, "
                              f"{scheme.split('+', 1)[0]}+DRIVER://)") from None
        except Exception as exc:  # noqa: BLE001 - SQLAlchemy knows no such dialect or driver
            raise ConfigError(f"{field}: SQLAlchemy cannot use the scheme {scheme!r} ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        if scheme.split("+", 1)[0] == "postgresql":
            _check_database(uri, field)


def _check_database(uri: str, field: str) -> None:
    """A PostgreSQL store answers one connection within ``PROBE_TIMEOUT_S`` (the server is up, the
    database exists, this user may log in: the password comes from the environment, PGPASSWORD or
    ~/.pgpass, never from the URI). Else a ConfigError naming ``field`` and the database without
    any password, with the server's reason in a few words."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": max(1, int(PROBE_TIMEOUT_S))},
                                      poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect():
            pass
    except Exception as exc:  # noqa: BLE001 - every way of not connecting means the same here
        cause = getattr(exc, "orig", None) or exc
        text = " ".join(str(cause).split())
        reason = next((r for r in ("connection refused", "timeout expired", "does not exist",
                                   "password authentication failed", "no password supplied",
                                   "could not translate host name") if r in text.lower()), type(cause).__name__)
        raise ConfigError(f"{field}: cannot connect to the PostgreSQL store at {_where(uri)}{_database(uri)} "
                          f"({reason}); start it, or check the URI and the credentials in the environment") from None
    finally:
        engine.dispose()


def _database(uri: str) -> str:
    path = urllib.parse.urlsplit(uri).path
    return path if path not in ("", "/") else ""


from orchestrator.store import empty_store_template, open_store, prepare_store  # noqa: E402,F401


SOURCE_HASH_TAG = "source_hash"
SOURCE_PACKAGES = ("methods", "orchestrator")

# The version of the numbers avlab computes, tagged on every run (``avlab.results_version``). A
# finished trial gives its results to an identical one (``--reuse-trials``, ``avlab reproduce``)
# only when both carry this version: raise it with every change that moves a number of a trial
# at a fixed configuration and seed on one machine (a solver's setting, a random draw, a loss);
# tests/orchestrator/test_results_version.py holds reference numbers and fails until it is
# raised. 1: runs made before the tag; 2: probes fitted to convergence (eval.linear_tol); 3: AVID's
# Z̄ from the first term and Joint-AVID's weights as the authors' code has them.
RESULTS_VERSION = 3
RESULTS_VERSION_TAG = "results_version"


def tree_hash(root: Path) -> str:
    """The first 12 hex digits of a SHA-256 over every Python file of ``root``'s ``methods/`` and
    ``orchestrator/`` (relative path and bytes, in path order)."""
    digest = hashlib.sha256()
    for package in SOURCE_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """This code's ``tree_hash``, tagged on every run: the code a run ran, known with or without
    git (an installed copy, a copy of the tree) and whatever the working tree holds."""
    return tree_hash(PROJECT_ROOT)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


# MLflow 3 opens an experiment without a kind on its GenAI traces overview; avlab's experiments
# are model training, so the UI opens them on their runs.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def get_or_create_experiment(client: MlflowClient, name: str, home: Path) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        for key, value in EXPERIMENT_KIND.items():
            if key not in exp.tags:  # a store made before the kind was set
                client.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id
    artifacts = (home / "mlartifacts" / name).resolve()
    artifacts.mkdir(parents=True, exist_ok=True)
    return client.create_experiment(name, artifact_location=artifacts.as_uri(), tags=EXPERIMENT_KIND)


def create_run(
    *,
    tracking_uri: str,
    home: Path,
    experiment: str,
    run_name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
    config_yaml: str,
    parent_run_id: str | None = None,
) -> str:
    """Create an MLflow run with params, tags and the resolved config; return its id."""
    client = MlflowClient(tracking_uri)
    exp_id = get_or_create_experiment(client, experiment, home)
    all_tags = {f"{TAG_PREFIX}{k}": str(v) for k, v in tags.items()}
    all_tags[f"{TAG_PREFIX}git_commit"] = git_commit()
    all_tags.setdefault(f"{TAG_PREFIX}{SOURCE_HASH_TAG}", source_hash())
    all_tags.setdefault(f"{TAG_PREFIX}{RESULTS_VERSION_TAG}", str(RESULTS_VERSION))
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    run_id = run.info.run_id
    items = [Param(k, _param_value(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])
    log_text(client, run_id, config_yaml, "config.yaml")
    return run_id


def _param_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def log_text(client: MlflowClient, run_id: str, text: str, artifact_file: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        path.write_text(text)
        parent = str(Path(artifact_file).parent)
        client.log_artifact(run_id, str(path), None if parent == "." else parent)


def log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, float], *, step: int) -> None:
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    for i in range(0, len(items), 500):
        client.log_batch(run_id, metrics=items[i : i + 500])


def set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, str]) -> None:
    client.log_batch(run_id, tags=[RunTag(f"{TAG_PREFIX}{k}", str(v)) for k, v in tags.items()])


FAILED_TAG = "failed"


def record_failure(client: MlflowClient, run_id: str, line: str, *, details: str = "") -> None:
    """Mark ``run_id`` as failed for good by a deterministic error (``line``; its traceback,
    ``details``, goes to the run's ``failure.txt``): a restarted attempt does not train again,
    and the driver reports the line."""
    if details:
        client.log_text(run_id, details, "failure.txt")
    set_tags(client, run_id, {FAILED_TAG: line[:4000]})


def recorded_failure(client: MlflowClient, run_id: str) -> str:
    """The deterministic error an attempt of ``run_id`` recorded, or ""."""
    return client.get_run(run_id).data.tags.get(f"{TAG_PREFIX}{FAILED_TAG}", "")


# ``--retry-failed``: a run whose failure was cleared keeps its line here, and the number of times.
RETRIED_TAG = "retried_failure"


def clear_failure(client: MlflowClient, run, line: str) -> None:
    """Let ``run``, failed by ``line``, train again once its cause is fixed (``avlab resume
    --retry-failed``): the line moves to ``avlab.retried_failure`` (kept first, so nothing is lost
    if this stops half way), then the failure goes; the run continues from its last checkpoint.
    The code of the retry goes to ``avlab.retried_source_hash``."""
    tries = int(run.data.tags.get(f"{TAG_PREFIX}retries", "0") or 0) + 1
    # The code the retry runs on (the fix), beside the code the run started on (``source_hash``).
    set_tags(client, run.info.run_id, {RETRIED_TAG: line[:4000], "retries": str(tries),
                                       f"retried_{SOURCE_HASH_TAG}": source_hash()})
    client.delete_tag(run.info.run_id, f"{TAG_PREFIX}{FAILED_TAG}")


# A sweep trial that took the results of an identical finished trial (same resolved config and
# seed, so the same numbers) instead of training: its run names that trial, whose checkpoints and
# artifacts hold the weights (``avlab sweep --reuse-trials``).
REUSED_FROM_TAG = "reused_from"


def is_whole_result(run) -> bool:
    """A finished trial's run holds a whole result another trial may take: it was evaluated to the
    end (``eval_time_s``), not stopped early by a scheduler, and not a dry run's."""
    return ("eval_time_s" in run.data.metrics and run.data.tags.get(f"{TAG_PREFIX}stopped_early") != "true"
            and f"{TAG_PREFIX}dry_run" not in run.data.tags)


def ran_to_end(run) -> bool:
    """A trial's run went through to its end: evaluated (``eval_time_s``), or a dry run's trial
    that recorded its placement to the end (``orchestrator.dry_run``)."""
    return "eval_time_s" in run.data.metrics or run.data.tags.get(f"{TAG_PREFIX}dry_run") == "done"


def copy_metric_histories(client: MlflowClient, source_id: str, run_id: str, keys) -> None:
    """Every step of the metrics ``keys`` of run ``source_id``, logged to ``run_id`` unchanged."""
    items = [m for key in keys for m in client.get_metric_history(source_id, key)]
    for i in range(0, len(items), 500):
        client.log_batch(run_id, metrics=items[i : i + 500])


def weights_run(client: MlflowClient, run):
    """The run whose checkpoints and artifacts hold ``run``'s weights: the trial it reused, or itself."""
    source = run.data.tags.get(f"{TAG_PREFIX}{REUSED_FROM_TAG}")
    return client.get_run(source) if source else run


def end_run(tracking_uri: str, run_id: str, *, ok: bool) -> None:
    status = RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED)
    MlflowClient(tracking_uri).set_terminated(run_id, status=status)


# Tracking-server outages ------------------------------------------------------------------------
# A training run must not stop, nor print a line per step, because the tracking server is away
# for a while: its per-epoch metrics wait in an ``Outbox`` (saved with every checkpoint, so a
# restart keeps them too) and go out, in order and exactly once, when the server answers again.

OUTAGE_PATIENCE_S = 1800.0  # how long the end of training waits for the server before failing the attempt
_RETRYABLE_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "ENDPOINT_NOT_FOUND"}
_ENV_LOCK = threading.Lock()


class TrackingUnavailable(RuntimeError):
    """The tracking server did not come back within ``OUTAGE_PATIENCE_S``; the attempt is retried
    from its last checkpoint, which holds the metrics not yet sent."""


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says the tracking store could not be reached (try again later), rather
    than that the request itself is wrong (a deleted run, an invalid value: fail now)."""
    if isinstance(exc, MlflowException):
        return exc.error_code in _RETRYABLE_CODES
    return isinstance(exc, (OSError, TimeoutError)) or type(exc).__module__.startswith(("requests", "urllib3"))


@contextlib.contextmanager
def fail_fast() -> Iterator[None]:
    """MLflow's HTTP client without its retries (7, with back-off up to 2 minutes each) and with
    a short timeout, and urllib3's per-retry warnings silenced: the ``Outbox`` retries itself."""
    names = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    # urllib3 warns at each retry; MLflow's database store logs each failed query as an ERROR
    # with its whole traceback (a screenful per epoch while a database is away).
    quiet = {logging.getLogger("urllib3.connectionpool"): logging.ERROR,
             logging.getLogger("mlflow.store.db.utils"): logging.CRITICAL}
    with _ENV_LOCK:
        saved = {k: os.environ.get(k) for k in names}
        levels = {log: log.level for log in quiet}
        os.environ.update(names)
        for log, level in quiet.items():
            log.setLevel(level)
        try:
            yield
        finally:
            for log, level in levels.items():
                log.setLevel(level)
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _where(uri: str) -> str:
    """The URI's user, host and port, never a password."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is not None:
        return parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts.netloc or uri


class Outbox:
    """Per-epoch metrics of one run on their way to the tracking store.

    ``log`` stamps the metrics with their step and wall time and tries to send everything
    waiting, in order. When the store cannot be reached it says so once and keeps the
    metrics; the next ``log`` (or ``flush``) sends them, and says once that the store is back.
    A resent batch carries the same (key, value, timestamp, step), which MLflow stores only
    once, so a batch whose reply was lost is not duplicated. ``pending`` goes into the
    checkpoint, so that metrics still waiting when a worker is lost are sent by its restart.
    """

    def __init__(self, client: MlflowClient, run_id: str, pending: Any = (), *, announce: bool = True) -> None:
        """``announce``: say when the store goes away and comes back (the run's own metrics do;
        a second outbox of the same run, its system metrics', keeps quiet)."""
        self._client, self._run_id, self._announce = client, run_id, announce
        self._pending = [entry for entry in (pending if isinstance(pending, list) else []) if _valid_entry(entry)]
        self._down_since: float | None = None
        self._where = _where(client.tracking_uri)
        self._what = "tracking server" if client.tracking_uri.startswith(("http://", "https://")) else "tracking database"

    @property
    def pending(self) -> list[dict[str, Any]]:
        """The batches not yet sent, as plain data (a checkpoint holds them)."""
        return [{"metrics": dict(e["metrics"]), "step": e["step"], "timestamp": e["timestamp"]}
                for e in self._pending]

    def log(self, metrics: Mapping[str, float], *, step: int) -> None:
        self._pending.append({"metrics": {k: float(v) for k, v in metrics.items()}, "step": int(step),
                              "timestamp": int(time.time() * 1000)})
        self.send()

    def send(self) -> bool:
        """Send what waits, oldest first; False when the store is (still) unreachable."""
        sent = 0
        try:
            with fail_fast():
                while self._pending:
                    entry = self._pending[0]
                    items = [Metric(k, v, entry["timestamp"], entry["step"]) for k, v in entry["metrics"].items()]
                    for i in range(0, len(items), 500):
                        self._client.log_batch(self._run_id, metrics=items[i : i + 500])
                    self._pending.pop(0)
                    sent += 1
        except Exception as exc:
            if not is_outage(exc):
                raise
            if self._down_since is None:
                self._down_since = time.monotonic()
                if self._announce:
                    say(f"{self._what} {self._where} unreachable ({_reason(exc)}); training goes on and its "
                        f"metrics are sent when it is back")
            return False
        if self._down_since is not None:
            if self._announce:
                say(f"{self._what} {self._where} is back after {time.monotonic() - self._down_since:.0f} s; "
                    f"{sent} held metric batch{'es' if sent != 1 else ''} sent")
            self._down_since = None
        return True

    def flush(self, patience_s: float = OUTAGE_PATIENCE_S, poll_s: float = 5.0) -> None:
        """Block until everything is sent; ``TrackingUnavailable`` after ``patience_s``."""
        deadline = time.monotonic() + patience_s
        while not self.send():
            if time.monotonic() >= deadline:
                raise TrackingUnavailable(f"{self._what} {self._where} unreachable for {patience_s:.0f} s; "
                                          f"{len(self._pending)} metric batches wait in the checkpoint")
            time.sleep(poll_s)


def _reason(exc: BaseException) -> str:
    """The cause of a failed request in a few words: "connection refused", "timed out", "the
    server closed the connection" (a server stopped or restarted while it answered: no reply, a
    reset, a reply cut short), "not an HTTP reply", "HTTP 503". Never the request's URL."""
    text = str(exc)
    # A database driver's own words (psycopg: "connection failed: connection to server at ...
    # failed: Connection refused"; "server closed the connection unexpectedly").
    for words in ("connection refused", "server closed the connection", "timeout expired", "could not translate host name",
                  "the database system is starting up", "the database system is shutting down"):
        if words in text.lower():
            return {"server closed the connection": "the server closed the connection",
                    "timeout expired": "timed out"}.get(words, words)
    closed = ("RemoteDisconnected", "Remote end closed connection", "Connection reset by peer",
              "ConnectionResetError", "ConnectionAbortedError", "BrokenPipeError", "Broken pipe",
              "IncompleteRead", "Connection broken")
    if any(c in text for c in closed):
        return "the server closed the connection"
    errno = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if errno:
        return errno.group(1).strip().lower()
    if "timeout" in text.lower() or "timed out" in text.lower():
        return "timed out"
    if "BadStatusLine" in text or "LineTooLong" in text:
        return "not an HTTP reply"
    status = re.search(r"error code (\d{3})|too many (\d{3}) error responses", text)
    if status:
        return f"HTTP {status.group(1) or status.group(2)}"
    # The innermost named cause (urllib3 nests them: ProtocolError(..., SomeError(...))).
    causes = re.findall(r"\b(\w+(?:Error|Exception))\(", text)
    if causes:
        return causes[-1]
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    first = re.sub(r"^API request to \S+ failed with exception\s*", "", first)
    return first[:120] or type(exc).__name__


def _valid_entry(entry: Any) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("metrics"), dict)
            and isinstance(entry.get("step"), int) and isinstance(entry.get("timestamp"), int)
            and all(isinstance(k, str) and isinstance(v, float) for k, v in entry["metrics"].items()))


def say(message: str) -> None:
    """One progress line to the driver (Ray forwards a worker's stdout prints twice)."""
    sys.stderr.write(f"[avlab] {message}\n")
    sys.stderr.flush()


# --- what a run has logged (read back by restarted workers) ------------------------------------


def tag_nodes(client: MlflowClient, run_id: str, nodes: list[str]) -> None:
    """``avlab.nodes``: the distinct Ray nodes of this attempt's workers (in rank order);
    ``avlab.node_history``: every attempt's nodes, oldest first, joined by " | " (a restarted
    run shows where it ran before). Kept under MLflow's tag length by dropping the oldest."""
    here = ",".join(dict.fromkeys(nodes))
    previous = client.get_run(run_id).data.tags.get(f"{TAG_PREFIX}node_history", "")
    history = [*(h for h in previous.split(" | ") if h), here]
    while len(" | ".join(history)) > 4000 and len(history) > 1:
        history.pop(0)
    set_tags(client, run_id, {"nodes": here, "node_history": " | ".join(history)})


def training_cost(client: MlflowClient, run_id: str) -> dict[str, float]:
    """Time spent in training steps over every epoch of the run (restarts included) and the
    throughput it gives: ``train_time_s``, ``train_pairs_per_s``; ``train_cpu_pct`` /
    ``train_gpu_pct`` when the epochs logged their use."""
    epochs = {m.step: m.value for m in client.get_metric_history(run_id, "epoch_time_s")}
    rates = {m.step: m.value for m in client.get_metric_history(run_id, "pairs_per_s")}
    total = sum(epochs.values())
    pairs = sum(epochs[e] * rates[e] for e in epochs if e in rates)
    cost = {"train_time_s": total, "train_pairs_per_s": pairs / total if total > 0 else 0.0}
    # The CPU / GPU use of each epoch (orchestrator/system_metrics.py), weighted by its length.
    for epoch_metric, run_metric in (("cpu_pct", "train_cpu_pct"), ("gpu_pct", "train_gpu_pct")):
        use = {m.step: m.value for m in client.get_metric_history(run_id, epoch_metric)}
        timed = sum(epochs[e] for e in use if e in epochs)
        if timed > 0:
            cost[run_metric] = sum(use[e] * epochs[e] for e in use if e in epochs) / timed
    return cost


def last_logged_epoch(client: MlflowClient, run_id: str) -> int:
    history = client.get_metric_history(run_id, "loss")
    return max((m.step for m in history), default=-1)


def logged_evaluation(client: MlflowClient, run_id: str) -> dict[str, float] | None:
    metrics = client.get_run(run_id).data.metrics
    return dict(metrics) if "eval_time_s" in metrics else None


def open_home_store(home_arg: str | Path | None, tracking_uri: str | None) -> tuple[Path, Any]:
    """(home, MlflowClient) of a home whose store already exists, for the commands that read it;
    ConfigError naming ``--home`` when it holds none (nothing is created)."""
    home = resolve_home(home_arg)
    uri = resolve_tracking_uri(home, tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise ConfigError(f"--home: no avlab store at {home}")
    return home, open_store(uri)
