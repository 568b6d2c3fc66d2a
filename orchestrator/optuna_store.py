"""A finished Optuna sweep as a study in Optuna's own storage, ``<home>/optuna.db``, so that
``optuna-dashboard sqlite:///<home>/optuna.db`` opens it (history, importances, Pareto front).

The study is written from the sweep's MLflow child runs when the sweep ends (and again after
``avlab resume``), not by the live search: the searcher keeps its in-memory study, which is
what Tune saves with the experiment and restores after a lost driver, so resumed proposals stay
the ones an uninterrupted sweep makes. The study is named after the sweep and rewritten whole
each time, so it always matches MLflow.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from orchestrator.search_space import SearchSpace

STUDY_FILE = "optuna.db"


def storage_url(home: Path) -> str:
    return f"sqlite:///{(home / STUDY_FILE).resolve()}"


def _distributions(space: SearchSpace) -> dict:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for path, d in space.search.items():
        if d.type == "choice":
            out[path] = CategoricalDistribution(list(d.values))
        elif d.type == "int":
            out[path] = IntDistribution(int(d.low), int(d.high))
        else:
            out[path] = FloatDistribution(float(d.low), float(d.high), log=d.type == "loguniform")
    return out


def _value(dist, text: str):
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        return next((c for c in dist.choices if str(c) == text), text)
    return int(float(text)) if isinstance(dist, IntDistribution) else float(text)


def save_study(client: MlflowClient, home: Path, name: str, space: SearchSpace, parent_id: str) -> str | None:
    """Write the sweep's finished trials as the Optuna study ``name``; returns the storage URL
    (None for a grid, which Optuna did not search)."""
    if not space.uses_optuna:
        return None
    import optuna

    from orchestrator.runs import children as _children

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage_url(home)
    storage = optuna.storages.RDBStorage(url)
    if name in {s.study_name for s in optuna.get_all_study_summaries(storage)}:
        optuna.delete_study(study_name=name, storage=storage)
    objectives = [(space.chosen(m), d) for m, d in space.all_objectives]  # what the search read
    study = optuna.create_study(storage=storage, study_name=name,
                                directions=["maximize" if d == "max" else "minimize" for _, d in objectives])
    study.set_user_attr("avlab.search_space", space.path.name)
    study.set_metric_names([m for m, _ in objectives])
    dists = _distributions(space)
    runs = sorted(_children(client, parent_id), key=lambda r: r.info.start_time or 0)
    for run in runs:
        params = {k: _value(dists[k], run.data.params[f"varied.{k}"]) for k in dists if f"varied.{k}" in run.data.params}
        if len(params) != len(dists):
            continue
        values = [run.data.metrics.get(m) for m, _ in objectives]
        complete = run.info.status == "FINISHED" and all(v is not None and math.isfinite(v) for v in values)
        state = optuna.trial.TrialState.COMPLETE if complete else optuna.trial.TrialState.FAIL
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions=dists, values=values if complete else None, state=state,
            user_attrs={"mlflow_run_id": run.info.run_id, "seed": run.data.tags.get("avlab.seed", "")},
        ))
    return url
