"""``avlab evaluate RUN [--data MANIFEST] [eval.*=... data.*=...]``: the downstream suite on a
finished run's encoders, for another dataset or protocol, without training again.

The weights are the run's final checkpoint (every feature family its method exposes, as the
run's own evaluation saw them), or, when its checkpoints are gone, its exported encoders
(``encoders/``: the ``h`` features only; the projections are not exported). The results go to
a nested MLflow run under the evaluated run (``<run>/eval-<dataset>``), one per evaluation, with
the settings that differ from the run's as params. With the run's own settings the numbers are
the run's own evaluation, bit for bit on CPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import ConfigError

ALLOWED = ("eval.", "data.")


def _run_config(client, run) -> dict[str, Any]:
    """The run's resolved config (its ``config.yaml`` artifact, a ``to_dict``)."""
    with tempfile.TemporaryDirectory(prefix="avlab-eval-") as tmp:
        try:
            path = client.download_artifacts(run.info.run_id, "config.yaml", tmp)
        except Exception:  # noqa: BLE001 - MLflow raises several types for a missing artifact
            raise ConfigError(f"RUN: run {run.info.run_name} has no config.yaml artifact") from None
        tree = yaml.safe_load(Path(path).read_text())
    if not isinstance(tree, dict) or "method" not in tree:
        raise ConfigError(f"RUN: run {run.info.run_name}'s config.yaml is not an avlab config")
    return tree


