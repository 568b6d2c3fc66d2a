"""Results bundles: finished runs and sweeps of one avlab home written to a folder, and read into
another home, so that its ``avlab report``, ``reproduce``, ``status`` and ``resume`` find them as if
they had run there.

A bundle is plain files, readable without avlab (no pickles)::

    bundle.json                     format, what it holds, the results version that made it
    jobs/<NAME>.json                each job's record (its config or search space)
    runs/<RUN_ID>/run.json          a run: experiment, name, status, times, params, tags and every
                                    metric's whole history (step, timestamp, value)
    runs/<RUN_ID>/artifacts/...     its artifacts (config.yaml, plots, encoders, reports)

A job's runs are its MLflow run and every run below it (a sweep's trials, ``avlab evaluate``'s
runs). MLflow gives every imported run a new id; the import rewrites every tag that names an
exported run (``mlflow.parentRunId``, ``avlab.reused_from``) and the job records to the new ids,
keeps each run's times, and tags it ``avlab.imported_from`` (its id in the exporting store).
An Optuna sweep's study (``<home>/optuna.db``) is rebuilt from the imported trials. Only finished
jobs travel: an unfinished one is resumed where it runs (its Ray state stays there). MLflow's
model registry and logged-model entries do not travel; the encoders do, as run artifacts.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from orchestrator import jobs, tracking
from orchestrator.errors import ConfigError
from orchestrator.export import download
from orchestrator.runs import RUN_ID, find_sweep_run, search_all

FORMAT = 1
INDEX = "bundle.json"
IMPORTED_TAG = "avlab.imported_from"
# MLflow's limits on one log_batch call.
_BATCH = {"metrics": 1000, "params": 100, "tags": 100}


@dataclass(frozen=True)
class Moved:
    """What an export or an import moved: job names, runs and artifact files."""

    jobs: tuple[str, ...]
    runs: int
    artifacts: int
    outside: tuple[str, ...] = ()  # runs reused trials took their weights from, not in the bundle


# --- export ------------------------------------------------------------------------------------


def export_bundle(home: Path, client: MlflowClient, names: Sequence[str], out: Path) -> Moved:
    """Write the finished jobs ``names`` of ``home`` (store ``client``) into the new folder ``out``.
    ConfigError before anything is written: an unknown or unfinished job, an ``out`` that exists
    and is not empty."""
    if not names:
        raise ConfigError("NAME: name at least one run or sweep to export")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out: {out} exists and is not an empty folder; a bundle is written to a new one")
    records = []
    for name in dict.fromkeys(names):
        jobs.check_name(name, "NAME")
        record = jobs.read(home, name)
        run = client.get_run(record.run_id)
        if run.info.status != "FINISHED":
            raise ConfigError(f"NAME: {name} is not finished (its MLflow run is {run.info.status}); `avlab resume "
                              f"{name}` finishes it where it runs, then it can be exported")
        records.append(record)
    runs = []
    for record in records:
        runs += _tree(client, client.get_run(record.run_id))
    ids = {r.info.run_id for r in runs}
    outside = sorted({r.data.tags["avlab.reused_from"] for r in runs
                      if r.data.tags.get("avlab.reused_from") and r.data.tags["avlab.reused_from"] not in ids})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # renamed into place once complete
    try:
        files = 0
        for run in runs:
            files += _write_run(client, run, tmp / "runs" / run.info.run_id)
        (tmp / "jobs").mkdir()
        for record in records:
            data = record.to_json()
            for key in ("tracking_uri", "address", "storage", "home", "driver"):  # where it ran, not what it is
                data[key] = None
            _write_json(tmp / "jobs" / f"{record.name}.json", data)
        _write_json(tmp / INDEX, {
            "format": FORMAT, "results_version": tracking.RESULTS_VERSION, "jobs": [r.name for r in records],
            "runs": [r.info.run_id for r in runs],
        })
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Moved(tuple(r.name for r in records), len(runs), files, tuple(outside))


def _tree(client: MlflowClient, root) -> list:
    """``root`` and every run below it (parents before their children), over all experiments."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    out, frontier = [root], [root]
    while frontier:
        run = frontier.pop()
        below = search_all(client, experiments, f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
        out += below
        frontier += below
    return out


def _write_run(client: MlflowClient, run, folder: Path) -> int:
    info = run.info
    history = {key: [[m.step, m.timestamp, m.value] for m in client.get_metric_history(info.run_id, key)]
               for key in sorted(run.data.metrics)}
    folder.mkdir(parents=True)
    _write_json(folder / "run.json", {
        "experiment": client.get_experiment(info.experiment_id).name, "run_name": info.run_name,
        "status": info.status, "start_time": info.start_time, "end_time": info.end_time,
        "params": dict(run.data.params), "tags": dict(run.data.tags), "metrics": history,
    })
    if not client.list_artifacts(info.run_id):
        return 0
    target = folder / "artifacts"
    target.mkdir()
    download(client, info.run_id, "", str(target))
    return sum(1 for p in target.rglob("*") if p.is_file())


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True, allow_nan=True) + "\n")


