"""Exported encoders in MLflow: what every finished run logs, ``avlab export``, the model
registry.

A run logs, beside its metrics (rank 0, before its evaluation, so a run with an evaluation has
them):

- ``encoders/``: ``encoders.safetensors`` + ``encoders.json`` (``methods.export``), what
  ``load_encoders`` reads back without a pickle;
- ``image_encoder/`` and ``sound_encoder/``: each encoder as an MLflow model (``mlflow.pytorch``
  flavour in its ``pt2`` format, a traced graph rather than a pickle, with its tensor signature),
  so the MLflow UI, ``mlflow.pyfunc.load_model`` and the model registry know them
  (``tracking.log_model: false`` leaves them out). Tracing and saving them takes 1.5-2.5 s on two
  cores, so a sweep's trials leave them for later: ``avlab export --best`` logs them for the trial
  it registers (``log_models``, from ``encoders/``).

``avlab export RUN|SWEEP [--best] --out DIR`` copies ``encoders/`` of a run, of every finished
trial of a sweep, or of the sweep's best trial; ``--best`` also registers that trial's two models
as ``<sweep>.image_encoder`` and ``<sweep>.sound_encoder`` with the alias ``best``, and
``load_registered(tracking_uri, "<sweep>")`` loads them back. Every input (the name, the alias,
the folder) is checked before anything is written or registered.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.errors import ConfigError

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from methods.base import Method
    from methods.data.pools import AVDataset
    from methods.export import Encoders
    from orchestrator.config import ExperimentConfig

ARTIFACT_DIR = "encoders"
MODEL_DIRS = {"image": "image_encoder", "sound": "sound_encoder"}
# MLflow's rule for registered-model aliases; "latest" and v<N> name versions, not aliases.
ALIAS = re.compile(r"[\w-]{1,255}")
RESERVED_ALIAS = re.compile(r"latest|[vV]\d+", re.IGNORECASE)


def input_shapes(data: AVDataset) -> dict[str, list[int]]:
    """Each encoder's input (C, H, W), from the first evaluation item that carries it."""
    shapes: dict[str, list[int]] = {}
    for pool in ("test", "train", "paired"):
        items = data.pool(pool)
        for i in range(min(len(items), 64)):
            item = items[i]
            for modality in MODEL_DIRS:
                if modality not in shapes and item.get(modality) is not None:
                    shapes[modality] = list(item[modality].shape)
            if len(shapes) == len(MODEL_DIRS):
                return shapes
    info = data.info()
    fallback = {"image": [info.image_channels, info.image_size, info.image_size],
                "sound": [info.sound_channels, info.n_mels, info.n_frames]}
    return {**fallback, **shapes}


