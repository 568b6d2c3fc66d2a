"""Start (or attach to) Ray and run one configuration: on several DDP workers as a Ray Train
``TorchTrainer``; on one worker as one Ray task that runs the training loop itself (no
controller, no worker group, no process group), restarted by Ray when its process or node is
lost. Both write the same checkpoint folders, so a run resumes whichever way it started."""

from __future__ import annotations

import contextlib
import math
import os
import posixpath
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from orchestrator import tracking
from orchestrator.config import ExperimentConfig, ResourcesConfig
from orchestrator.errors import ConfigError, RunFailed

if TYPE_CHECKING:
    from orchestrator.worker_spec import WorkerSpec


# Ray Train settings that avlab changes; a value already in the environment wins. They reach
# Ray Train's controller and workers from the process that calls ``TorchTrainer.fit``.
RAY_TRAIN_ENV = {
    # The controller notices a finished (or failed) worker group at its next poll of the workers:
    # every 2 s by default, which a short trial waits for at its end and on every restart.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}
# Only for a Ray that avlab starts on this machine: no cloud drains its one node, so the
# preemption watcher (an actor process per trial) has nothing to watch. Ray's raylet renices
# every worker it starts by +15 (`worker_niceness`), so training ran below Ray's own daemons,
# agents and the driver, which preempted it whenever they woke: on two cores a one-worker run
# trained at 0.89 x a plain loop running beside it, 0.97 with its workers at niceness 0
# (benchmarks/RESULTS.md). 0: workers keep the niceness of the command that started them
# (`nice avlab sweep ...` still runs in the background).
# A Ray that avlab starts here is one node. Its GCS declares a node dead after 5 missed health
# checks (about 15-40 s), which a raylet starved of CPU on a busy machine can miss; the only node
# dead, nothing can run again. A killed raylet is seen at once by the processes connected to it,
# so only a raylet that stays silent for 5 minutes is taken for lost (set the variable to change it).
LOCAL_RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_worker_niceness": "0",
                 "RAY_health_check_failure_threshold": "100"}

# How long a run waits, in all, for the cluster to give it its workers before it fails with a
# clear line (Ray Train would wait forever: it retries its worker-group start every
# RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S seconds with no limit). 0 = wait forever.
WORKER_WAIT_ENV = "AVLAB_WORKER_WAIT_S"
DEFAULT_WORKER_WAIT_S = 1800.0
# Placing a worker on free resources takes a moment; a shorter wait would fail runs that fit.
MIN_WORKER_WAIT_S = 5.0
_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


def worker_wait_s() -> float:
    """``AVLAB_WORKER_WAIT_S`` checked like a config number: finite, 0 (no limit) or 5 s to 7 days."""
    raw = os.environ.get(WORKER_WAIT_ENV, "").strip()
    if not raw:
        return DEFAULT_WORKER_WAIT_S
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{WORKER_WAIT_ENV}: {raw!r} is not a number of seconds") from None
    if not math.isfinite(value) or not 0 <= value <= 7 * 86400:
        raise ConfigError(f"{WORKER_WAIT_ENV}: must be between 0 (wait forever) and 604800 s (7 days), got {raw}")
    if 0 < value < MIN_WORKER_WAIT_S:
        raise ConfigError(f"{WORKER_WAIT_ENV}: {raw} s is too short to place even a free worker; use at least "
                          f"{MIN_WORKER_WAIT_S:g} s, or 0 to wait forever")
    return value


def _worker_start_timeout_s() -> float:
    try:
        value = float(os.environ.get(_START_TIMEOUT_ENV, "60"))
    except ValueError:
        return 60.0
    return value if math.isfinite(value) and value > 0 else 60.0


def _controller_failure_limit() -> int:
    """Worker-group start attempts (each waits ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``) that fit
    in ``worker_wait_s``; -1 = Ray Train's unlimited retries."""
    wait = worker_wait_s()
    if wait == 0:
        return -1
    return max(0, math.ceil(wait / _worker_start_timeout_s()) - 1)


