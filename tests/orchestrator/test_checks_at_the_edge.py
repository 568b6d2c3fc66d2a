"""Bad input refused where it enters, in one line that names the field or the file, before any
store, cache or Ray exists: damaged job files, cluster recipes that are not text, batches that
BatchNorm cannot train on, evaluation splits too small for the probes, claims that compare a
configuration with itself or read a file outside the project, a worker wait too short to place
a worker, manifests too small for a run; and the defaults that follow from the data."""

import json
import os
import re
import sqlite3
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from orchestrator import jobs, store, tracking
from orchestrator.cli import main
from test_real_data import _image, _tone

from methods.data.manifest import write_manifest


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _nothing_started(home: Path) -> None:
    import ray

    assert not home.exists() or not any(home.iterdir())  # no MLflow store, no Ray results, no job file
    assert not ray.is_initialized()


# --- config values checked at resolve time ------------------------------------------------------


@pytest.mark.parametrize("argv, field", [
    # BatchNorm in training needs two items a batch: it failed in the memory estimate, or in the first step.
    (["train.batch_size=1"], "train.batch_size"),
    (["train.batch_size=2", "resources.workers=2"], "train.batch_size"),
    (["train.unpaired_batch_size=1"], "train.unpaired_batch_size"),
    # The probes read these splits after training: a run used to train, then fail.
    (["data.train_size=1"], "data.train_size"),
    (["data.train_size=9"], "data.train_size"),  # a class of the test split missing from it
    (["data.test_size=1"], "data.test_size"),
    (["data.transfer_train_size=1"], "data.transfer_train_size"),
    (["data.transfer_test_size=1"], "data.transfer_test_size"),
])
def test_what_training_or_the_probes_cannot_use_exits_2_before_anything_starts(tmp_path, capsys, argv, field):
    home = tmp_path / "home"
    assert main(["--home", str(home), "run", *argv]) == 2
    assert _one_line(capsys).startswith(f"avlab: error: {field}: ")
    _nothing_started(home)


def test_the_smallest_accepted_sizes_and_the_memory_estimate_of_a_batch_of_one():
    from orchestrator.config import resolve
    from orchestrator.footprint import estimate

    # The procedural classes come in shuffled blocks of data.num_classes: that many hold them all.
    resolve(overrides=["data.train_size=10", "data.test_size=2"])
    resolve(overrides=["data.num_classes=4", "data.train_size=4", "data.test_size=2"])
    # Synced BatchNorm sees the global batch; no training, no batch.
    resolve(overrides=["train.batch_size=2", "resources.workers=2", "train.sync_batchnorm=true"])
    one = resolve(overrides=["train.batch_size=1", "train.epochs=0"])
    two = resolve(overrides=["train.batch_size=2", "train.epochs=0"])
    # The estimator measures two items where BatchNorm refuses one, and scales: half of two.
    assert estimate(one).activations * 2 == estimate(two).activations > 0


def test_a_worker_wait_too_short_to_place_a_worker_exits_2(tmp_path, capsys, monkeypatch):
    from orchestrator.launch import worker_wait_s

    monkeypatch.setenv("AVLAB_WORKER_WAIT_S", "0.001")
    home = tmp_path / "home"
    assert main(["--home", str(home), "run", "train.epochs=1"]) == 2
    err = _one_line(capsys)
    assert err.startswith("avlab: error: AVLAB_WORKER_WAIT_S: 0.001 s is too short") and "at least 5 s" in err
    _nothing_started(home)
    for ok in ("0", "5", "6"):
        monkeypatch.setenv("AVLAB_WORKER_WAIT_S", ok)
        assert worker_wait_s() == float(ok)


# --- job files -----------------------------------------------------------------------------------


