"""``avlab evaluate RUN [--data MANIFEST] [--encoders-only] [eval.*=... data.*=...]``: the
downstream suite on a finished run's encoders, for another dataset or protocol, without training
again.

The weights are the run's final checkpoint (every feature family its method exposes, as the
run's own evaluation saw them). A final checkpoint that is gone or does not load is refused, never
replaced by other weights: ``--encoders-only`` asks for the run's exported encoders
(``encoders/``) instead, which give the ``f`` features alone (the encoders' pooled outputs; a
method's ``h`` and ``z`` may read a memory or a projection, which are not exported), in an
evaluation named and tagged as such. The results go to a nested MLflow run under the evaluated run
(``<run>/eval-<dataset>``, ``-encoders`` appended for the exported encoders), one per evaluation,
with the settings that differ from the run's as params. With the run's own settings the numbers
are the run's own evaluation, bit for bit on CPU.

Every input is checked before that run is created: the name, the settings (the evaluation's own
checks, none of training's), the data against what the run's encoders read, the splits the probes
fit on, the memory the evaluation keeps, and the weights.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from orchestrator.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from methods.data.pools import AVDataset
    from orchestrator.config import ExperimentConfig

ALLOWED = ("eval.", "data.")
# What an evaluation of the exported encoders runs: their features, and no retrieval (it reads z).
ENCODERS_ONLY = {"eval.features": ["f"], "eval.retrieval": False, "eval.clip_retrieval": False}


def _run_config(client, run) -> dict[str, Any]:
    """The run's resolved config (its ``config.yaml`` artifact, a ``to_dict``)."""
    from orchestrator.export import download

    with tempfile.TemporaryDirectory(prefix="avlab-eval-") as tmp:
        try:
            path = download(client, run.info.run_id, "config.yaml", tmp)
        except Exception:  # noqa: BLE001 - MLflow raises several types for a missing artifact
            raise ConfigError(f"RUN: run {run.info.run_name} has no config.yaml artifact") from None
        tree = yaml.safe_load(path.read_text())
    if not isinstance(tree, dict) or "method" not in tree:
        raise ConfigError(f"RUN: run {run.info.run_name}'s config.yaml is not an avlab config")
    return tree


def _with_settings(tree: dict[str, Any], data: str | None, overrides: list[str],
                   encoders_only: bool) -> tuple[dict[str, Any], dict[str, Any]]:
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
        if encoders_only and key in ENCODERS_ONLY and value != ENCODERS_ONLY[key]:
            raise ConfigError(f"{key}: --encoders-only evaluates the exported encoders' f features without "
                              "retrieval (which reads the projections); drop the setting or --encoders-only")
    for key, value in [*pairs, *(ENCODERS_ONLY.items() if encoders_only else ())]:
        section, *rest = key.split(".")
        node = out.setdefault(section, {})
        for part in rest[:-1]:
            node = node.setdefault(part, {})
        node[rest[-1]] = value
        changed[key] = value
    return out, changed


def _check_sound(name: str, original: ExperimentConfig, cfg: ExperimentConfig) -> None:
    """The run's sound encoder reads the channels it was trained on (data.binaural: two)."""
    if cfg.data.binaural != original.data.binaural:
        def kind(binaural: bool) -> str:
            return "binaural (2-channel)" if binaural else "mono (1-channel)"

        raise ConfigError(f"data.binaural: run {name} was trained on {kind(original.data.binaural)} sound; its sound "
                          f"encoder cannot read {kind(cfg.data.binaural)} sound")


def _evaluated_splits(data: AVDataset, cfg: ExperimentConfig) -> list[tuple[str, str]]:
    """The (train, test) splits the evaluation fits and scores on (``train.evaluate_and_log``)."""
    sizes = {split: _rows(data, cfg, split) for split in ("transfer_train", "transfer_test")}
    return [("train", "test"), *([("transfer_train", "transfer_test")] if all(sizes.values()) else [])]


def _rows(data: AVDataset, cfg: ExperimentConfig, split: str) -> int:
    return len(data.items[split]) if cfg.data.manifest else getattr(cfg.data, f"{split}_size")


def _field(cfg: ExperimentConfig, split: str) -> str:
    return f"data.manifest: {cfg.data.manifest}" if cfg.data.manifest else f"data.{split}_size"


def _classes(data: AVDataset, cfg: ExperimentConfig, split: str) -> set[int]:
    """The class ids of a split's rows, read from the manifest or the procedural label order
    (nothing decoded or rendered)."""
    if cfg.data.manifest:
        return {item.label for item in data.items[split] if item.label is not None}
    n = min(_rows(data, cfg, split), len(data.class_names))  # every class occurs in a block of that many
    return {data.label(split, i) for i in range(n)}