def workers_never_started(error: BaseException | None) -> bool:
    """Whether a run failed because its worker group could not get its resources in time."""
    seen = 0
    while error is not None and seen < 10:
        if type(error).__name__ in ("WorkerGroupStartupTimeoutError", "WorkerGroupStartupFailedError"):
            return True
        error = getattr(error, "controller_failure", None) or error.__cause__
        seen += 1
    return False


def fit(trainer: Any, cfg: ExperimentConfig, kind: str, name: str) -> Any:
    """``trainer.fit()``; a run whose workers never got their resources ends with one line."""
    try:
        result = trainer.fit()
    except Exception as exc:
        if workers_never_started(exc):
            raise RunFailed(no_workers_line(cfg, kind, name)) from None
        raise
    if workers_never_started(getattr(result, "error", None)):
        raise RunFailed(no_workers_line(cfg, kind, name))
    return result


def no_workers_line(cfg: ExperimentConfig, kind: str, name: str) -> str:
    res = cfg.resources
    each = f"{res.cpus_per_worker} CPU{'s' if res.cpus_per_worker > 1 else ''}" + (
        f" and {res.gpu_share:g} GPU" if res.gpu else "")
    return (f"{kind} {name}: its {res.workers} worker{'s' if res.workers > 1 else ''} ({each} each) did not start "
            f"within {worker_wait_s():.0f} s: the cluster does not have those resources free (`ray status` "
            f"shows what it has; {WORKER_WAIT_ENV} sets the wait); `avlab resume {name}` tries again")


def local_cpus() -> int:
    """The CPUs a Ray started here will have: Ray's own count (it honours a container's quota)."""
    try:
        from ray._private.utils import get_num_cpus

        return int(get_num_cpus())
    except (ImportError, AttributeError):  # Ray moved its helper: the plain count
        return os.cpu_count() or 1


def check_local_resources(resources: ResourcesConfig) -> None:
    """A Ray that avlab starts here has this machine's CPUs and GPUs and no more: a run that asks
    for more would wait for its workers forever, so it stops before anything starts."""
    cpus = local_cpus()
    need = resources.workers * resources.cpus_per_worker
    if need > cpus:
        field = "cpus_per_worker" if resources.cpus_per_worker > cpus else "workers"
        raise ConfigError(
            f"resources.{field}: {resources.workers} workers x {resources.cpus_per_worker} CPUs need {need} CPUs "
            f"and this machine has {cpus}; lower resources.workers or resources.cpus_per_worker, or run on a "
            f"cluster (--address)"
        )
    if resources.gpu:
        import torch

        gpus = torch.cuda.device_count()
        if gpus == 0 or resources.workers * resources.gpu_share > gpus:
            raise ConfigError(
                f"resources.gpu: {resources.workers} worker(s) x {resources.gpu_share:g} GPU need "
                f"{resources.workers * resources.gpu_share:g} GPU(s) and this machine has {gpus}; "
                f"lower resources.workers, set resources.gpu=false, or run on a cluster (--address)"
            )