def _requirements() -> list[str]:
    """The MLflow models' pip requirements, from what is installed (inferring them would load
    the model in a subprocess, seconds per run)."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("torch", "torchvision", "safetensors")]


def log_encoders(client: MlflowClient, run_id: str, cfg: ExperimentConfig, method: Method,
                 data: AVDataset, *, models: bool = True) -> float:
    """Log the run's encoders (module docstring), as MLflow models too when ``models`` and
    ``tracking.log_model``; return the seconds it took."""
    from methods.export import exportable, save_encoders

    if not exportable(method):
        print(f"[avlab] encoders not exported: this {cfg.method_name} run's h joins several encoders' features "
              "(no single image / sound encoder pair); its checkpoints hold them", flush=True)
        return 0.0
    t0 = time.perf_counter()
    shapes = input_shapes(data)
    with tempfile.TemporaryDirectory(prefix="avlab-export-") as tmp:
        folder = save_encoders(method, Path(tmp) / ARTIFACT_DIR, config=cfg.to_dict(), input_shapes=shapes,
                               run_id=run_id)
        client.log_artifacts(run_id, str(folder), ARTIFACT_DIR)
        if models and cfg.tracking.log_model:
            encoders = {"image": method.E_v, "sound": method.E_s}
            _log_model_dirs(client, run_id, encoders, shapes, Path(tmp))
    return time.perf_counter() - t0


def _log_model_dirs(client: MlflowClient, run_id: str, encoders: dict, shapes: dict, tmp: Path) -> None:
    """Each encoder as an MLflow model (``pt2``, with its tensor signature) in ``MODEL_DIRS``."""
    import mlflow.pytorch
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    for modality, name in MODEL_DIRS.items():
        encoder = encoders[modality]
        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *shapes[modality]))]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, encoder.out_dim))]),
        )
        path = tmp / name
        was_training = encoder.training
        example = np.zeros((2, *shapes[modality]), dtype=np.float32)
        mlflow.pytorch.save_model(encoder.eval(), str(path), signature=signature, input_example=example,
                                  pip_requirements=_requirements())
        encoder.train(was_training)
        client.log_artifacts(run_id, str(path), name)


def has_models(client: MlflowClient, run_id: str) -> bool:
    return set(MODEL_DIRS.values()) <= {a.path for a in client.list_artifacts(run_id)}


def log_models(client: MlflowClient, run) -> bool:
    """Log ``run``'s encoders as MLflow models from its ``encoders/`` (safetensors + JSON, no
    pickle), unless it has them or its config says ``tracking.log_model: false``; whether it has
    them afterwards."""
    from methods.export import load_encoders

    if has_models(client, run.info.run_id):
        return True
    if run.data.params.get("tracking.log_model", "True") != "True" or not has_encoders(client, run.info.run_id):
        return False
    with tempfile.TemporaryDirectory(prefix="avlab-export-") as tmp:
        encoders = load_encoders(download(client, run.info.run_id, ARTIFACT_DIR, tmp))
        shapes = {m: encoders.meta["encoders"][m]["input_shape"] for m in MODEL_DIRS}
        _log_model_dirs(client, run.info.run_id, {"image": encoders.image, "sound": encoders.sound}, shapes,
                        Path(tmp))
    return True


def has_encoders(client: MlflowClient, run_id: str) -> bool:
    return any(a.path == f"{ARTIFACT_DIR}/encoders.json" for a in client.list_artifacts(run_id, ARTIFACT_DIR))


def download(client: MlflowClient, run_id: str, path: str, dst: str) -> Path:
    """Artifact ``path`` of run ``run_id`` into the folder ``dst``, without MLflow's progress bar
    (a command's stderr is kept for its one-line error)."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    saved = os.environ.get(name)
    os.environ[name] = "false"
    try:
        return Path(client.download_artifacts(run_id, path, dst))
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def check_alias(alias: str) -> str:
    """``alias`` if the model registry takes it as an alias; else ConfigError naming ``--alias``."""
    if not ALIAS.fullmatch(alias):
        raise ConfigError(f"--alias: {alias!r} is not an alias; use 1 to 255 letters, digits, '_' and '-'")
    if RESERVED_ALIAS.fullmatch(alias):
        raise ConfigError(f"--alias: {alias!r} is reserved by the model registry ('latest' and v<N> name versions); "
                          "choose another alias")
    return alias


def best_trial(client: MlflowClient, parent, trials: list):
    """The finished trial with the best value of the sweep's metric on the validation split
    (``val_<metric>``) where every trial scored it; else, said on stderr, on the test split."""
    from methods.metric_names import VALIDATION_PREFIX
    from orchestrator.runs import sweep_metric

    metric = sweep_metric(parent.data.params)
    mode = parent.data.params.get("mode", "max")
    scored = [r for r in trials if metric in r.data.metrics]
    if not scored:
        raise ConfigError(f"export: no finished trial of {parent.info.run_name!r} logged {metric}")
    held_out = metric if metric.startswith(VALIDATION_PREFIX) else f"{VALIDATION_PREFIX}{metric}"
    if all(held_out in r.data.metrics for r in scored):
        metric = held_out
    else:
        print(f"warning: --best chooses on {metric}, the test split: the trials scored no validation split "
              f"(run them with eval.val_metrics=true to choose on {held_out})", file=sys.stderr)
    pick = max if mode == "max" else min
    return pick(scored, key=lambda r: r.data.metrics[metric])


def _folder_name(run) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", run.info.run_name or run.info.run_id).strip("_")


def export(client: MlflowClient, name: str, out: Path, *, best: bool = False, alias: str | None = None) -> list[Path]:
    """Copy the encoders of ``name`` (see ``runs_named``) into ``out/<run name>/``; with
    ``best``, only the sweep's best trial, registered in the model registry under ``alias``
    (default ``best``). Returns the folders."""
    if alias is not None and not best:
        raise ConfigError("--alias: names the versions that --best registers; add --best or drop --alias")
    alias = check_alias("best" if alias is None else alias)
    from orchestrator.runs import runs_named

    runs, parent = runs_named(client, name, "export")
    if best:
        if parent is None:
            raise ConfigError(f"--best: {name!r} is a run, not a sweep")
        runs = [best_trial(client, parent, runs)]
    from orchestrator.tracking import weights_run

    weights = {r.info.run_id: weights_run(client, r) for r in runs}  # a reused trial's are its source's
    missing = [r for r in runs if not has_encoders(client, weights[r.info.run_id].info.run_id)]
    if missing:
        raise ConfigError(f"export: run {missing[0].info.run_name or missing[0].info.run_id} has no exported "
                          f"encoders (it finished before runs logged them, or it failed before its evaluation)")
    if best:
        _check_registrable(client, weights[runs[0].info.run_id])
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {out} is a file, not a folder")
    targets = [(run, out / _folder_name(run)) for run in runs]
    for run, target in targets:  # checked for all before anything is written
        _check_target(target, run.info.run_id)
    _make_folders([target for _, target in targets])
    folders = []
    for run, target in targets:
        with tempfile.TemporaryDirectory(prefix="avlab-export-") as tmp:
            local = download(client, weights[run.info.run_id].info.run_id, ARTIFACT_DIR, tmp)
            for path in local.iterdir():
                shutil.copy2(path, target / path.name)
        folders.append(target)
    if best:
        register_best(client, weights[runs[0].info.run_id], name, alias=alias)
    return folders


def _make_folders(targets: list[Path]) -> None:
    """Create ``targets``; a folder that cannot be made (a read-only or foreign parent) is a
    ConfigError naming ``--out``, and the folders made until then are removed again."""
    made: list[Path] = []  # outermost first
    for target in targets:
        made.extend(reversed([p for p in (target, *target.parents) if not p.exists()]))
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            for folder in reversed(made):
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise ConfigError(f"--out: cannot create {exc.filename or target}: {exc.strerror or exc}") from None


def _check_target(target: Path, run_id: str) -> None:
    """A folder may be written when it is new, empty, or holds this run's earlier export."""
    import json

    from methods.export import META_FILE

    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        return
    try:
        if json.loads((target / META_FILE).read_text()).get("run_id") == run_id:
            return
    except (OSError, ValueError, AttributeError):
        pass
    raise ConfigError(f"--out: {target} already holds something else than run {run_id}'s encoders; "
                      "choose another --out")


def registered_name(sweep: str, modality: str) -> str:
    return f"{sweep}.{MODEL_DIRS[modality]}"


def register_best(client: MlflowClient, run, sweep: str, *, alias: str) -> dict[str, str]:
    """Register the run's two encoder models under the sweep's name, alias ``alias``; returns
    registered name -> version."""
    from mlflow.exceptions import MlflowException

    _check_registrable(client, run)
    check_alias(alias)
    versions = {}
    for modality, directory in MODEL_DIRS.items():
        model = registered_name(sweep, modality)
        try:
            client.create_registered_model(model, description=f"avlab sweep {sweep}: the {modality} encoder")
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                raise
        version = client.create_model_version(model, f"runs:/{run.info.run_id}/{directory}", run_id=run.info.run_id,
                                              tags={"avlab.run_name": run.info.run_name or ""})
        client.set_registered_model_alias(model, alias, version.version)
        versions[model] = version.version
    return versions


def _check_registrable(client: MlflowClient, run) -> None:
    """The run has its MLflow models, or has them now (``log_models``; the export checked its
    ``encoders/`` first, so only ``tracking.log_model: false`` leaves it without)."""
    if not log_models(client, run):
        raise ConfigError(f"--best: run {run.info.run_name} logged no MLflow models (tracking.log_model was "
                          "false); its encoders cannot be registered")


def load_registered(tracking_uri: str, sweep: str, *, alias: str = "best", device: str = "cpu") -> Encoders:
    """The encoders registered for ``sweep`` under ``alias`` (``avlab export SWEEP --best``),
    read from their run's ``encoders/`` (safetensors + JSON; no pickle is loaded)."""
    from mlflow.tracking import MlflowClient

    from methods.export import load_encoders

    client = MlflowClient(tracking_uri)
    version = client.get_model_version_by_alias(registered_name(sweep, "image"), alias)
    with tempfile.TemporaryDirectory(prefix="avlab-export-") as tmp:
        return load_encoders(download(client, version.run_id, ARTIFACT_DIR, tmp), device=device)