def _sweep_job(home: Path, name: str, space: object) -> tuple[Path, str]:
    uri = f"sqlite:///{home / 'mlflow.db'}"
    store.prepare_store(uri)
    run_id = tracking.create_run(tracking_uri=uri, home=home, experiment="edge", run_name=name, params={},
                                 tags={"kind": "sweep", "run_name": name}, config_yaml="")
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).set_terminated(run_id, status="FAILED")
    path = jobs.write(home, jobs.JobRecord(kind="sweep", name=name, space=space, run_id=run_id, tracking_uri=uri,
                                           max_concurrent=1, storage=str(home / "ray")))
    return path, run_id


def _everything(home: Path) -> dict[str, bytes]:
    return {str(p.relative_to(home)): p.read_bytes() for p in sorted(home.rglob("*"))
            if p.is_file() and p.suffix == ".json"}


def test_resume_retry_failed_of_a_damaged_job_file_is_one_line_naming_it(tmp_path, capsys):
    """A job file whose search space or config lost a key or holds a wrong value (edited by hand,
    cut short by a full disk) stops `avlab resume --retry-failed` in one line naming the file,
    before a failure is cleared or a run is touched."""
    import ray
    from mlflow.tracking import MlflowClient

    from orchestrator.search_space import load_search_space

    home = tmp_path / "home"
    space = load_search_space(ROOT / "search_spaces" / "memory_size_fig6.yaml").to_dict()
    del space["path"]
    path, run_id = _sweep_job(home, "swept", json.loads(json.dumps(space, default=str)))
    before = _everything(home)
    assert main(["--home", str(home), "resume", "swept", "--retry-failed"]) == 2
    err = _one_line(capsys)
    assert err.startswith(f"avlab: error: {path}: space: not a search space as avlab writes it (no 'path')"), err
    # A run's config with a value of the wrong type: the file and the field.
    run_path = jobs.write(home, jobs.JobRecord(kind="run", name="ran", config={"train": {"epochs": "two"}},
                                               run_id=run_id, tracking_uri=f"sqlite:///{home / 'mlflow.db'}"))
    assert main(["--home", str(home), "resume", "ran", "--retry-failed"]) == 2
    assert _one_line(capsys).startswith(f"avlab: error: {run_path}: train.epochs: expected an integer")
    assert {k: v for k, v in _everything(home).items() if "ran" not in k} == before
    assert MlflowClient(f"sqlite:///{home / 'mlflow.db'}").get_run(run_id).info.status == "FAILED"
    assert not (home / "ray").exists() and not ray.is_initialized()


# --- cluster recipes -----------------------------------------------------------------------------


@pytest.mark.parametrize("content, problem", [
    (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "not a text file"),
    ("image: caf\xe9/avlab:latest\n".encode("latin-1"), "not UTF-8 text"),
])
def test_check_cluster_names_a_file_that_is_not_text(tmp_path, capsys, content, problem):
    path = tmp_path / "cluster.yaml"
    path.write_bytes(content)
    assert main(["check-cluster", str(path)]) == 2
    assert _one_line(capsys).startswith(f"avlab: error: {path}: {problem}")


def test_check_cluster_finds_a_placeholder_after_a_hash_inside_quotes(tmp_path, capsys):
    path = tmp_path / "cluster-kuberay.yaml"
    path.write_text('image: "registry.example.org/avlab:1#x"  # a REGISTRY/ in a comment is not one\n'
                    'command: ["sh", "-c", "echo ready # REGISTRY/avlab"]\n'
                    "note: don't # REGISTRY/ after an apostrophe is a comment\n")
    assert main(["check-cluster", str(path)]) == 2
    err = _one_line(capsys)
    assert err.startswith(f"avlab: error: {path}:2: REGISTRY/ is a placeholder") and "more" not in err, err
    path.write_text(path.read_text().replace('# REGISTRY/avlab"', '# registry.example.org/avlab"'))
    assert main(["check-cluster", str(path)]) == 0


# --- claims --------------------------------------------------------------------------------------