# --- import ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Run:
    old_id: str
    experiment: str
    run_name: str
    status: str
    start_time: int
    end_time: int | None
    params: dict[str, str]
    tags: dict[str, str]
    metrics: dict[str, list[tuple[int, int, float]]]
    artifacts: Path | None


def import_bundle(home: Path, tracking_uri: str, src: Path) -> Moved:
    """Read the bundle ``src`` into ``home`` (store ``tracking_uri``). Everything is read and checked
    first: a damaged bundle or a job name this home already has is a ConfigError naming it, before
    anything is written; a failure while writing removes the runs it created."""
    index, records, runs = _read_bundle(src)
    tracking.prepare_store(tracking_uri)
    client = MlflowClient(tracking_uri)
    for record in records:
        if jobs.exists(home, record.name) or (record.kind == "sweep" and find_sweep_run(client, record.name)):
            raise ConfigError(f"{src / 'jobs' / (record.name + '.json')}: this home already has a job named "
                              f"{record.name!r}; import into another home, or rename it there first")
    created: dict[str, str] = {}
    try:
        for run in runs:  # parents first: the export wrote them so
            created[run.old_id] = _create_run(client, home, run)
        for run in runs:
            tags = [RunTag(k, created.get(v, v)) for k, v in run.tags.items() if k != "mlflow.runName"]
            tags.append(RunTag(IMPORTED_TAG, run.old_id))
            for i in range(0, len(tags), _BATCH["tags"]):
                client.log_batch(created[run.old_id], tags=tags[i : i + _BATCH["tags"]])
            client.set_terminated(created[run.old_id], run.status, end_time=run.end_time)
    except BaseException:
        for run_id in created.values():
            try:
                client.delete_run(run_id)
            except Exception:  # noqa: BLE001 - best effort: the error that stopped the import matters
                pass
        raise
    for record in records:
        jobs.write(home, jobs.JobRecord(
            kind=record.kind, name=record.name, run_id=created[record.run_id], tracking_uri=tracking_uri,
            config=record.config, space=record.space, max_concurrent=record.max_concurrent,
            reuse_trials=record.reuse_trials, reuse_any_environment=record.reuse_any_environment,
            storage=tracking.storage_root(home),
        ))
        if record.kind == "sweep":
            _rebuild_study(client, home, record, created[record.run_id])
    artifacts = sum(1 for r in runs if r.artifacts for p in r.artifacts.rglob("*") if p.is_file())
    return Moved(tuple(r.name for r in records), len(runs), artifacts, ())


def _rebuild_study(client: MlflowClient, home: Path, record: jobs.JobRecord, parent_id: str) -> None:
    from orchestrator.optuna_store import save_study
    from orchestrator.search_space import SearchSpace

    space = SearchSpace.from_dict(record.space)
    if space.uses_optuna:
        save_study(client, home, record.name, space, parent_id)