def init_ray(address: str | None = None, *, dashboard: bool = False) -> None:
    """Attach to ``address`` or start a local Ray instance bound to 127.0.0.1.

    A local Ray runs its dashboard when ``dashboard`` is set or the user asked for it
    (``--ray-dashboard``). Nothing in avlab needs it: the workers of a trial whose controller
    died are freed through the GCS (``orchestrator.pg_cleanup``)."""
    import ray

    from orchestrator.signals import ray_starting

    if ray.is_initialized():
        return
    if address:
        # A Ray that listens on loopback only (the local Ray of another avlab command): Ray would
        # turn 127.0.0.1 into this machine's external address, where nothing answers, and retry
        # that forever. Attach to it as one of its own local drivers instead.
        with ray_starting(), _loopback_node() if _loopback_only(address) else contextlib.nullcontext():
            ray.init(address=address, logging_level="WARNING")
    else:
        # Set before Ray starts: its processes (Tune's trial actors among them) inherit them.
        for key, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(key, value)
        # address="local": always a new instance, even when a `ray start` cluster runs on this
        # machine (ray.init() would otherwise attach to it); --address auto attaches on purpose.
        # The dashboard only when asked: its processes take ~8 % of a 2-core machine's
        # training throughput (benchmarks/RESULTS.md).
        dashboard = dashboard or os.environ.get("AVLAB_RAY_DASHBOARD", "") not in ("", "0")
        with ray_starting(), _loopback_node():
            context = ray.init(address="local", include_dashboard=dashboard, dashboard_host="127.0.0.1",
                               logging_level="WARNING", _node_ip_address="127.0.0.1")
        if dashboard and context.dashboard_url:
            print(f"[avlab] Ray dashboard: http://{context.dashboard_url}", flush=True)


@contextlib.contextmanager
def watching_node(kind: str, name: str, settle: Callable[[], None], *, period_s: float = 2.0) -> Iterator[None]:
    """While the block runs: when this driver's Ray node is lost (the raylet of the local Ray
    exits, or Ray marks the node dead because its raylet stayed silent past the health checks),
    Tune waits for ever for the resources of a cluster that has none (Ray Train and a run's
    task likewise), and the job would hang with nothing running and nothing said. A daemon
    thread watches the node; if it is lost, it settles the job's MLflow runs (``settle``: the run
    or sweep FAILED, as when Ray raises in the driver, its unfinished trials KILLED), says so in
    one line, stops the local Ray this driver started and ends the process with exit code 1.
    ``avlab resume NAME`` continues the job."""
    import sys
    import threading

    import ray

    try:
        node_id = ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - a driver with no node of its own (Ray Client): nothing to watch
        yield
        return
    node = getattr(ray._private.worker, "_global_node", None)
    head = node is not None and node.head  # the local Ray this driver started
    raylets = [info.process for info in (node.all_processes.get("raylet", []) if head else [])]
    done, acting = threading.Event(), threading.Lock()

    def lost() -> str | None:
        # A local raylet that exits (killed, crashed) is seen at once, not after the health checks.
        for raylet in raylets:
            if raylet.poll() is not None:
                return f"its raylet exited with code {raylet.returncode}"
        try:
            nodes = ray.nodes()
        except Exception:  # noqa: BLE001 - the GCS itself is away: the calls in the driver raise
            return None
        me = next((n for n in nodes if n.get("NodeID") == node_id), None)
        if me is None or me.get("Alive", True):
            return None
        return (me.get("DeathReasonMessage") or "no reason given").strip().splitlines()[0][:160]

    def watch() -> None:
        while not done.wait(period_s):
            reason = lost()
            if reason is None:
                continue
            with acting:
                if done.is_set():  # the job ended (or stopped Ray itself) meanwhile
                    return
                try:
                    settle()
                except Exception as exc:  # noqa: BLE001 - `avlab resume` settles them as well
                    print(f"[avlab] could not settle the MLflow runs of {name} ({type(exc).__name__}); "
                          "`avlab resume` does", file=sys.stderr, flush=True)
                print(f"avlab: Ray stopped under {kind} {name} (its Ray node is lost: {reason}); "
                      f"`avlab resume {name}` continues it from its last checkpoint", file=sys.stderr, flush=True)
                if head:
                    with contextlib.suppress(Exception):
                        node.kill_all_processes(check_alive=False, allow_graceful=False)
                os._exit(1)

    threading.Thread(target=watch, name="avlab-node-watch", daemon=True).start()
    try:
        yield
    finally:
        with acting:
            done.set()


def _host_port(address: str) -> tuple[str, str]:
    """``HOST:PORT`` or ``ray://HOST:PORT`` (an IPv6 host in brackets, [::1]:6379) -> (host,
    port); an empty host when there is no colon."""
    host, _, port = address.removeprefix("ray://").rstrip("/").rpartition(":")
    return host.strip("[]"), port