GOOD = {
    "claim": "more memory is better", "paper": "BMA-Memory", "where": "Fig. 6", "quote": "more memory helps",
    "search_space": "memory_size_fig6.yaml", "metric": "image_h_linear_acc",
    "rule": {"type": "greater", "a": "method.memory_size=500", "b": "method.memory_size=10"},
}
M = "method.memory_size="


@pytest.mark.parametrize("change, field", [
    ({"rule": {"type": "greater", "a": f"{M}500", "b": f"{M}500"}}, "rule.b"),
    ({"rule": {"type": "ordering", "rows": [f"{M}500", f"{M}10", f"{M}500"]}}, "rule.rows"),
    ({"rule": {"type": "argmax", "best": f"{M}500", "among": [f"{M}500", f"{M}500"]}}, "rule.among"),
    ({"rule": {"type": "peak", "at": f"{M}10", "rows": [f"{M}10", f"{M}500", f"{M}1000"]}}, "rule.at"),
    ({"rule": {"type": "plateau", "after": f"{M}1000", "rows": [f"{M}500", f"{M}1000"], "delta": 0.1}}, "rule.after"),
    ({"search_space": "/etc/passwd"}, "search_space"),
    ({"search_space": "../search_spaces/memory_size_fig6.yaml"}, "search_space"),
    ({"search_space": "memory_size_fig6.json"}, "search_space"),
])
def test_a_claim_that_compares_a_row_with_itself_or_reads_elsewhere_exits_2(tmp_path, capsys, change, field):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**GOOD, **change}))
    home = tmp_path / "home"
    assert main(["--home", str(home), "reproduce", str(bad)]) == 2
    assert _one_line(capsys).startswith(f"avlab: error: bad.yaml: {field}: ")
    _nothing_started(home)


def test_a_claims_search_space_linked_from_outside_is_refused(tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "mem.yaml").write_text((ROOT / "search_spaces" / "memory_size_fig6.yaml").read_text())
    claims = tmp_path / "claims"
    claims.mkdir()
    (claims / "mem.yaml").symlink_to(outside / "mem.yaml")
    (claims / "c.yaml").write_text(yaml.safe_dump({**GOOD, "search_space": "mem.yaml"}))
    assert main(["--home", str(tmp_path / "home"), "reproduce", str(claims / "c.yaml")]) == 2
    assert re.match(r"avlab: error: c\.yaml: search_space: .*mem\.yaml links outside", _one_line(capsys))
    # The same file beside the claim is accepted.
    (claims / "mem.yaml").unlink()
    (claims / "mem.yaml").write_text((outside / "mem.yaml").read_text())
    from orchestrator.claims import load_claim

    assert load_claim(claims / "c.yaml").search_space == claims / "mem.yaml"


# --- manifests -----------------------------------------------------------------------------------


def _files(root: Path) -> tuple[str, str, str]:
    for i, (freq, colour) in enumerate(((300, (200, 40, 40)), (900, (40, 40, 200)))):
        _tone(root / f"s{i}.wav", freq)
        _image(root / f"i{i}.png", colour)
    return str(root / "s0.wav"), str(root / "i0.png"), str(root / "i1.png")


def _row(id_: str, split: str, root: Path, k: int, label: str = "") -> dict:
    return {"id": id_, "split": split, "label": label, "image": str(root / f"i{k % 2}.png"),
            "sound": str(root / f"s{k % 2}.wav")}


def _manifest(root: Path, name: str, pairs: int, train: int, test: int) -> Path:
    _files(root)
    rows = [_row(f"p{k}", "pretrain", root, k) for k in range(pairs)]
    rows += [_row(f"tr{k}", "train", root, k, "ab"[k % 2]) for k in range(train)]
    rows += [_row(f"te{k}", "test", root, k, "ab"[k % 2]) for k in range(test)]
    return write_manifest(rows, root / name)


