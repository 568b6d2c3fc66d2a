"""What a run's machines did while it trained.

- MLflow's own system metrics (``mlflow.system_metrics``: CPU, memory, disk, network, and GPU
  utilisation and memory where NVML finds a GPU), logged by one monitor per worker node as
  ``system/node<k>/<metric>`` every ``tracking.system_metrics_interval_s``, the steps continuing
  across restarts; the MLflow UI shows them in the run's "System metrics" tab. A monitor also
  logs what it sampled since its last step when it stops, so a run shorter than the interval
  still has them. While the tracking server is away the monitor goes on sampling: its samples
  wait, like the run's own metrics, and go out in order when the server is back (MLflow's own
  loop ends for good at the first failed call). ``tracking.system_metrics: false`` turns them
  off.
- ``cpu_pct`` (always) and ``gpu_pct`` (with a GPU and system metrics on) per epoch: rank 0's
  use of what it was given over the epoch's training steps; ``cpu_pct`` is the process's CPU
  time over wall time x ``resources.cpus_per_worker`` (100 = every CPU it holds busy),
  ``gpu_pct`` the mean of NVML's utilisation of its GPU sampled every ``GPU_SAMPLE_STEPS``
  steps. With the evaluation the run logs their means over its epochs, weighted by epoch length
  (restarts included, like ``train_pairs_per_s``): ``train_cpu_pct`` / ``train_gpu_pct``, beside
  ``train_pairs_per_s`` in the report.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from orchestrator.config import ExperimentConfig

GPU_SAMPLE_STEPS = 10


def _process_cpu_s() -> float:
    import psutil

    times = psutil.Process().cpu_times()
    return times.user + times.system


class Usage:
    """Rank 0's CPU time and GPU utilisation over one epoch's training steps (see the module
    docstring); ``training_cost`` weights the epochs' values by their length."""

    def __init__(self, cpus: int, device: torch.device, *, gpu: bool) -> None:
        self.cpus, self.device = cpus, device
        self.sample_gpu = gpu and device.type == "cuda"
        self._start: tuple[float, float] = (0.0, 0.0)
        self.gpu: list[float] = []

    def begin(self) -> None:
        self._start = (time.perf_counter(), _process_cpu_s())
        self.gpu = []

    def step(self, step: int) -> None:
        if self.sample_gpu and step % GPU_SAMPLE_STEPS == 0:
            try:
                self.gpu.append(float(torch.cuda.utilization(self.device)))
            except Exception:  # NVML missing or refused: no GPU figure rather than a failed run
                self.sample_gpu = False

    def end(self) -> dict[str, float]:
        """The epoch's ``cpu_pct`` (and ``gpu_pct``)."""
        wall, cpu = self._start
        elapsed = time.perf_counter() - wall
        out = {"cpu_pct": 100.0 * (_process_cpu_s() - cpu) / (max(elapsed, 1e-9) * self.cpus)}
        if self.gpu:
            out["gpu_pct"] = sum(self.gpu) / len(self.gpu)
        return out


def start_monitor(cfg: ExperimentConfig, tracking_uri: str, run_id: str, nodes: list[str], rank: int) -> Any:
    """MLflow's system-metrics monitor for this worker's node, run by the node's first rank;
    None on the other ranks or when ``tracking.system_metrics`` is off."""
    if not cfg.tracking.system_metrics or nodes.index(nodes[rank]) != rank:
        return None
    # No start / stop lines from MLflow: the run's own outbox says what an outage means for it.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)
    node = list(dict.fromkeys(nodes)).index(nodes[rank])
    monitor = _monitor_class()(run_id, sampling_interval=cfg.tracking.system_metrics_interval_s,
                               node_id=f"node{node}", tracking_uri=tracking_uri, resume_logging=True)
    monitor.start()
    return monitor


def _monitor_class() -> type:
    """``SystemMetricsMonitor`` whose samples outlive a tracking-server outage (imported when a
    monitor starts: MLflow's system-metrics package loads psutil and NVML)."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    from mlflow.tracking import MlflowClient

    from orchestrator import tracking

    class Monitor(SystemMetricsMonitor):
        """Samples every ``sampling_interval`` seconds and logs each step through a quiet
        ``tracking.Outbox``: a step the server cannot take now waits and is sent, with its own
        time and step, when the server answers again. It stops when told to, or when the run
        ends or is gone, never because the server is away."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            with tracking.fail_fast():  # the next step of a resumed run: one try, not minutes
                super().__init__(*args, **kwargs)
            self.client = MlflowClient(self._tracking_uri)
            self.outbox = tracking.Outbox(self.client, self._run_id, announce=False)

        def monitor(self) -> None:
            while not self._shutdown_event.is_set():
                for _ in range(self.samples_before_logging):
                    self.collect_metrics()
                    self._shutdown_event.wait(self.sampling_interval)
                    if self._shutdown_event.is_set() or self._run_over():
                        return  # ``stop_monitor`` logs what was sampled since the last step
                try:
                    self.publish_metrics(self.aggregate_metrics())
                except Exception:  # noqa: BLE001 - not an outage (the Outbox holds those): the run is gone
                    return

        def _run_over(self) -> bool:
            """Whether the run ended or was deleted (False while the server cannot say)."""
            try:
                with tracking.fail_fast():
                    return self.client.get_run(self._run_id).info.status != "RUNNING"
            except Exception as exc:  # noqa: BLE001
                return not tracking.is_outage(exc)

        def publish_metrics(self, metrics: dict[str, float]) -> None:
            prefix = self._metrics_prefix + (f"{self.node_id}/" if self.node_id else "")
            step = self._logging_step
            self._logging_step += 1
            for monitor in self.monitors:
                monitor.clear_metrics()
            self.outbox.log({prefix + k: v for k, v in metrics.items()}, step=step)

        def flush(self) -> bool:
            """Send the held steps now (one try); False when the server is still away."""
            return self.outbox.send()

    return Monitor


def stop_monitor(monitor: Any) -> None:
    """Stop the monitor and log the samples it took since its last logged step, with any steps
    still held from an outage (one try: a server still away at the very end loses them, not the
    run)."""
    if monitor is None:
        return
    monitor.finish()
    try:
        pending = monitor.aggregate_metrics()
        if pending:
            monitor.publish_metrics(pending)
        if not monitor.flush():
            logging.getLogger(__name__).warning("system metrics: %d steps not logged (the tracking server is "
                                                "away)", len(monitor.outbox.pending))
    except Exception as exc:  # the run gone at the very end: lose its last samples, not the run
        logging.getLogger(__name__).warning("system metrics: the last sample was not logged: %s", exc)
