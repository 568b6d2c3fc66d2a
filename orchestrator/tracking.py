"""MLflow tracking: one run per ``avlab run`` (a child run per trial in sweeps), found again by id.

The driver creates the run and logs the resolved config; the rank-0 training worker logs per-epoch
metrics with ``step=epoch`` and the downstream results into the same run id, so a restarted
worker keeps writing to its own run.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient

from orchestrator.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TAG_PREFIX = "avlab."
# MLflow's tracking stores: a local folder (no scheme or file), a database through SQLAlchemy
# (``postgresql+psycopg2://`` names a driver too), a tracking server, Databricks.
TRACKING_SCHEMES = ("", "file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")


def resolve_home(home: str | os.PathLike[str] | None = None) -> Path:
    """``--home`` > ``AVLAB_HOME`` > ./avlab-runs."""
    chosen = home or os.environ.get("AVLAB_HOME") or "avlab-runs"
    path = Path(chosen).expanduser().resolve()
    if path.exists() and not path.is_dir():
        source = "AVLAB_HOME" if not home and os.environ.get("AVLAB_HOME") else "--home"
        raise ConfigError(f"{source}: {path} is a file; the home is a folder (it holds mlflow.db, jobs/ and ray/)")
    return path


def storage_root(home: Path) -> str:
    """Where Ray Train and Tune keep checkpoints and experiment state: ``AVLAB_STORAGE`` (a
    shared folder or an ``s3://`` / ``gs://`` URI every node can reach) > ``<home>/ray``."""
    chosen = os.environ.get("AVLAB_STORAGE", "").strip()
    if not chosen:
        return str(home / "ray")
    if "://" in chosen:
        return chosen.rstrip("/")
    return str(Path(chosen).expanduser().resolve())


def resolve_tracking_uri(home: Path, uri: str | None = None) -> str:
    """``--tracking-uri`` > ``MLFLOW_TRACKING_URI`` > sqlite file in the home folder."""
    if uri:
        return check_tracking_uri(uri, "--tracking-uri")
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return check_tracking_uri(os.environ["MLFLOW_TRACKING_URI"], "MLFLOW_TRACKING_URI")
    return f"sqlite:///{home / 'mlflow.db'}"


def check_tracking_uri(uri: str, field: str) -> str:
    """``uri`` if MLflow has a tracking store for its scheme and it carries no credentials; else
    a ConfigError naming ``field``."""
    try:
        parsed = urllib.parse.urlparse(uri)
        scheme = parsed.scheme.lower().split("+", 1)[0]
        password = parsed.password
    except ValueError as exc:  # e.g. an unclosed [ of an IPv6 host
        raise ConfigError(f"{field}: {uri!r} is not a URI ({exc})") from None
    if password is not None or (scheme in ("http", "https") and parsed.username):
        # The URI is written into <home>/jobs/NAME.json (and shown in logs): no secrets in it.
        raise ConfigError(f"{field}: the URI carries credentials, and avlab writes it into <home>/jobs/*.json; "
                          f"give them through MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (a tracking "
                          f"server) or the database's own client configuration instead")
    if scheme not in TRACKING_SCHEMES:
        raise ConfigError(f"{field}: unknown scheme {scheme!r} in {uri!r}; use one of "
                          f"{', '.join(s + '://' for s in TRACKING_SCHEMES if s)} or a folder path")
    return uri


def prepare_store(uri: str) -> None:
    """Create the SQLite store of ``uri`` (if it is one) under a file lock beside it: two avlab
    commands that create one fresh store at once otherwise race in MLflow's schema migration."""
    if not uri.startswith("sqlite:///"):
        return
    import fcntl

    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            MlflowClient(uri).search_experiments(max_results=1)  # creates and migrates the tables
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def get_or_create_experiment(client: MlflowClient, name: str, home: Path) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifacts = (home / "mlartifacts" / name).resolve()
    artifacts.mkdir(parents=True, exist_ok=True)
    return client.create_experiment(name, artifact_location=artifacts.as_uri())


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


def end_run(tracking_uri: str, run_id: str, *, ok: bool) -> None:
    status = RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED)
    MlflowClient(tracking_uri).set_terminated(run_id, status=status)
