"""avlab's runs in the MLflow store: a sweep's parent run and its trials, the runs a name
means, and settling what a stopped job leaves RUNNING."""

from __future__ import annotations

import re
from typing import Any

from mlflow.tracking import MlflowClient

from orchestrator.errors import ConfigError
from orchestrator.jobs import NAME_PATTERN

SWEEP_EXPERIMENT = "avlab-sweeps"


def find_sweep_run(client: MlflowClient, name: str):
    """The parent run of sweep ``name``, or None."""
    exp = client.get_experiment_by_name(SWEEP_EXPERIMENT)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id],
        f"tags.`avlab.sweep_name` = '{name}' and tags.`avlab.kind` = 'sweep'",
        max_results=1,
    )
    return runs[0] if runs else None


def sweep_metric(params: dict[str, str]) -> str:
    """The metric a sweep's parent run optimises (its ``metric`` parameter, else the default;
    imported here so that `status` and `report` start without the methods package)."""
    from methods.metric_names import DEFAULT_METRIC

    return params.get("metric") or DEFAULT_METRIC


# Runs per request of ``search_all``: MLflow's stores answer at most 50 000 at once, and a smaller
# page keeps each reply (and the server's work for it) bounded.
PAGE = 5000


def search_all(client: MlflowClient, experiment_ids: list[str], filter_string: str, **kwargs: Any) -> list:
    """Every run that matches, page after page: a search capped at one page would lose the runs
    past it without a word (a sweep of more trials, a store of more runs)."""
    out, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=PAGE, page_token=token, **kwargs)
        out.extend(page)
        token = page.token
        if not token:
            return out


