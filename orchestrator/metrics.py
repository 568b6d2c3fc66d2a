"""Every metric name a run logs, from the owners that declare them.

- the evaluation suite: ``methods.metric_names.metric_names`` (after training, and the quick
  kNN probe every ``eval.every_epochs`` epochs);
- the method: ``Method.training_metrics`` (its loss terms and training diagnostics) and
  ``Method.held_out_metrics`` (its own task scored on the evaluation splits);
- the training loop and the launchers (below): throughput, timings and cost.

Search-space validation, the sweep's scheduler check, the report and the run summaries read
these names; none of them spells a metric name of its own. The declarations of ``methods`` are
imported when asked for, so that commands which read no config (`avlab report`) start without
torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestrator.config import ExperimentConfig

# Logged by the training loop every epoch, beside the method's training metrics.
EPOCH_METRICS = ("pairs_per_s", "epoch_time_s", "lr", "epoch", "cpu_pct")
# What the training process used of its CPUs / GPU in each epoch (orchestrator/system_metrics.py;
# gpu_pct only on a GPU): like the timings, measured, not computed by the model.
USAGE_METRICS = ("cpu_pct", "gpu_pct")
# What a run cost, logged with its evaluation: throughput and time over the whole run, then where
# the wall time of its last attempt went (``trial_time_s``: a sweep trial, end to end).
COST_METRICS = ("train_pairs_per_s", "train_time_s", "train_cpu_pct", "train_gpu_pct")
TIMING_METRICS = ("eval_time_s", "launch_time_s", "import_time_s", "setup_time_s", "checkpoint_time_s",
                  "trial_time_s", "export_time_s")


def training_metrics(cfg: ExperimentConfig) -> tuple[str, ...]:
    """What the run's method logs while it trains."""
    from methods.registry import METHODS

    return METHODS[cfg.method_name].method_cls.training_metrics(cfg.method)


def epoch_metrics(cfg: ExperimentConfig) -> tuple[str, ...]:
    """Everything logged once per epoch (what an early-stopping scheduler can read)."""
    from methods.metric_names import VALIDATION_PREFIX, metric_names
    from methods.evaluate.suite import quick_probe_config

    probe = metric_names(quick_probe_config(cfg.eval), prefix=VALIDATION_PREFIX) if cfg.eval.every_epochs else ()
    gpu = ("gpu_pct",) if cfg.resources.gpu and cfg.tracking.system_metrics else ()
    return (*training_metrics(cfg), *EPOCH_METRICS, *gpu, *probe)


def downstream_metrics(cfg: ExperimentConfig) -> tuple[str, ...]:
    """The evaluation after training, on the labelled split, on the transfer split and (with
    ``eval.val_metrics``) on the validation split."""
    from methods.evaluate.suite import held_out_config
    from methods.metric_names import TRANSFER_PREFIX, VALIDATION_PREFIX, metric_names

    from methods.registry import METHODS

    own = METHODS[cfg.method_name].method_cls.held_out_metrics(cfg.method)  # the method's task, held out
    prefixes = ("", TRANSFER_PREFIX, *((VALIDATION_PREFIX,) if cfg.eval.val_metrics else ()))
    val = metric_names(held_out_config(cfg.eval), prefix=VALIDATION_PREFIX) if cfg.eval.val_metrics else ()
    return (*metric_names(cfg.eval), *metric_names(cfg.eval, prefix=TRANSFER_PREFIX), *val,
            *(f"{prefix}{name}" for prefix in prefixes for name in own))


def run_metrics(cfg: ExperimentConfig) -> frozenset[str]:
    """Every name a run of ``cfg`` may log: any of them may be a sweep's objective."""
    return frozenset((*epoch_metrics(cfg), *downstream_metrics(cfg), *COST_METRICS, *TIMING_METRICS))
