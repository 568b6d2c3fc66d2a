"""What a driver hands to the training loop of a run or a trial: a ``WorkerSpec``, built by one
function (``worker_spec``), sent to every worker and read there by ``orchestrator.train``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.config import ExperimentConfig


@dataclass(frozen=True)
class WorkerSpec:
    """One run's hand-off: plain values only, so that Ray can send it to any worker process.

    ``config`` is the resolved experiment config as ``ExperimentConfig.to_dict`` writes it (the
    worker parses it again, unchecked: the driver checked it); ``init_checkpoint`` the verified
    checkpoint folder that ``train.init_from`` names ("" for none). Start-up timing: a Ray Train
    launch gives its wall-clock start (``launched_at``), the worker measures the rest; a trial
    that trains in its own process measured both itself (``launch_time_s``, ``import_time_s``).
    ``sweep_trial``: a trial of a sweep, which leaves its MLflow models to the sweep's end
    (``orchestrator.export``). ``dry_run_s``: not None for a trial of ``avlab sweep --dry-run``,
    which trains nothing and holds its resources that many seconds (``orchestrator.dry_run``)."""

    config: dict[str, Any]
    run_id: str
    tracking_uri: str
    init_checkpoint: str = ""
    launched_at: float | None = None
    launch_time_s: float | None = None
    import_time_s: float | None = None
    sweep_trial: bool = False
    dry_run_s: float | None = None


def worker_spec(cfg: ExperimentConfig, *, run_id: str, tracking_uri: str, init_checkpoint: str,
                launched_at: float | None = None, launch_time_s: float | None = None,
                import_time_s: float | None = None, sweep_trial: bool = False,
                dry_run_s: float | None = None) -> WorkerSpec:
    """The spec of ``cfg``'s MLflow run ``run_id``; ``init_checkpoint`` is what the driver's
    checks found for ``train.init_from`` (``checkpoint.init_checkpoint``), not resolved again."""
    return WorkerSpec(config=cfg.to_dict(), run_id=run_id, tracking_uri=tracking_uri, init_checkpoint=init_checkpoint,
                      launched_at=launched_at, launch_time_s=launch_time_s, import_time_s=import_time_s,
                      sweep_trial=sweep_trial, dry_run_s=dry_run_s)