def children(client: MlflowClient, parent_id: str, *, params: tuple[str, ...] | None = None,
             tags: tuple[str, ...] | None = None, metrics: tuple[str, ...] | None = None) -> list:
    """The trial runs of the sweep whose parent run is ``parent_id``.

    What a read-only command needs of each run can be named: ``params``, prefixes of the
    parameters (``()``: none); ``tags`` and ``metrics``, their keys (``mlflow.*`` tags always
    come). None is all of them. On a database store (SQLite, PostgreSQL) such a read selects
    the runs' rows and the named tags, latest metrics and parameters in four queries
    (``_children_from_tables``): MLflow's search loads each run whole, about 100 parameters, 30
    tags and 60 metrics a trial, which made `avlab status` of a 1 000-trial sweep take 11 s
    (benchmarks/RESULTS.md, "Store scale"). Elsewhere (a tracking server) the search answers,
    with everything."""
    exp = client.get_experiment_by_name(SWEEP_EXPERIMENT)
    if (params, tags, metrics) != (None, None, None):
        store = getattr(getattr(client, "_tracking_client", None), "store", None)
        if hasattr(store, "ManagedSessionMaker"):
            return _children_from_tables(store, exp.experiment_id, parent_id, params, tags, metrics)
    return search_all(client, [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")


def shared_params(client: MlflowClient, parent_id: str, prefixes: tuple[str, ...]) -> dict[str, str]:
    """The parameters under ``prefixes`` that every finished trial of the sweep has, with the same
    value in all of them. On a database store one grouped query answers (a report of a
    5 000-trial sweep read 330 000 parameter rows for this otherwise); elsewhere the trials are
    read whole."""
    exp = client.get_experiment_by_name(SWEEP_EXPERIMENT)
    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    if not hasattr(store, "ManagedSessionMaker"):
        runs = [r for r in children(client, parent_id) if r.info.status == "FINISHED"]
        if not runs:
            return {}
        return {k: v for k, v in runs[0].data.params.items()
                if k.startswith(prefixes) and all(r.data.params.get(k) == v for r in runs)}
    from mlflow.store.tracking.dbmodels.models import SqlParam, SqlRun, SqlTag
    from sqlalchemy import func, or_

    with store.ManagedSessionMaker() as session:
        ids = session.query(SqlTag.run_uuid).filter(SqlTag.key == "mlflow.parentRunId", SqlTag.value == parent_id)
        finished = session.query(SqlRun.run_uuid).filter(
            SqlRun.run_uuid.in_(ids), SqlRun.experiment_id == int(exp.experiment_id),
            SqlRun.lifecycle_stage == "active", SqlRun.status == "FINISHED")
        count = finished.count()
        rows = (session.query(SqlParam.key, func.min(SqlParam.value))
                .filter(SqlParam.run_uuid.in_(finished),
                        or_(*(SqlParam.key.startswith(p, autoescape=True) for p in prefixes)))
                .group_by(SqlParam.key)
                .having(func.count(func.distinct(SqlParam.value)) == 1, func.count() == count).all())
    return dict(rows) if count else {}


def _children_from_tables(store: Any, experiment_id: str, parent_id: str, params: tuple[str, ...] | None,
                          tags: tuple[str, ...] | None, metrics: tuple[str, ...] | None) -> list:
    """``children`` read from MLflow's own tables through its SQLAlchemy models: the active
    runs of ``experiment_id`` tagged with the parent, as MLflow ``Run`` entities with the tags,
    latest metrics (the values a search returns) and parameters asked for."""
    from mlflow.entities import Metric, Param, Run, RunData, RunInfo, RunTag
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlParam, SqlRun, SqlTag
    from sqlalchemy import or_

    with store.ManagedSessionMaker() as session:
        ids = (session.query(SqlTag.run_uuid)
               .filter(SqlTag.key == "mlflow.parentRunId", SqlTag.value == parent_id).subquery())
        rows = (session.query(SqlRun.run_uuid, SqlRun.experiment_id, SqlRun.user_id, SqlRun.status,
                              SqlRun.start_time, SqlRun.end_time, SqlRun.lifecycle_stage, SqlRun.artifact_uri,
                              SqlRun.name)
                .filter(SqlRun.run_uuid.in_(session.query(ids.c.run_uuid)),
                        SqlRun.experiment_id == int(experiment_id), SqlRun.lifecycle_stage == "active")
                .order_by(SqlRun.start_time.desc(), SqlRun.run_uuid).all())
        mine = session.query(SqlRun.run_uuid).filter(SqlRun.run_uuid.in_(session.query(ids.c.run_uuid)))
        found_tags: dict[str, list] = {}
        query = session.query(SqlTag.run_uuid, SqlTag.key, SqlTag.value).filter(SqlTag.run_uuid.in_(mine))
        if tags is not None:
            query = query.filter(or_(SqlTag.key.in_(tags), SqlTag.key.startswith("mlflow.", autoescape=True)))
        for run, key, value in query:
            found_tags.setdefault(run, []).append(RunTag(key, value))
        found_metrics: dict[str, list] = {}
        query = session.query(SqlLatestMetric.run_uuid, SqlLatestMetric.key, SqlLatestMetric.value,
                              SqlLatestMetric.timestamp, SqlLatestMetric.step, SqlLatestMetric.is_nan
                              ).filter(SqlLatestMetric.run_uuid.in_(mine))
        if metrics is not None:
            query = query.filter(SqlLatestMetric.key.in_(metrics))
        for run, key, value, ts, step, nan in query:
            found_metrics.setdefault(run, []).append(Metric(key, float("nan") if nan else value, ts, step))
        values: dict[str, list] = {}
        if params is None or params:
            query = session.query(SqlParam.run_uuid, SqlParam.key, SqlParam.value).filter(SqlParam.run_uuid.in_(mine))
            if params is not None:
                query = query.filter(or_(*(SqlParam.key.startswith(p, autoescape=True) for p in params)))
            for run, key, value in query:
                values.setdefault(run, []).append(Param(key, value))
    return [Run(RunInfo(run_id=r[0], experiment_id=str(r[1]), user_id=r[2], status=r[3], start_time=r[4], end_time=r[5],
                        lifecycle_stage=r[6], artifact_uri=r[7], run_name=r[8]),
                RunData(metrics=found_metrics.get(r[0], []), params=values.get(r[0], []),
                        tags=found_tags.get(r[0], [])))
            for r in rows]


RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def runs_named(client: MlflowClient, name: str, field: str) -> tuple[list, Any]:
    """(finished runs, sweep parent or None) that ``name`` means: a run id, a sweep's name (its
    finished trials), a run name, or a sweep trial's name (``<sweep>/<configuration>/seed<N>``).
    Errors name ``field``.

    The names avlab gives runs and sweeps pass ``jobs.check_name``, and a trial's name starts
    with its sweep's: any other name is refused before it reaches an MLflow search filter (where
    a quote would end the string)."""
    if RUN_ID.match(name):
        try:
            return [client.get_run(name)], None
        except Exception:  # MlflowException: no such run; fall through to names
            pass
    sweep, slash, _ = name.partition("/")
    if not NAME_PATTERN.fullmatch(sweep):
        raise ConfigError(f"{field}: {name!r} is not a run id, a run name or a sweep name avlab makes (letters, "
                          "digits, '.', '_' and '-'; a sweep's trial: <sweep>/<configuration>/seed<N>)")
    if slash:  # a trial: matched among its sweep's runs, never quoted into a filter
        parent = find_sweep_run(client, sweep)
        runs = [r for r in children(client, parent.info.run_id) if r.info.run_name == name] if parent else []
        if not runs:
            raise ConfigError(f"{field}: no run or sweep named {name!r} in this store")
        return runs[:1], None
    parent = find_sweep_run(client, name)
    if parent is not None:
        trials = [r for r in children(client, parent.info.run_id) if r.info.status == "FINISHED"]
        if not trials:
            raise ConfigError(f"{field}: sweep {name!r} has no finished trial yet")
        return trials, parent
    ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(ids, f"attributes.run_name = '{name}'", max_results=2)
    if not runs:
        raise ConfigError(f"{field}: no run or sweep named {name!r} in this store")
    if len(runs) > 1:
        raise ConfigError(f"{field}: several runs are named {name!r}; give the run id")
    return runs, None


def settle(tracking_uri: str, kind: str, run_id: str, *, status: str = "KILLED") -> tuple[int, int]:
    """Mark what is still RUNNING of the job as a stopped job leaves it: the run or the sweep's
    parent run ``status`` (FAILED when Ray was lost under it), each unfinished trial KILLED (it
    continues from its checkpoint); returns (trials ended, trials) for a sweep, (0, 0) for a run."""
    client = MlflowClient(tracking_uri)
    if kind == "run":
        run = client.get_run(run_id)
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status=status)
        return 0, 0
    parent = run_id
    trials = children(client, parent)
    for run in trials:
        if run.info.status == "RUNNING":
            from orchestrator.tracking import ran_to_end

            client.set_terminated(run.info.run_id, status="FINISHED" if ran_to_end(run) else "KILLED")
    if client.get_run(parent).info.status == "RUNNING":
        client.set_terminated(parent, status=status)
    ended = sum(r.info.status in ("FINISHED", "FAILED") for r in children(client, parent))
    return ended, len(trials)

