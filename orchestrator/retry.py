"""``avlab resume --retry-failed``: trials (or a run) that a deterministic error ended train
again once its cause is fixed, each from its last checkpoint, in its own MLflow run. The sweep's
Tune experiment counts them as ended, so ``orchestrator.sweep.fit_sweep`` runs them in a Tuner
of their own (``retry_tuner``) after it has restored the sweep's."""

from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING, Any

from mlflow.tracking import MlflowClient

from orchestrator import tracking
from orchestrator.runs import children as _children

if TYPE_CHECKING:
    from orchestrator.search_space import SearchSpace

RETRY_TAG = "retry_pending"  # a failed trial that ``--retry-failed`` let train again, not yet ended


def clear_failures(client: MlflowClient, parent_id: str) -> list[str]:
    """``avlab resume --retry-failed``: every trial of the sweep that a deterministic error ended
    may train again (its cause fixed): its failure is cleared (``tracking.clear_failure``), it is
    marked to retry and KILLED, like a trial that was interrupted, so it continues from its last
    checkpoint. Finished trials stay as they are. The failed trials' lines, one each."""
    lines = []
    for run in _children(client, parent_id):
        line = run.data.tags.get(f"{tracking.TAG_PREFIX}{tracking.FAILED_TAG}")
        if not line:
            continue
        tracking.set_tags(client, run.info.run_id, {RETRY_TAG: "true"})
        tracking.clear_failure(client, run, line)
        client.set_terminated(run.info.run_id, status="KILLED")
        lines.append(f"{run.info.run_name}: {line}")
    return lines


def clear_for_retry(client: MlflowClient, kind: str, name: str, run_id: str, failure: str) -> None:
    """``avlab resume --retry-failed`` of run or sweep ``name`` (MLflow run ``run_id``; a run's
    recorded ``failure``): clear what failed and say what will train again."""
    if kind == "run":
        retried = [f"{name}: {failure}"] if failure else []
        if failure:
            tracking.clear_failure(client, client.get_run(run_id), failure)
    else:
        retried = clear_failures(client, run_id)
    if not retried:
        print(f"[avlab] {kind} {name}: nothing failed, nothing to retry", flush=True)
        return
    what = "trial" if kind == "sweep" else "run"
    print(f"[avlab] retrying {len(retried)} failed {what}{'s' * (len(retried) != 1)} from "
          f"{'their' if len(retried) != 1 else 'its'} last checkpoint"
          + "".join(f"\n[avlab]   {line}" for line in retried), flush=True)


def retry_pending(client: MlflowClient, parent_id: str) -> list:
    """The sweep's trials that ``--retry-failed`` let train again and that have not ended since."""
    return [r for r in _children(client, parent_id)
            if r.data.tags.get(f"{tracking.TAG_PREFIX}{RETRY_TAG}") == "true"
            and r.info.status not in ("FINISHED", "FAILED")]


def _proposal(space: SearchSpace, run) -> dict[str, Any]:
    """The Tune config of an Optuna proposal, from its run (values typed by their dimension)."""
    values: dict[str, Any] = {"seed": int(run.data.tags[f"{tracking.TAG_PREFIX}seed"])}
    for path, d in space.search.items():
        raw = run.data.params[f"varied.{path}"]
        if d.type in ("uniform", "loguniform"):
            values[path] = float(raw)
        elif d.type == "int":
            values[path] = int(raw)
        else:
            values[path] = next(v for v in d.values if str(v) == raw)
    return values


def retry_tuner(space: SearchSpace, trainable: Any, runs: list, *, storage: str, name: str, max_concurrent: int) -> Any:
    """A Tuner over exactly the trials ``runs`` (failed, their failure cleared). The sweep's own
    Tune experiment counts them as ended, so they run in an experiment of their own, beside it;
    each finds its run (a grid trial by its config, a proposal by its values) and continues from
    its checkpoints. No scheduler: a retried trial runs to its end."""
    from ray import tune

    prefix = tracking.TAG_PREFIX
    if space.uses_optuna:
        param_space = {"retry": tune.grid_search([_proposal(space, r) for r in runs])}
    else:
        param_space = {"trial": tune.grid_search(
            [f"{r.data.tags[prefix + 'config_label']} seed={r.data.tags[prefix + 'seed']}" for r in runs])}
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent, reuse_actors=True),
        run_config=tune.RunConfig(
            name=f"retry-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}",
            storage_path=f"{tracking.experiment_path(storage, name)}.retries", verbose=1,
            failure_config=tune.FailureConfig(max_failures=space.first_config().train.max_failures),
        ),
    )