def _with_settings(tree: dict[str, Any], data: str | None, overrides: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The config to evaluate with, and the settings that changed (dotted key -> value)."""
    import copy

    from orchestrator.config import parse_override

    out, changed = copy.deepcopy(tree), {}
    pairs = [parse_override(text) for text in overrides]
    if data is not None:
        pairs.append(("data.manifest", str(Path(data).expanduser().resolve())))
    for key, value in pairs:
        if not key.startswith(ALLOWED):
            raise ConfigError(f"{key}: an evaluation takes data.* and eval.* settings only")
        section, *rest = key.split(".")
        node = out.setdefault(section, {})
        for part in rest[:-1]:
            node = node.setdefault(part, {})
        node[rest[-1]] = value
        changed[key] = value
    return out, changed


def _final_checkpoint(home: Path, run, sweep_name: str | None) -> Path | None:
    """The run's newest usable checkpoint folder under the local storage, or None."""
    from orchestrator import checkpoint, tracking

    root = Path(tracking.storage_root(home)) if "://" not in tracking.storage_root(home) else home / "ray"
    folder = root / "trials" / f"{sweep_name}-{run.info.run_id}" if sweep_name else root / (run.info.run_name or "")
    if not folder.is_dir():
        return None
    dirs = sorted((p for p in folder.glob("checkpoint_epoch*") if checkpoint.epoch_of(p.name) is not None),
                  key=lambda p: checkpoint.epoch_of(p.name), reverse=True)
    for directory in dirs:
        try:
            state = checkpoint.load(directory)
        except checkpoint.CheckpointError:
            continue
        if state.get("mlflow_run_id") in (None, run.info.run_id):
            return directory
    return None


def evaluate(client, uri: str, home: Path, name: str, *, data: str | None,
             overrides: list[str]) -> tuple[str, dict[str, float]]:
    """Evaluate run ``name``; returns (the nested run's id, its metrics)."""
    import time

    import torch

    from methods.data import build_dataset, dataset_info
    from methods.registry import build_method
    from orchestrator import checkpoint, tracking
    from orchestrator.config import ExperimentConfig
    from orchestrator.export import ARTIFACT_DIR, _runs_named, has_encoders
    from orchestrator.train import evaluate_and_log

    runs, parent = _runs_named(client, name)
    if parent is not None or len(runs) != 1:
        raise ConfigError(f"RUN: {name!r} is a sweep; evaluate one of its trials (a run id or run name)")
    run = runs[0]
    if run.info.status != "FINISHED":
        raise ConfigError(f"RUN: run {run.info.run_name} is {run.info.status}, not FINISHED")
    original = ExperimentConfig.from_dict(_run_config(client, run), checked=True)
    tree, changed = _with_settings(original.to_dict(), data, overrides)
    cfg = ExperimentConfig.from_dict(tree)  # checked: a bad setting or manifest fails here, exit 2
    held = tracking.weights_run(client, run)  # a reused trial's weights are the trial it reused
    source = _final_checkpoint(home, held, held.data.tags.get("avlab.sweep_name"))
    if source is None and not has_encoders(client, held.info.run_id):
        raise ConfigError(f"RUN: run {run.info.run_name} has neither checkpoints under {home} nor exported encoders")

    t0 = time.perf_counter()
    torch.set_num_threads(cfg.resources.cpus_per_worker)  # as the run's own evaluation: same sums, same bits
    dataset = build_dataset(cfg.data)
    try:
        info = dataset_info(original.data)  # the shapes the method was built for
    except Exception:  # noqa: BLE001 - its manifest may be gone: the new data's shapes then
        info = dataset.info()
    method = build_method(original.method_name, original.method, info)
    if source is not None:
        method.load_state_dict(checkpoint.load(source)["model"])
        weights = str(source)
    else:
        from methods.export import load_encoders

        with tempfile.TemporaryDirectory(prefix="avlab-eval-") as tmp:
            encoders = load_encoders(client.download_artifacts(held.info.run_id, ARTIFACT_DIR, tmp))
        method.E_v.load_state_dict(encoders.image.state_dict())
        method.E_s.load_state_dict(encoders.sound.state_dict())
        cfg = ExperimentConfig.from_dict({**cfg.to_dict(), "eval": {**cfg.to_dict()["eval"], "features": ["h"],
                                                                    "retrieval": False, "clip_retrieval": False}})
        weights = f"runs:/{held.info.run_id}/{ARTIFACT_DIR} (h only)"
        changed.update({"eval.features": ["h"], "eval.retrieval": False})
    method.eval()
    label = Path(cfg.data.manifest).stem if cfg.data.manifest else ("binaural" if cfg.data.binaural else "procedural")
    child = tracking.create_run(
        tracking_uri=uri, home=home, experiment=client.get_experiment(run.info.experiment_id).name,
        run_name=f"{run.info.run_name}/eval-{label}",
        params={"evaluated_run": run.info.run_id, "weights": weights, **cfg.flat()},
        tags={"kind": "evaluation", "evaluated_run": run.info.run_id, "dataset": label,
              "changed": ", ".join(f"{k}={v}" for k, v in changed.items()) or "none"},
        config_yaml=yaml.safe_dump(cfg.to_dict(), sort_keys=False), parent_run_id=run.info.run_id,
    )
    ok = False
    try:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        metrics = evaluate_and_log(cfg, method.to(device), dataset, client, child, device,
                                   extra={"setup_time_s": time.perf_counter() - t0})
        ok = True
    finally:
        tracking.end_run(uri, child, ok=ok)
    return child, metrics


def cmd_evaluate(args: argparse.Namespace) -> int:
    from methods.metric_names import HEADLINE_METRICS, OPTIONAL_HEADLINE_METRICS
    from orchestrator import tracking
    from orchestrator.cli import _client

    home, client = _client(args)
    uri = tracking.resolve_tracking_uri(home, args.tracking_uri)
    child, metrics = evaluate(client, uri, home, args.name, data=args.data, overrides=args.overrides)
    shown = ", ".join(f"{k}={metrics[k]:.3f}" for k in (*HEADLINE_METRICS, *OPTIONAL_HEADLINE_METRICS) if k in metrics)
    print(f"[avlab] evaluated {args.name}: {shown}")
    print(f"[avlab] logged to MLflow run {child} (nested under {args.name})", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add the `evaluate` subcommand to the avlab parser."""
    p = sub.add_parser("evaluate", parents=[common],
                       help="the downstream suite on a finished run's encoders (another dataset or protocol)")
    p.add_argument("name", metavar="RUN", help="a run id or run name (a sweep's trial too)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="data.* and eval.* settings")
    p.add_argument("--data", metavar="MANIFEST", help="a dataset's manifest (its train and test splits)")
    p.set_defaults(func=cmd_evaluate)