@pytest.mark.parametrize("pairs, train, test, where", [
    (1, 0, 0, "its train split holds 0 rows"),  # one pair: nothing to probe on
    (0, 1, 0, "its train split holds 1 row"),  # one labelled row: one class
    (0, 2, 1, "its test split holds 1 row"),
    (1, 4, 2, "its paired pool holds 1 item, fewer than train.batch_size=4"),
])
def test_a_manifest_too_small_for_the_run_is_named(tmp_path, capsys, pairs, train, test, where):
    """The manifest, not the procedural pool size it replaces (data.paired_size), is the file to fix."""
    manifest = _manifest(tmp_path / "data", "m.csv", pairs, train, test)
    home = tmp_path / "home"
    assert main(["--home", str(home), "run", f"data.manifest={manifest}", "train.batch_size=4"]) == 2
    err = _one_line(capsys)
    assert err.startswith(f"avlab: error: data.manifest: {manifest}: {where}"), err
    _nothing_started(home)
    assert not (tmp_path / "data" / ".avlab-cache").exists()  # nothing decoded


def test_multissl_on_a_manifest_needs_no_foreground_task(tmp_path, capsys):
    """A manifest's rows carry no foreground masks: the foreground task is refused up front (it
    failed at its first step), the other tasks pass that check."""
    from orchestrator.config import ConfigError, resolve

    manifest = _manifest(tmp_path / "data", "m.csv", 8, 4, 2)
    home = tmp_path / "home"
    common = [f"data.manifest={manifest}", "data.binaural=true", "method.name=multissl", "train.batch_size=4"]
    assert main(["--home", str(home), "run", *common]) == 2
    err = _one_line(capsys)
    assert err.startswith("avlab: error: method.tasks: foreground alignment reads each scene's foreground mask"), err
    _nothing_started(home)
    try:
        resolve(overrides=[*common, "method.tasks=[spatial,gap]"])
    except ConfigError as exc:
        assert not str(exc).startswith("method.tasks"), exc


def test_the_supervised_baseline_on_a_manifest_trains_on_its_labelled_split(tmp_path):
    """On a manifest the supervised baseline's pool defaults to the labelled train split, the only
    one it can learn from there; on the procedural data (whose pairs carry labels) the default
    stays the pairs, and with it every earlier configuration's identity."""
    import torch

    from methods.data import build_dataset
    from methods.registry import METHODS, build_method
    from orchestrator.config import ConfigError, ExperimentConfig, resolve

    manifest = _manifest(tmp_path / "data", "m.csv", 4, 4, 2)
    cfg = resolve(overrides=["method.name=supervised", f"data.manifest={manifest}", "train.batch_size=4"])
    assert cfg.method.pool == "train" and cfg.to_dict()["method"]["pool"] == "train"
    assert METHODS["supervised"].method_cls.pretraining_pool(cfg.method) == "train"
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg
    # The pool it pretrains on serves labelled batches the method trains on.
    data = build_dataset(cfg.data)
    method = build_method(cfg.method_name, cfg.method, data.info())
    pool = data.pool(cfg.method.pool)
    batch = {k: torch.stack([pool[i][k] for i in range(4)]) for k in ("image", "sound", "label")}
    out = method.training_step(batch).metrics
    assert torch.isfinite(out["loss"]) and set(batch["label"].tolist()) == {0, 1}
    # Asked for explicitly, the unlabelled pairs are still refused.
    with pytest.raises(ConfigError, match=r"^method\.pool: .*method\.pool=train"):
        resolve(overrides=["method.name=supervised", f"data.manifest={manifest}", "train.batch_size=4",
                           "method.pool=paired"])
    # Procedural data: the default is the pairs, as before, with the same identity as asking for them.
    default = resolve(overrides=["method.name=supervised"])
    assert default.method.pool == "paired"
    assert default.identity() == resolve(overrides=["method.name=supervised", "method.pool=paired"]).identity()
