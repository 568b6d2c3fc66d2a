"""`avlab report` on a real MLflow store filled by hand: when a configuration is marked best,
intervals clipped to a metric's range, chance and the random-init reference, the parent run's
description, and the experiments' kind (the UI opens them on their runs)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from methods.metric_names import chance_level, metric_range
from orchestrator import tracking
from orchestrator.report import build_report, plot, to_markdown, to_table, write_report
from orchestrator.runs import SWEEP_EXPERIMENT

METRIC = "image_h_linear_acc"
DATA = {"data.num_classes": "10", "data.azimuth_sectors": "8", "data.manifest": "None", "data.seed": "0",
        "eval.linear_C": "1.0", "method.image_encoder.stem": "small"}


@pytest.fixture
def store(tmp_path):
    home = tmp_path / "home"
    uri = f"sqlite:///{home / 'mlflow.db'}"
    tracking.prepare_store(uri)
    return home, uri, MlflowClient(uri)


def _sweep(home, uri, name: str, rows: dict[str, list[float]], *, epochs: str = "5", data=DATA) -> str:
    """A parent run and one finished child per (configuration, seed) with ``METRIC`` logged."""
    parent = tracking.create_run(tracking_uri=uri, home=home, experiment=SWEEP_EXPERIMENT, run_name=name,
                                 params={"metric": METRIC, "mode": "max", "search_space": "s.yaml"},
                                 tags={"kind": "sweep", "sweep_name": name}, config_yaml="")
    client = MlflowClient(uri)
    for label, values in rows.items():
        for seed, value in enumerate(values):
            run = tracking.create_run(tracking_uri=uri, home=home, experiment=SWEEP_EXPERIMENT,
                                      run_name=f"{name}/{label}/seed{seed}",
                                      params={**data, "train.epochs": epochs, "varied.method.memory_size": label},
                                      tags={"kind": "trial", "config_label": label}, config_yaml="",
                                      parent_run_id=parent)
            client.log_metric(run, METRIC, value)
            client.set_terminated(run, "FINISHED")
    return parent


def test_metric_ranges_and_chance_levels():
    assert metric_range("image_h_linear_acc") == metric_range("sound_h_svm_f1") == (0.0, 1.0)
    assert metric_range("retrieval_s2i_rank5") == (0.0, 1.0) and metric_range("image_z_mean_cos") == (-1.0, 1.0)
    assert metric_range("loss_pair") is None and metric_range("train_pairs_per_s") is None
    assert chance_level("image_h_knn_acc", num_classes=10, sectors=8) == 0.1
    assert chance_level("sound_h_spatial_acc", num_classes=10, sectors=8) == 0.125
    assert chance_level("l3_acc", num_classes=10, sectors=8) == 0.5
    assert chance_level("retrieval_s2i_rank1", num_classes=5, sectors=8) == 0.2
    assert chance_level("retrieval_s2i_rank5", num_classes=5, sectors=8) is None


def test_best_only_when_distinguishable_and_intervals_clipped(store):
    home, uri, client = store
    _sweep(home, uri, "overlap", {"10": [0.05, 0.15], "100": [0.08, 0.10]})
    report = build_report(client, "overlap")
    # 0.10 vs 0.09: the higher mean, but two seeds cannot tell them apart.
    assert report["best"] is None and report["best_mean"] == "10"
    row = next(r for r in report["rows"] if r["configuration"] == "10")["metrics"][METRIC]
    assert row["mean"] - row["ci95"] < 0 and row["low"] == 0.0  # Student t reaches below 0
    assert row["high"] == pytest.approx(row["mean"] + row["ci95"])
    text = to_markdown(report)
    assert "**best**" not in text and "No single best on image_h_linear_acc" in text
    assert f"0.100 [0.000, {row['high']:.3f}]" in text

    _sweep(home, uri, "clear", {"10": [0.50, 0.52, 0.51], "100": [0.20, 0.22, 0.21], "1000": [0.30, 0.31, 0.29]})
    report = build_report(client, "clear")
    assert report["best"] == "10"
    assert "| 10 **best** |" in to_markdown(report) and "10 *" in to_table(report)


def test_chance_and_random_init_reference_from_the_store(store, tmp_path):
    home, uri, client = store
    _sweep(home, uri, "trained", {"10": [0.30, 0.32], "100": [0.31, 0.33]})
    report = build_report(client, "trained")
    assert report["chance"] == 0.1 and report["random_init"] is None

    # Untrained runs: one on the same data and encoders, one on other data (not a reference).
    _sweep(home, uri, "untrained", {"random": [0.18, 0.22]}, epochs="0")
    _sweep(home, uri, "other-data", {"random": [0.9]}, epochs="0", data={**DATA, "data.seed": "7"})
    report = build_report(client, "trained")
    assert report["random_init"]["n"] == 2 and report["random_init"]["mean"] == pytest.approx(0.20)
    assert "Random init (same data, evaluation and encoders; 2 runs): 0.200" in to_markdown(report)
    ax = plot(report).axes[0]
    assert {"chance", "random init (2 runs)"} <= {t.get_text() for t in ax.get_legend().get_texts()}

    paths = write_report(client, "trained", tmp_path / "out")
    assert json.loads(paths["json"].read_text())["random_init"]["n"] == 2
    parent = client.get_run(report["parent_run_id"])
    assert parent.data.tags["mlflow.note.content"] == paths["markdown"].read_text()


def test_experiments_open_on_their_runs(store):
    home, uri, client = store
    _sweep(home, uri, "kind", {"10": [0.3]})
    exp = client.get_experiment_by_name(SWEEP_EXPERIMENT)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    # A store made before the kind was set gets it the next time avlab opens the experiment.
    client.delete_experiment_tag(exp.experiment_id, "mlflow.experimentKind")
    tracking.get_or_create_experiment(client, SWEEP_EXPERIMENT, home)
    assert client.get_experiment(exp.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_pareto_front_against_brute_force():
    import itertools
    import random

    from orchestrator.report import pareto_front, plot_pareto

    rng = random.Random(0)
    objectives = [("image_h_linear_acc", "max"), ("train_time_s", "min")]
    for _ in range(50):
        values = [(round(rng.random(), 1), rng.choice([10.0, 20.0, 30.0])) for _ in range(rng.randint(1, 8))]
        rows = [{"configuration": f"c{i}", "metrics": {"image_h_linear_acc": {"mean": a}, "train_time_s": {"mean": t}}}
                for i, (a, t) in enumerate(values)]
        front = pareto_front(rows, objectives)
        for (i, (a, t)), (j, (b, u)) in itertools.product(enumerate(values), repeat=2):
            if b >= a and u <= t and (b, u) != (a, t):  # j dominates i
                assert f"c{i}" not in front
        assert all(f"c{i}" in front or any(b >= a and u <= t and (b, u) != (a, t) for b, u in values)
                   for i, (a, t) in enumerate(values))
    report = {"sweep": "s", "objectives": [{"metric": m, "mode": d} for m, d in objectives], "rows": rows,
              "pareto": front}
    ax = plot_pareto(report).axes[0]
    assert ax.get_xlabel() == "train_time_s (min)" and ax.get_ylabel() == "image_h_linear_acc (max)"


def test_a_multi_objective_space_survives_its_job_file():
    from orchestrator.search_space import SearchSpace, load_search_space

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mo.yaml"
        path.write_text("search:\n  method.loss_temperature: {type: uniform, low: 0.1, high: 0.5}\n"
                        "metrics: {image_h_linear_acc: max, train_time_s: min}\n")
        space = load_search_space(path)
    assert space.metric == "image_h_linear_acc" and space.mode == "max"
    assert SearchSpace.from_dict(json.loads(json.dumps(space.to_dict()))).all_objectives == space.objectives


def test_the_code_a_trial_ran_is_tagged_and_reported(store, tmp_path):
    """Every run carries ``avlab.source_hash``, a hash of methods/ and orchestrator/ that changes
    with any of their files and nothing else; the report says which code made the numbers."""
    import shutil

    from conftest import ROOT

    home, uri, client = store
    _sweep(home, uri, "one-code", {"10": [0.30, 0.32]})
    report = build_report(client, "one-code")
    assert report["code_versions"] == {tracking.source_hash(): 2}
    assert f"Every trial ran on code {tracking.source_hash()} (tag `avlab.source_hash`)." in to_markdown(report)
    assert f"Every trial ran on code {tracking.source_hash()}" in to_table(report)

    # A trial of other code, and one made before the tag.
    parent = _sweep(home, uri, "mixed", {"10": [0.30, 0.32, 0.31]})
    children = client.search_runs([client.get_experiment_by_name(SWEEP_EXPERIMENT).experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent}'")
    client.set_tag(children[0].info.run_id, "avlab.source_hash", "0123456789ab")
    client.delete_tag(children[1].info.run_id, "avlab.source_hash")
    report = build_report(client, "mixed")
    assert report["code_versions"] == {"0123456789ab": 1, tracking.source_hash(): 1, "unrecorded": 1}
    listed = ", ".join(f"{code} (1)" for code in sorted(["0123456789ab", tracking.source_hash(), "unrecorded"]))
    assert f"The trials ran on several code versions (tag `avlab.source_hash`): {listed}." in to_markdown(report)

    # The hash of a copy of the tree is this code's; one changed byte in one file changes it.
    copy = tmp_path / "copy"
    for package in tracking.SOURCE_PACKAGES:
        shutil.copytree(ROOT / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    assert tracking.tree_hash(copy) == tracking.source_hash() == tracking.tree_hash(ROOT)
    (copy / "README.txt").write_text("not code")
    assert tracking.tree_hash(copy) == tracking.source_hash()
    target = copy / "methods" / "losses.py"
    target.write_text(target.read_text() + "\n")
    assert tracking.tree_hash(copy) != tracking.source_hash()


def test_rows_sort_by_value_and_a_share_of_the_preset_by_its_percentage():
    from orchestrator.report import _sort_key

    rows = [{"a": "100%"}, {"a": "name"}, {"a": "20%"}, {"a": "5"}]
    assert sorted(rows, key=_sort_key) == [{"a": "5"}, {"a": "20%"}, {"a": "100%"}, {"a": "name"}]


@pytest.mark.parametrize("command", ["report", "status"])
@pytest.mark.parametrize("name", ["a'b", 'a"b', "x' or tags.`avlab.kind` = 'sweep"])
def test_a_name_that_avlab_never_gives_a_sweep_is_one_line(store, capsys, command, name):
    """A quote in the name would break MLflow's search filter (a traceback): no sweep has such a
    name, and the command says so in one line, with the store as it was."""
    from orchestrator.cli import main

    home, uri, client = store
    _sweep(home, uri, "real", {"10": [0.5]})
    runs = len(client.search_runs([client.get_experiment_by_name(SWEEP_EXPERIMENT).experiment_id]))
    code = main([command, name, "--home", str(home)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"avlab: error: NAME: {name!r} is not a valid name; use letters, digits, '.', " \
                                "'_' and '-' (starting with a letter or digit, at most 128 characters)", err
    assert len(client.search_runs([client.get_experiment_by_name(SWEEP_EXPERIMENT).experiment_id])) == runs
    assert main([command, "real", "--home", str(home)]) == 0  # a real name still answers


def test_a_sweep_of_more_trials_than_one_page_is_read_whole(store, monkeypatch):
    """Searches read every page: with pages of 3 runs, a sweep of 7 trials reports 7 seeds, its
    status lists 7 trials, and a store of 9 untrained runs gives random init 9 values."""
    from orchestrator import runs
    from orchestrator.report import status_lines

    home, uri, client = store
    _sweep(home, uri, "wide", {"16": [0.5 + 0.01 * i for i in range(7)]})
    _sweep(home, uri, "untrained", {"16": [0.1] * 9}, epochs="0")
    monkeypatch.setattr(runs, "PAGE", 3)
    report = build_report(client, "wide")
    assert report["rows"][0]["seeds"] == 7 and report["rows"][0]["metrics"][METRIC]["n"] == 7
    assert report["random_init"]["n"] == 9
    assert sum(line.startswith("  FINISHED") for line in status_lines(client, "wide")) == 7


def test_a_read_of_some_fields_returns_what_mlflows_search_returns(store):
    """`children(..., params=...)` reads MLflow's tables itself (status and report of big sweeps):
    the same runs, in the same order, with the same info, tags and latest metrics (NaN, several
    steps) as MLflow's search, and only the parameters asked for; deleted runs and other sweeps'
    runs left out; a store without tables (a tracking server) gets the search."""
    import math

    from mlflow.entities import Metric

    from orchestrator.runs import children

    _, uri, client = store
    exp = tracking.get_or_create_experiment(client, SWEEP_EXPERIMENT, store[0])
    parent = client.create_run(exp, run_name="s").info.run_id
    other = client.create_run(exp, run_name="t").info.run_id
    ids = []
    for i in range(4):
        run = client.create_run(exp, run_name=f"s/{i}", tags={"mlflow.parentRunId": parent, "avlab.seed": str(i)})
        rid = run.info.run_id
        client.log_batch(rid, metrics=[Metric(METRIC, 0.1 * i, 1000 + i, 0), Metric(METRIC, 0.2 * i, 2000, 1),
                                       Metric("loss", float("nan"), 3000, 0)])
        for key, value in {**DATA, "varied.method.memory_size": str(8 * i), "seed": str(i), "train.epochs": "3"}.items():
            client.log_param(rid, key, value)
        if i == 3:
            client.set_terminated(rid, "FINISHED")
        ids.append(rid)
    client.delete_run(ids[1])
    client.create_run(exp, run_name="t/0", tags={"mlflow.parentRunId": other})
    full = children(client, parent)
    for prefixes in [(), ("varied.",), ("data.", "seed")]:
        light = children(client, parent, params=prefixes)
        assert [r.info.run_id for r in light] == [r.info.run_id for r in full] == [ids[3], ids[2], ids[0]]
        for a, b in zip(light, full):
            assert a.info.to_proto() == b.info.to_proto()
            assert a.data.tags == b.data.tags
            assert a.data.metrics.keys() == b.data.metrics.keys()
            assert all(math.isnan(v) and math.isnan(b.data.metrics[k]) or v == b.data.metrics[k]
                       for k, v in a.data.metrics.items())
            assert a.data.params == ({k: v for k, v in b.data.params.items() if k.startswith(prefixes)} if prefixes else {})
    assert children(client, parent, params=("varied.",))[0].data.metrics[METRIC] == pytest.approx(0.6)  # the last step
    # Only the tags and metrics asked for (and MLflow's own tags), e.g. what `avlab status` shows.
    (some,) = [r for r in children(client, parent, params=(), tags=("avlab.seed",), metrics=(METRIC,))
               if r.info.run_id == ids[3]]
    assert some.data.metrics == {METRIC: pytest.approx(0.6)} and some.data.params == {}
    assert some.data.tags == {k: v for k, v in full[0].data.tags.items() if k == "avlab.seed" or k.startswith("mlflow.")}
    assert "avlab.seed" in some.data.tags and "mlflow.parentRunId" in some.data.tags
    # Through a tracking server the search answers (no tables to read here).
    from mlflow.store.tracking.rest_store import RestStore

    assert not hasattr(RestStore, "ManagedSessionMaker")


def test_the_settings_every_finished_trial_shares_are_found_by_one_query(store):
    """`shared_params` (chance and the random-init reference of a report): the parameters with one
    value in every finished trial, as a read of the whole runs computes them; a key one trial
    lacks, a value that differs, unfinished and deleted trials and other sweeps are told apart."""
    from orchestrator import runs as runs_module

    _, _, client = store
    exp = tracking.get_or_create_experiment(client, SWEEP_EXPERIMENT, store[0])
    parent, other = (client.create_run(exp, run_name=n).info.run_id for n in ("s", "t"))
    ids = []
    for i in range(4):
        rid = client.create_run(exp, run_name=f"s/{i}", tags={"mlflow.parentRunId": parent}).info.run_id
        values = {**DATA, "data.seed": str(i % 2), "eval.only_some": "x", "method.memory_size": "8"}
        if i == 2:
            del values["eval.only_some"]
        for key, value in values.items():
            client.log_param(rid, key, value)
        client.set_terminated(rid, "FINISHED" if i < 3 else "KILLED")
        ids.append(rid)
    late = client.create_run(exp, run_name="s/4", tags={"mlflow.parentRunId": parent}).info.run_id
    client.log_param(late, "data.num_classes", "99")
    client.set_terminated(late, "FINISHED")
    client.delete_run(late)  # deleted: not a trial any more
    stray = client.create_run(exp, run_name="t/0", tags={"mlflow.parentRunId": other}).info.run_id
    client.log_param(stray, "data.num_classes", "7")
    client.set_terminated(stray, "FINISHED")
    prefixes = ("data.", "eval.", "method.image_encoder.")
    expected = {k: v for k, v in DATA.items() if k != "data.seed"}  # seed differs, eval.only_some not in trial 2
    assert runs_module.shared_params(client, parent, prefixes) == expected
    # The same answer from whole runs (the path of a store without tables).
    finished = [r for r in runs_module.children(client, parent) if r.info.status == "FINISHED"]
    assert {k: v for k, v in finished[0].data.params.items()
            if k.startswith(prefixes) and all(r.data.params.get(k) == v for r in finished)} == expected
    assert runs_module.shared_params(client, client.create_run(exp).info.run_id, prefixes) == {}