def _loopback_only(address: str) -> bool:
    """``address`` names this machine's loopback (127.0.0.1, localhost, ::1) and the Ray there
    does not answer on the machine's external address too."""
    import socket

    from ray._common.network_utils import is_localhost, node_ip_address_from_perspective

    host, port = _host_port(address)
    if address.startswith("ray://") or not port.isdigit() or not is_localhost(host):
        return False
    try:
        external = node_ip_address_from_perspective()
    except OSError:  # no route off this machine: loopback is all there is
        return True
    if is_localhost(external):
        return True
    try:
        socket.create_connection((external, int(port)), timeout=2.0).close()
    except OSError:
        return True
    return False


@contextlib.contextmanager
def _loopback_node():
    """While a local Ray starts: its node address is 127.0.0.1, so that its GCS, raylet, object
    manager, workers and agents listen on loopback only. Ray turns a ``_node_ip_address`` of
    127.0.0.1 into the machine's external address (its servers bind to the node address) unless
    multi-node clusters are off, its setting for laptops (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``),
    which is what a Ray that lives and dies with one avlab command is. Read when the node starts,
    so it is switched for the start only (this process may later join a real cluster)."""
    import ray._private.ray_constants as ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def build_trainer(
    cfg: ExperimentConfig,
    *,
    name: str,
    run_id: str,
    tracking_uri: str,
    storage_path: str,
    init_checkpoint: str,
    callbacks: list | None = None,
    sweep_trial: bool = False,
    dry_run_s: float | None = None,
):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from orchestrator.pg_cleanup import AvlabTorchTrainer
    from orchestrator.worker_spec import worker_spec

    # Wall-clock time of the launch: the worker logs how long it took to get going.
    spec = worker_spec(cfg, run_id=run_id, tracking_uri=tracking_uri, init_checkpoint=init_checkpoint,
                       launched_at=time.time(), sweep_trial=sweep_trial, dry_run_s=dry_run_s)
    for key, value in RAY_TRAIN_ENV.items():
        os.environ.setdefault(key, value)
    res = cfg.resources
    if dry_run_s is None:
        from orchestrator.train import train_loop_per_worker as loop
    else:  # a dry run's workers train nothing, and import neither the loop nor the methods
        from orchestrator.dry_run import loop_per_worker as loop
    return AvlabTorchTrainer(
        loop,
        train_loop_config={"spec": spec},
        # A dry run's workers hold GPUs they never touch (a simulated cluster has none): gloo.
        torch_config=TorchConfig(backend="nccl" if res.gpu and dry_run_s is None else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=res.workers, use_gpu=bool(res.gpu),
            resources_per_worker={"CPU": res.cpus_per_worker, **({"GPU": res.gpu_share} if res.gpu else {})},
            placement_strategy=res.placement.upper(),
        ),
        run_config=RunConfig(
            # A fixed name on a fixed storage path is what lets Ray Train find this run again.
            name=name,
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.checkpoints_to_keep),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures,
                                         controller_failure_limit=_controller_failure_limit()),
            callbacks=callbacks or [],
        ),
    )


def launch_run(
    cfg: ExperimentConfig, *, name: str, run_id: str, tracking_uri: str, address: str | None, storage: str,
    init_checkpoint: str, ray_dashboard: bool = False,
) -> dict[str, Any]:
    """Train run ``name`` to its end on the local Ray or the cluster at ``address``, its
    checkpoints under ``storage``, starting from ``init_checkpoint`` ("" for none); the run's
    final metrics."""
    init_ray(address, dashboard=ray_dashboard)
    from orchestrator.runs import settle

    with watching_node("run", name, lambda: settle(tracking_uri, "run", run_id, status="FAILED")):
        return _launch_run(cfg, name=name, run_id=run_id, tracking_uri=tracking_uri, storage=storage,
                           init_checkpoint=init_checkpoint)