def _check_splits(data: AVDataset, cfg: ExperimentConfig) -> None:
    """Each evaluated split has rows, and the probes fit on at least two classes."""
    e = cfg.eval
    probes = e.linear or e.sound_svm or e.block_probes or e.spatial_probe
    for train, test in _evaluated_splits(data, cfg):
        for split in (train, test):
            if _rows(data, cfg, split) == 0:
                raise ConfigError(f"{_field(cfg, split)}: the {split} split has no rows; the evaluation fits on "
                                  f"{train} and scores on {test}")
        classes = _classes(data, cfg, train)
        if e.protocol == "folds":
            classes |= _classes(data, cfg, test)
        if probes and len(classes) < 2:
            raise ConfigError(f"{_field(cfg, train)}: the {train} split holds {_rows(data, cfg, train)} row(s) of "
                              f"{len(classes)} class; the linear probes need at least two classes")


def _check_memory(data: AVDataset, cfg: ExperimentConfig, model: torch.nn.Module) -> None:
    """Refuse procedural splits whose rendered items (kept with ``data.cache_in_memory``) and
    features cannot fit in this machine's memory: a lower bound, from one item and its features."""
    import torch

    from orchestrator.footprint import GIB, machine_memory

    if cfg.data.manifest:  # a manifest's items are read from its memory-mapped feature cache
        return
    item = data.pool("test")[0]
    kept = sum(v.numel() * v.element_size() for v in item.values()) if cfg.data.cache_in_memory else 0
    with torch.no_grad():
        features = model.embed(images=item["image"][None] if "image" in item else None,
                               sounds=item["sound"][None] if "sound" in item else None)
    per_item = kept + sum(v.numel() * 4 for v in features.values())
    splits = [s for pair in _evaluated_splits(data, cfg) for s in pair]
    rows = {split: _rows(data, cfg, split) for split in splits}
    need, have = per_item * sum(rows.values()), machine_memory()
    if need > have:
        largest = max(rows, key=rows.get)
        raise ConfigError(f"data.{largest}_size: evaluating {sum(rows.values())} items ({', '.join(splits)}) keeps at "
                          f"least {need / GIB:.1f} GiB in memory (rendered items and their features) and this machine "
                          f"has {have / GIB:.1f} GiB; lower data.{largest}_size")


def _checkpoint_dirs(home: Path, run, sweep_name: str | None) -> tuple[Path, list[Path]]:
    """The run's checkpoint folder under the local storage, and its checkpoints, newest first."""
    from orchestrator import checkpoint, tracking

    root = Path(tracking.storage_root(home)) if "://" not in tracking.storage_root(home) else home / "ray"
    folder = root / "trials" / f"{sweep_name}-{run.info.run_id}" if sweep_name else root / (run.info.run_name or "")
    dirs = [p for p in folder.glob("checkpoint_epoch*") if checkpoint.epoch_of(p.name) is not None]
    return folder, sorted(dirs, key=lambda p: checkpoint.epoch_of(p.name), reverse=True)


def _from_checkpoint(home: Path, run, held, original: ExperimentConfig, info, hint: str) -> tuple[Any, str]:
    """The run's method with the weights of its final checkpoint, or ConfigError naming the
    checkpoint and why it cannot be used (no other checkpoint stands in for it)."""
    from methods.registry import build_method
    from orchestrator import checkpoint
    from orchestrator.typed import first_line

    name = run.info.run_name
    folder, dirs = _checkpoint_dirs(home, held, held.data.tags.get("avlab.sweep_name"))
    if not dirs:
        raise ConfigError(f"RUN: run {name} has no checkpoint in {folder}{hint}")
    final, last_epoch = dirs[0], max(original.train.epochs - 1, 0)
    if checkpoint.epoch_of(final.name) != last_epoch:
        raise ConfigError(f"RUN: {final}: the newest checkpoint of run {name} is not of its last epoch "
                          f"({last_epoch}){hint}")
    try:
        state = checkpoint.load(final)
    except checkpoint.CheckpointError as exc:
        raise ConfigError(f"RUN: the final checkpoint of run {name} does not load: {first_line(exc)}{hint}") from None
    if state.get("mlflow_run_id") not in (None, held.info.run_id):
        raise ConfigError(f"RUN: {final}: holds MLflow run {state['mlflow_run_id']}'s weights, not run {name}'s{hint}")
    method = build_method(original.method_name, original.method, info)
    try:
        method.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise ConfigError(f"RUN: {final}: does not fit the {original.method_name} model built for this data "
                          f"({first_line(exc)}){hint}") from None
    return method, str(final)


