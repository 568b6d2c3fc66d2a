"""`avlab evaluate` and `avlab export` on one real finished run (trained here in seconds, with
its MLflow run, checkpoint and exported encoders): every bad input exits 2 with one stderr line
naming the field, file or name, before any MLflow run, registered model or folder is created;
a checkpoint that does not load is refused, never swapped for other weights; the exported
encoders are evaluated only when asked for, under their own name and tag."""

from __future__ import annotations

import shutil
import sqlite3

import numpy as np
import pytest
import soundfile as sf
from mlflow.tracking import MlflowClient
from PIL import Image

from orchestrator.cli import main
from conftest import AVLAB, TINY_RUN


@pytest.fixture(autouse=True)
def _own_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # every command reads the home's store


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished `tiny` run named "tiny" (BMA, one epoch): its home, run id and store."""
    from orchestrator import tracking
    from orchestrator.config import dump_yaml, resolve
    from orchestrator.train import train_in_trial
    from orchestrator.worker_spec import WorkerSpec

    home = tmp_path_factory.mktemp("home")
    cfg = resolve(None, preset="tiny", overrides=[*TINY_RUN, "tracking.run_name=tiny"])
    uri = f"sqlite:///{home / 'mlflow.db'}"
    tracking.prepare_store(uri)
    run_id = tracking.create_run(tracking_uri=uri, home=home, experiment="avlab", run_name="tiny", params=cfg.flat(),
                                 tags={"kind": "run"}, config_yaml=dump_yaml(cfg))
    train_in_trial(WorkerSpec(cfg.to_dict(), run_id, uri, launch_time_s=0.0, import_time_s=0.0),
                   str(home / "ray" / "tiny"), tune=False)
    tracking.end_run(uri, run_id, ok=True)
    return home, run_id


def _copy_home(src, dst):
    """A copy of a home whose store keeps its artifacts in the copy (the original stays as it was)."""
    shutil.copytree(src, dst)
    with sqlite3.connect(dst / "mlflow.db") as db:
        db.execute("UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)", (str(src), str(dst)))
        db.execute("UPDATE runs SET artifact_uri = replace(artifact_uri, ?, ?)", (str(src), str(dst)))
    return dst


def _state(home):
    """Everything a refused command must leave as it was: the runs with their metrics, the
    registered models and the files under the home."""
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    files = sorted(str(p.relative_to(home)) for p in home.rglob("*") if "mlflow.db" not in p.name)
    return ({r.info.run_id: (r.info.status, dict(r.data.metrics)) for r in runs},
            [m.name for m in client.search_registered_models()], files)


def _refused(capsys, home, argv, *expected):
    """Run ``argv``; it exits 2 with one stderr line holding every ``expected`` text, and the
    home is as it was."""
    before = _state(home)
    capsys.readouterr()
    assert main([*argv, "--home", str(home)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("avlab: error: "), err
    assert all(text in err for text in expected), err
    assert _state(home) == before
    return err.strip()


def _evaluations(home, run_id):
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("avlab")
    return client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'",
                              order_by=["attributes.start_time ASC"])


# --- 3. weights -------------------------------------------------------------------------------


def test_a_final_checkpoint_that_does_not_load_is_refused_and_the_encoders_are_evaluated_only_when_asked(
        finished, tmp_path, capsys):
    home = _copy_home(finished[0], tmp_path / "home")
    run_id = finished[1]
    final = home / "ray" / "tiny" / "checkpoint_epoch00000"
    state = final / "checkpoint.pt"
    state.write_bytes(state.read_bytes()[:1000])
    err = _refused(capsys, home, ["evaluate", "tiny"], "RUN: the final checkpoint of run tiny does not load",
                   str(state), "--encoders-only")
    assert "truncated" in err

    shutil.rmtree(final)
    _refused(capsys, home, ["evaluate", "tiny"], f"RUN: run tiny has no checkpoint in {final.parent}",
             "--encoders-only")

    assert main(["evaluate", "tiny", "--encoders-only", "--home", str(home)]) == 0
    (child,) = _evaluations(home, run_id)
    assert child.info.run_name == "tiny/eval-procedural-encoders" and child.info.status == "FINISHED"
    assert child.data.tags["avlab.weights"] == "exported encoders"
    from orchestrator import environment

    assert child.data.tags["avlab.env.id"] == environment.describe()["id"]  # evaluated here, in this environment
    assert child.data.params["weights"] == f"runs:/{run_id}/encoders"
    # The encoders' own features (f) only: none of the run's h / z / retrieval names.
    scores = {k for k in child.data.metrics if k.endswith(("_acc", "_f1", "_precision", "_recall"))}
    assert scores and all("_f_" in k for k in scores), scores


def test_the_exported_encoders_give_the_checkpoints_f_features_bit_for_bit(finished, tmp_path, capsys):
    """`--encoders-only` measures what the final checkpoint gives for the f family, no other
    weights: the same numbers."""
    home = _copy_home(finished[0], tmp_path / "home")
    assert main(["evaluate", "tiny", "eval.features=[f]", "eval.retrieval=false", "--home", str(home)]) == 0
    assert main(["evaluate", "tiny", "--encoders-only", "--home", str(home)]) == 0
    from_checkpoint, from_encoders = _evaluations(home, finished[1])
    assert from_checkpoint.data.tags["avlab.weights"] == "checkpoint"
    assert "checkpoint_epoch00000" in from_checkpoint.data.params["weights"]
    scores = [k for k in from_encoders.data.metrics if k.endswith("_acc")]
    assert len(scores) >= 4
    assert all(from_checkpoint.data.metrics[k] == from_encoders.data.metrics[k] for k in scores)

    _refused(capsys, home, ["evaluate", "tiny", "--encoders-only", "eval.features=[h]"], "eval.features: --encoders-only")


# --- 4. evaluation checks only ------------------------------------------------------------------


def _labelled_manifest(root, train: int = 8, test: int = 6):
    """A labelled dataset with train and test rows only (two classes: a tone and a colour each)."""
    from methods.data.manifest import write_manifest

    root.mkdir(parents=True)
    t = np.arange(int(2.5 * 8000)) / 8000
    rows = []
    for split, n in (("train", train), ("test", test)):
        for i in range(n):
            k = i % 2
            wav, png = root / f"{split}{i}.wav", root / f"{split}{i}.png"
            sf.write(wav, (0.3 * np.sin(2 * np.pi * (300 + 500 * k + 3 * i) * t)).astype(np.float32), 8000)
            Image.new("RGB", (40, 48), (200, 40, 40) if k else (40, 40, 200)).save(png)
            rows.append({"id": f"{split}{i}", "split": split, "source": "t", "label": "ab"[k],
                         "image": str(png), "sound": str(wav)})
    return write_manifest(rows, root / "labelled.csv")


def test_evaluate_takes_a_labelled_dataset_without_pretraining_rows(finished, tmp_path, capsys):
    home, run_id = finished
    manifest = _labelled_manifest(tmp_path / "data")
    assert main(["evaluate", "tiny", "--data", str(manifest), "--home", str(home)]) == 0, capsys.readouterr().err
    child = next(r for r in _evaluations(home, run_id) if r.data.tags["avlab.dataset"] == "labelled")
    assert child.info.status == "FINISHED" and 0 <= child.data.metrics["image_h_linear_acc"] <= 1

    one_class = _labelled_manifest(tmp_path / "one", train=1, test=1)
    _refused(capsys, home, ["evaluate", "tiny", "--data", str(one_class)],
             f"data.manifest: {one_class}: the train split holds 1 row(s) of 1 class")


# --- 11. one line for every bad input -----------------------------------------------------------


@pytest.mark.parametrize("argv, expected", [
    (["evaluate", "a'b"], ["RUN: \"a'b\" is not a run id, a run name or a sweep name"]),
    (["evaluate", "mem/a'b/seed0"], ["RUN: no run or sweep named \"mem/a'b/seed0\""]),
    (["export", "a'b", "--out", "OUT"], ["export: \"a'b\" is not a run id"]),
    (["evaluate", "tiny", "data.train_size=1"], ["data.train_size: the train split holds 1 row(s) of 1 class"]),
    (["evaluate", "tiny", "data.binaural=true"], ["data.binaural: run tiny was trained on mono (1-channel) sound"]),
    # At least 7 TiB of rendered items: more than any machine.
    (["evaluate", "tiny", "data.test_size=10000000", "data.image_size=256"],
     ["data.test_size: evaluating 10000100 items", "GiB in memory"]),
    (["evaluate", "tiny", "train.epochs=3"], ["train.epochs: an evaluation takes data.* and eval.* settings only"]),
    (["export", "tiny", "--best", "--alias", "", "--out", "OUT"], ["--alias: '' is not an alias"]),
    (["export", "tiny", "--best", "--alias", "v1", "--out", "OUT"], ["--alias: 'v1' is reserved"]),
    (["export", "tiny", "--best", "--alias", "latest", "--out", "OUT"], ["--alias: 'latest' is reserved"]),
    (["export", "tiny", "--best", "--alias", "../../x", "--out", "OUT"], ["--alias: '../../x' is not an alias"]),
    (["export", "tiny", "--alias", "mine", "--out", "OUT"], ["--alias: names the versions that --best registers"]),
    (["export", "tiny", "--best", "--out", "OUT"], ["--best: 'tiny' is a run, not a sweep"]),
])
def test_bad_input_exits_2_in_one_line_and_changes_nothing(finished, tmp_path, capsys, argv, expected):
    out = tmp_path / "out"
    _refused(capsys, finished[0], [str(out) if a == "OUT" else a for a in argv], *expected)
    assert not out.exists()


def test_export_into_a_folder_it_cannot_create_exits_2_and_leaves_nothing(finished, tmp_path, capsys):
    import os

    home = finished[0]
    # sysfs takes no new folders, whoever asks; a read-only folder stops every user but root.
    targets = [("/sys/avlab-export-test/out", "/sys/avlab-export-test")]
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        targets.append((str(locked / "a" / "out"), str(locked / "a")))
    for out, named in targets:
        _refused(capsys, home, ["export", "tiny", "--out", out], f"--out: cannot create {named}")
        assert not os.path.exists(named)
    assert main(["export", "tiny", "--out", str(tmp_path / "ok"), "--home", str(home)]) == 0
    assert {p.name for p in (tmp_path / "ok" / "tiny").iterdir()} == {"encoders.json", "encoders.safetensors"}


# --- 7. untrusted exported encoders -------------------------------------------------------------


def test_exported_encoders_that_declare_another_encoder_are_named_before_anything_is_built(
        finished, tmp_path):
    """An encoders.json that declares 64 times the weights' width (an 11 GiB encoder, once built)
    is named against the weights file's header, in a process that may not map 6 GiB: nothing is
    allocated for the declared encoder."""
    import json
    import os
    import resource
    import subprocess

    home = _copy_home(finished[0], tmp_path / "home")
    meta_path = next(home.glob("mlartifacts/*/*/artifacts/encoders/encoders.json"))
    meta = json.loads(meta_path.read_text())
    meta["encoders"]["image"]["config"]["base_width"] *= 64
    meta_path.write_text(json.dumps(meta))
    before = _state(home)

    def six_gib() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run([AVLAB, "evaluate", "tiny", "--encoders-only", "--home", str(home)], capture_output=True,
                         text=True, env=env, preexec_fn=six_gib, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "--encoders-only: run tiny's exported encoders do not load:" in out.stderr
    assert "encoders/encoders.safetensors: does not match encoders.json: image." in out.stderr
    assert _state(home) == before
