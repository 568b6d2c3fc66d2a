"""Results bundles (``orchestrator.bundle``): finished jobs moved between homes with everything
they logged, run ids rewritten where runs name each other, and bad bundles refused before any write."""

import json
import sqlite3

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from orchestrator import jobs, tracking
from orchestrator.cli import main
from orchestrator.runs import SWEEP_EXPERIMENT, children, find_sweep_run
from orchestrator.search_space import load_search_space


def _store(home):
    uri = f"sqlite:///{home / 'mlflow.db'}"
    tracking.prepare_store(uri)
    return uri, MlflowClient(uri)


@pytest.fixture
def source(tmp_path):
    """A home with a finished sweep of two trials (the second reusing the first's weights, which
    also holds an artifact) and a sweep still running."""
    home = tmp_path / "a"
    uri, client = _store(home)
    space_file = tmp_path / "mem.yaml"
    space_file.write_text("grid:\n  method.memory_size: [8, 16]\n")
    space = load_search_space(space_file).to_dict()
    exp = tracking.get_or_create_experiment(client, SWEEP_EXPERIMENT, home)
    ids = {}
    for name in ("mem", "busy"):
        parent = client.create_run(exp, run_name=name, start_time=1_000,
                                   tags={"avlab.kind": "sweep", "avlab.sweep_name": name}).info.run_id
        client.log_param(parent, "metric", "image_h_linear_acc")
        jobs.write(home, jobs.JobRecord(kind="sweep", name=name, run_id=parent, tracking_uri=uri, space=space,
                                        storage=str(home / "ray")))
        ids[name] = parent
    first = client.create_run(exp, run_name="mem/a/seed0", start_time=2_000,
                              tags={"mlflow.parentRunId": ids["mem"], "avlab.kind": "trial"}).info.run_id
    client.log_batch(first, metrics=[Metric("loss", 5.0 - s, 10_000 + s, s) for s in range(3)]
                     + [Metric("image_h_linear_acc", 0.25, 20_000, 2), Metric("bad", float("nan"), 20_000, 2)])
    (tmp_path / "enc.json").write_text('{"width": 16}')
    client.log_artifact(first, str(tmp_path / "enc.json"), "encoders")
    second = client.create_run(exp, run_name="mem/b/seed0", start_time=3_000,
                               tags={"mlflow.parentRunId": ids["mem"], "avlab.kind": "trial",
                                     "avlab.reused_from": first}).info.run_id
    client.log_metric(second, "image_h_linear_acc", 0.25, timestamp=20_000, step=2)
    for run_id, end in ((first, 2_500), (second, 3_500), (ids["mem"], 4_000)):
        client.set_terminated(run_id, "FINISHED", end_time=end)
    return home, client, ids, (first, second)


def test_a_bundle_moves_a_finished_sweep_with_its_histories_times_links_and_artifacts(source, tmp_path, capsys):
    home, _, ids, (first, second) = source
    bundle, moved = tmp_path / "bundle", tmp_path / "b"
    assert main(["--home", str(home), "results", "export", "mem", "--out", str(bundle)]) == 0
    assert capsys.readouterr().out == f"[avlab] exported mem: 3 runs, 1 artifact files ({bundle})\n"
    assert main(["--home", str(moved), "results", "import", str(bundle)]) == 0
    assert "[avlab] imported mem: 3 runs" in capsys.readouterr().out
    uri, client = _store(moved)
    parent = find_sweep_run(client, "mem")
    record = jobs.read(moved, "mem")
    assert record.run_id == parent.info.run_id and record.tracking_uri == uri and record.driver is None
    assert record.storage == str(moved / "ray") and record.space == jobs.read(home, "mem").space
    assert parent.info.run_id != ids["mem"] and parent.data.tags["avlab.imported_from"] == ids["mem"]
    assert (parent.info.start_time, parent.info.end_time, parent.info.status) == (1_000, 4_000, "FINISHED")
    assert parent.data.params == {"metric": "image_h_linear_acc"}
    trials = {r.info.run_name: r for r in children(client, parent.info.run_id)}
    assert sorted(trials) == ["mem/a/seed0", "mem/b/seed0"]
    a, b = trials["mem/a/seed0"], trials["mem/b/seed0"]
    assert [(m.step, m.timestamp, m.value) for m in client.get_metric_history(a.info.run_id, "loss")] == \
           [(0, 10_000, 5.0), (1, 10_001, 4.0), (2, 10_002, 3.0)]
    assert str(a.data.metrics["bad"]) == "nan"
    assert b.data.tags["avlab.reused_from"] == a.info.run_id  # rewritten to the imported run
    assert (a.info.start_time, a.info.end_time) == (2_000, 2_500)
    local = client.download_artifacts(a.info.run_id, "encoders/enc.json", str(tmp_path))
    assert json.loads(open(local).read()) == {"width": 16}


def test_a_bundle_holds_finished_work_only_and_is_written_to_a_new_folder(source, tmp_path, capsys):
    home = source[0]
    assert main(["--home", str(home), "results", "export", "busy", "--out", str(tmp_path / "x")]) == 2
    assert "NAME: busy is not finished (its MLflow run is RUNNING); `avlab resume busy`" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert main(["--home", str(home), "results", "export", "mem", "--out", str(taken)]) == 2
    assert f"--out: {taken} exists and is not an empty folder" in capsys.readouterr().err
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    assert main(["--home", str(home), "results", "export", "nope", "--out", str(tmp_path / "y")]) == 2
    assert "nope" in capsys.readouterr().err and not (tmp_path / "y").exists()


@pytest.mark.parametrize(("damage", "message"), ids=["no-index", "other-format", "bad-json", "not-a-run", "bad-job"], argvalues=[
    (lambda b: (b / "bundle.json").unlink(), r"is not an avlab results bundle \(no bundle\.json\)"),
    (lambda b: (b / "bundle.json").write_text('{"format": 9}'), r"bundle\.json: not a bundle index of format 1"),
    (lambda b: next(b.glob("runs/*/run.json")).write_text("{"), r"run\.json: unreadable \(JSONDecodeError\)"),
    (lambda b: next(b.glob("runs/*/run.json")).write_text('{"params": {}}'), r"run\.json: not a run as avlab writes "
                                                                              r"it \(tags is not a mapping|no "),
    (lambda b: (b / "jobs" / "mem.json").write_text("[]"), r"mem\.json: not an avlab job file"),
])
def test_a_damaged_bundle_is_refused_naming_its_file_before_anything_is_written(source, tmp_path, capsys,
                                                                                damage, message):
    home = source[0]
    bundle, moved = tmp_path / "bundle", tmp_path / "b"
    assert main(["--home", str(home), "results", "export", "mem", "--out", str(bundle)]) == 0
    damage(bundle)
    capsys.readouterr()
    assert main(["--home", str(moved), "results", "import", str(bundle)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    import re

    assert re.search(message, err), err
    assert not (moved / "jobs").exists()
    if (moved / "mlflow.db").exists():
        assert sqlite3.connect(moved / "mlflow.db").execute("select count(*) from runs").fetchone() == (0,)