def _create_run(client: MlflowClient, home: Path, run: _Run) -> str:
    experiment = tracking.get_or_create_experiment(client, run.experiment, home)
    run_id = client.create_run(experiment, start_time=run.start_time, run_name=run.run_name).info.run_id
    params = [Param(k, v) for k, v in run.params.items()]
    metrics = [Metric(key, value, timestamp, step) for key, points in run.metrics.items()
               for step, timestamp, value in points]
    for i in range(0, len(params), _BATCH["params"]):
        client.log_batch(run_id, params=params[i : i + _BATCH["params"]])
    for i in range(0, len(metrics), _BATCH["metrics"]):
        client.log_batch(run_id, metrics=metrics[i : i + _BATCH["metrics"]])
    if run.artifacts is not None:
        client.log_artifacts(run_id, str(run.artifacts))
    return run_id


def _read_bundle(src: Path) -> tuple[dict[str, Any], list[jobs.JobRecord], list[_Run]]:
    index_path = src / INDEX
    if not index_path.is_file():
        raise ConfigError(f"BUNDLE: {src} is not an avlab results bundle (no {INDEX})")
    index = _read_json(index_path)
    if not isinstance(index, dict) or index.get("format") != FORMAT or not _strings(index.get("jobs")) \
            or not _strings(index.get("runs")) or not all(RUN_ID.match(r) for r in index["runs"]):
        raise ConfigError(f"{index_path}: not a bundle index of format {FORMAT} (jobs and runs)")
    records = []
    for name in index["jobs"]:
        jobs.check_name(name, str(index_path))
        path = src / "jobs" / f"{name}.json"
        data = _read_json(path)
        if isinstance(data, dict):
            data = {**data, "tracking_uri": ""}  # the store it came from is not this one
        records.append(jobs.JobRecord.from_json(data, path))
    runs = [_read_run(src / "runs" / run_id, run_id) for run_id in index["runs"]]
    known = set(index["runs"])
    for record in records:
        if record.run_id not in known:
            raise ConfigError(f"{src / 'jobs' / (record.name + '.json')}: its run {record.run_id} is not in the bundle")
    for run in runs:
        parent = run.tags.get("mlflow.parentRunId")
        if parent and parent not in known:
            raise ConfigError(f"{src / 'runs' / run.old_id / 'run.json'}: its parent run {parent} is not in the bundle")
    return index, records, runs


def _read_run(folder: Path, run_id: str) -> _Run:
    path = folder / "run.json"
    data = _read_json(path)
    try:
        if not isinstance(data, dict):
            raise TypeError("not a mapping")
        for key in ("params", "tags", "metrics"):
            if not isinstance(data[key], dict):
                raise TypeError(f"{key} is not a mapping")
        metrics = {str(k): [(int(s), int(t), float(v)) for s, t, v in points] for k, points in data["metrics"].items()}
        if not all(isinstance(v, str) for v in (*data["params"].values(), *data["tags"].values())):
            raise TypeError("a param or tag that is not text")
        if data["status"] not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"status {data['status']!r}")
        run = _Run(run_id, str(data["experiment"]), str(data["run_name"] or ""), data["status"],
                   int(data["start_time"]), None if data["end_time"] is None else int(data["end_time"]),
                   dict(data["params"]), dict(data["tags"]), metrics,
                   folder / "artifacts" if (folder / "artifacts").is_dir() else None)
    except (KeyError, TypeError, ValueError) as exc:
        what = f"no {exc.args[0]!r}" if isinstance(exc, KeyError) else str(exc)
        raise ConfigError(f"{path}: not a run as avlab writes it ({what})") from None
    if not run.experiment.strip():
        raise ConfigError(f"{path}: not a run as avlab writes it (no experiment)")
    return run


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing from the bundle") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable ({type(exc).__name__})") from None


def _strings(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def summary(moved: Moved, verb: str, where: Path) -> Iterable[str]:
    """The lines a command prints for ``moved``."""
    yield (f"[avlab] {verb} {', '.join(moved.jobs)}: {moved.runs} runs, {moved.artifacts} artifact files "
           f"({where})")
    if moved.outside:
        yield (f"[avlab] note: {len(moved.outside)} reused trial(s) take their weights from runs outside the bundle "
               f"({', '.join(moved.outside[:3])}{', ...' if len(moved.outside) > 3 else ''}); export the sweeps that "
               "hold them too, for `avlab export` / `avlab evaluate` of those trials")
