"""Freeing the workers of a run whose controller died abruptly, without Ray's state API.

A Ray Train run reserves its workers' CPUs and GPUs in a placement group that lives as long as
the Ray job, not as long as the run's controller. When the controller dies abruptly (a Tune
trial's actor OOM-killed or SIGKILLed, a trial stopped early by ASHA), Ray Train's detached
``PlacementGroupCleaner`` removes the group, or later trials wait for those resources forever.
Ray's cleaner asks the dashboard's state API whether the controller still lives: without the
dashboard every query fails (a warning every few seconds, and the group is never freed), and
with a second Ray instance on the machine the query dies on "Found multiple active Ray
instances". The cleaner here asks the GCS, which every connected Ray process reaches, so it
works with or without the dashboard and beside other Ray instances.

Imported only where a trainer is built (it imports Ray Train).
"""

from __future__ import annotations

from typing import Any

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks import placement_group_callback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.train.v2._internal.execution.controller import placement_group_cleaner
from ray.train.v2._internal.execution.controller.placement_group_cleaner import PlacementGroupCleaner
from ray.util.state.exception import RayStateApiException


def controller_alive(actor_id: str, timeout: float | None = None) -> bool:
    """Whether the actor ``actor_id`` lives, from the GCS actor table (no dashboard needed). An
    actor the GCS does not know counts as gone, as in Ray's own check."""
    from ray._private import state

    try:
        info = state.actors(actor_id=actor_id)
    except Exception as exc:  # the GCS is unreachable for now: Ray's cleaner warns and asks again
        raise RayStateApiException(f"GCS actor table unavailable: {exc}") from exc
    return bool(info) and info.get("State") != "DEAD"


class GcsPlacementGroupCleaner(PlacementGroupCleaner):
    """Ray Train's cleaner, asking the GCS instead of the state API. It runs in a detached actor
    process of its own, so switching its module's liveness check changes nothing else."""

    def start_monitoring(self) -> bool:
        placement_group_cleaner.is_actor_alive = controller_alive
        return super().start_monitoring()


class GcsPlacementGroupCleanerCallback(PlacementGroupCleanerCallback):
    """Ray Train's callback, launching ``GcsPlacementGroupCleaner`` (in the controller's process,
    for the call that launches it)."""

    def after_controller_start(self, train_run_context: Any) -> None:
        before = placement_group_callback.PlacementGroupCleaner
        placement_group_callback.PlacementGroupCleaner = GcsPlacementGroupCleaner
        try:
            super().after_controller_start(train_run_context)
        finally:
            placement_group_callback.PlacementGroupCleaner = before


class AvlabTorchTrainer(TorchTrainer):
    """``TorchTrainer`` whose placement-group cleaner works without the dashboard."""

    def _create_default_callbacks(self) -> list:
        callbacks = super()._create_default_callbacks()
        return [GcsPlacementGroupCleanerCallback() if type(c) is PlacementGroupCleanerCallback else c
                for c in callbacks]