def _from_exported(client, run, held) -> tuple[Any, str]:
    """The run's exported encoders as a model whose ``embed`` gives their f features."""
    from methods.export import EncoderFeatures, ExportError, load_encoders
    from orchestrator.export import ARTIFACT_DIR, download, has_encoders
    from orchestrator.typed import first_line

    if not has_encoders(client, held.info.run_id):
        raise ConfigError(f"--encoders-only: run {run.info.run_name} has no exported encoders (its method has no "
                          "single image / sound encoder pair, or it failed before its evaluation)")
    with tempfile.TemporaryDirectory(prefix="avlab-eval-") as tmp:
        try:
            encoders = load_encoders(download(client, held.info.run_id, ARTIFACT_DIR, tmp))
        except ExportError as exc:
            raise ConfigError(f"--encoders-only: run {run.info.run_name}'s exported encoders do not load: "
                              f"{first_line(exc).replace(tmp + '/', '')}") from None
    return EncoderFeatures(encoders), f"runs:/{held.info.run_id}/{ARTIFACT_DIR}"


def evaluate(client, uri: str, home: Path, name: str, *, data: str | None, overrides: list[str],
             encoders_only: bool = False) -> tuple[str, dict[str, float]]:
    """Evaluate run ``name``; returns (the nested run's id, its metrics)."""
    import time

    import torch

    from methods.data import build_dataset, dataset_info
    from orchestrator import environment, tracking
    from orchestrator.config import ExperimentConfig, check_evaluation
    from orchestrator.export import has_encoders
    from orchestrator.runs import runs_named
    from orchestrator.train import evaluate_and_log

    runs, parent = runs_named(client, name, "RUN")
    if parent is not None or len(runs) != 1:
        raise ConfigError(f"RUN: {name!r} is a sweep; evaluate one of its trials (a run id or run name)")
    run = runs[0]
    if run.info.status != "FINISHED":
        raise ConfigError(f"RUN: run {run.info.run_name} is {run.info.status}, not FINISHED")
    original = ExperimentConfig.from_dict(_run_config(client, run), checked=True)
    tree, changed = _with_settings(original.to_dict(), data, overrides, encoders_only)
    cfg = ExperimentConfig.from_dict(tree, checked=True)  # each section checked: a bad setting fails here
    check_evaluation(cfg)  # the manifest, folds and probes; no training-only check
    _check_sound(run.info.run_name, original, cfg)
    held = tracking.weights_run(client, run)  # a reused trial's weights are the trial it reused

    t0 = time.perf_counter()
    torch.set_num_threads(cfg.resources.cpus_per_worker)  # as the run's own evaluation: same sums, same bits
    dataset = build_dataset(cfg.data)
    _check_splits(dataset, cfg)
    if encoders_only:
        model, weights = _from_exported(client, run, held)
    else:
        try:
            info = dataset_info(original.data)  # the shapes the method was built for
        except Exception:  # noqa: BLE001 - its manifest may be gone: the new data's shapes then
            info = dataset.info()
        hint = ("; `--encoders-only` evaluates its exported encoders instead (their f features, in an evaluation "
                "tagged as such)") if has_encoders(client, held.info.run_id) else ""
        model, weights = _from_checkpoint(home, run, held, original, info, hint)
    model.eval()
    _check_memory(dataset, cfg, model)

    label = Path(cfg.data.manifest).stem if cfg.data.manifest else ("binaural" if cfg.data.binaural else "procedural")
    child = tracking.create_run(
        tracking_uri=uri, home=home, experiment=client.get_experiment(run.info.experiment_id).name,
        run_name=f"{run.info.run_name}/eval-{label}{'-encoders' if encoders_only else ''}",
        params={"evaluated_run": run.info.run_id, "weights": weights, **cfg.flat()},
        tags={"kind": "evaluation", "evaluated_run": run.info.run_id, "dataset": label,
              "weights": "exported encoders" if encoders_only else "checkpoint",
              "changed": ", ".join(f"{k}={v}" for k, v in changed.items()) or "none"},
        config_yaml=yaml.safe_dump(cfg.to_dict(), sort_keys=False), parent_run_id=run.info.run_id,
    )
    ok = False
    try:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        environment.tag_run(client, child, device)
        metrics = evaluate_and_log(cfg, model.to(device), dataset, client, child, device,
                                   extra={"setup_time_s": time.perf_counter() - t0})
        ok = True
    finally:
        tracking.end_run(uri, child, ok=ok)
    return child, metrics