def _launch_run(cfg: ExperimentConfig, *, name: str, run_id: str, tracking_uri: str, storage: str,
                init_checkpoint: str) -> dict[str, Any]:
    error = None
    if cfg.resources.workers == 1:
        _run_in_task(cfg, name=name, run_id=run_id, tracking_uri=tracking_uri,
                     run_dir=posixpath.join(storage, name), init_checkpoint=init_checkpoint)
    else:
        trainer = build_trainer(cfg, name=name, run_id=run_id, tracking_uri=tracking_uri, storage_path=storage,
                                init_checkpoint=init_checkpoint)
        error = fit(trainer, cfg, "run", name).error
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    failure = tracking.recorded_failure(client, run_id)
    if failure:
        raise RunFailed(f"run {name} failed: {failure}; once fixed, `avlab resume {name} --retry-failed` trains it again")
    if error is not None:
        raise error
    # The final report carries no checkpoint, so its metrics are read back from MLflow.
    return dict(client.get_run(run_id).data.metrics)


def _run_in_task(cfg: ExperimentConfig, *, name: str, run_id: str, tracking_uri: str, run_dir: str,
                 init_checkpoint: str) -> None:
    """A single-worker run: the training loop in one Ray task, in a placement group that holds its
    CPUs (and GPU share). A run whose worker cannot get them within ``worker_wait_s`` ends with
    the same line as a ``TorchTrainer`` whose worker group never started. Ray restarts the task
    when its process or node is lost, or when it raises (a deterministic error does not raise:
    the loop records it and returns), ``train.max_failures`` times (-1: always), as Ray Train
    restarts a worker group; each attempt resumes from the newest usable checkpoint."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from orchestrator.worker_spec import worker_spec

    res = cfg.resources
    bundle = {"CPU": float(res.cpus_per_worker), **({"GPU": float(res.gpu_share)} if res.gpu else {})}
    group = placement_group([bundle], name=f"avlab-run-{name}")
    try:
        wait, waited = worker_wait_s(), 0.0
        while True:
            step = min(10.0, wait - waited) if wait else 10.0
            if group.wait(timeout_seconds=step):
                break
            waited += step
            if wait and waited >= wait:
                raise RunFailed(no_workers_line(cfg, "run", name))
        spec = worker_spec(cfg, run_id=run_id, tracking_uri=tracking_uri, init_checkpoint=init_checkpoint,
                           launched_at=time.time())
        task = ray.remote(_train_task).options(
            name=f"avlab-run-{name}", num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
            max_retries=cfg.train.max_failures, retry_exceptions=True,
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0),
        )
        try:
            ray.get(task.remote(spec, run_dir))
        except ray.exceptions.RayTaskError as exc:
            raise exc.as_instanceof_cause() from None
    finally:
        remove_placement_group(group)


def _train_task(spec: WorkerSpec, run_dir: str) -> None:
    from orchestrator.train import train_in_trial

    train_in_trial(spec, run_dir, tune=False)


def check_ray_address(address: str, field: str = "--address", *, timeout_s: float = 5.0) -> None:
    """A Ray cluster answers at ``address`` (``HOST:PORT`` or ``ray://HOST:PORT``), checked by one
    TCP connection: ``ray.init`` retries a dead address for minutes, after the run was created.
    ``auto`` (the cluster that ``ray start`` runs on this machine) is left to Ray."""
    import socket

    if address == "auto":
        return
    host, port = _host_port(address)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{field}: {address!r} is not a Ray address; use HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except TimeoutError:
        raise ConfigError(f"{field}: no Ray cluster answers at {address} (nothing in {timeout_s:.0f} s)") from None
    except OSError as exc:  # refused, unreachable, unknown host
        raise ConfigError(f"{field}: no Ray cluster answers at {address} ({exc.strerror or exc})") from None
