"""`avlab sweep / report / status` on a real local Ray with Tune, Optuna and MLflow."""

import json
import os
import signal
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
import torch

from orchestrator import environment
from orchestrator.cli import main
from orchestrator.search_space import load_search_space
from orchestrator.sweep import _param_space, build_searcher

from conftest import AVLAB, ROOT, TINY_RUN
from sweeps import MEM_RUN, MEM_SPACE, kill_the_trial_actor, measured, trial_runs

SMALL = TINY_RUN


def test_optuna_sampler_with_a_fixed_seed_proposes_the_same_configurations():
    space = load_search_space(ROOT / "search_spaces" / "temperatures.yaml")

    def proposals():
        searcher = build_searcher(space, seed=3)
        searcher.set_search_properties(space.metric, space.mode, _param_space(space))
        return [searcher.suggest(f"trial_{i}") for i in range(5)]

    first, second = proposals(), proposals()
    assert first == second
    assert len({round(p["method.memory_temperature"], 12) for p in first}) == 5
    for p in first:
        assert 0.02 <= p["method.memory_temperature"] <= 1.0 and 0.02 <= p["method.loss_temperature"] <= 1.0


def test_asha_scheduler_reads_the_knn_accuracy_measured_while_training(tmp_path):
    from ray.tune.schedulers import ASHAScheduler

    from orchestrator.config import ConfigError
    from orchestrator.sweep import build_scheduler, check_supported

    space = load_search_space(ROOT / "search_spaces" / "temperatures.yaml")
    check_supported(space)
    sched = build_scheduler(space)
    # It chooses, so it reads the quick probe on the validation split, and its trials score that split.
    assert isinstance(sched, ASHAScheduler) and sched._metric == "val_image_h_knn_acc"
    assert space.first_config().eval.val_metrics and space.choose_on == "val_"
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid:\n  method.memory_size: [10]\nscheduler: {type: asha}\n")
    with pytest.raises(ConfigError, match="needs eval.every_epochs >= 1"):
        check_supported(load_search_space(bad))


@pytest.mark.parametrize(
    "text, message",
    [
        ("grid:\n  method.memmory_size: [10]\n", "method.memmory_size: unknown config key"),
        ("grid: {}\n", "grid: is empty"),
        ("search:\n  method.loss_temperature: {type: uniform, low: 0.5, high: 0.1}\n", "low 0.5 is greater than high 0.1"),
        ("grid:\n  method.memory_size: [10]\nmetric: top1\n", "metric: unknown metric 'top1'"),
        # More than this machine has: the trials would wait for their workers forever.
        ("grid:\n  method.memory_size: [10]\nresources: {workers: 64}\n", "bad.yaml: resources.workers: 64 workers x 1 CPUs need 64"),
    ],
)
def test_bad_search_space_exits_2_before_anything_starts(tmp_path, capsys, text, message):
    import ray

    space = tmp_path / "bad.yaml"
    space.write_text(text)
    home = tmp_path / "home"
    assert main(["sweep", str(space), "--home", str(home)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not home.exists() and not ray.is_initialized()


@pytest.fixture(scope="module")
def mem_sweep(tmp_path_factory):
    """A 2 configurations x 2 seeds grid, never interrupted."""
    root = tmp_path_factory.mktemp("mem")
    space = root / "mem.yaml"
    space.write_text(MEM_SPACE)
    home = root / "runs"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run([AVLAB, "sweep", str(space), "--name", "mem", "--home", str(home), *MEM_RUN],
                         capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return home, out


@pytest.mark.slow
def test_a_trial_run_alone_with_an_extra_probe_measures_what_it_measured_in_the_sweep(tmp_path, mem_sweep):
    """A trial's numbers are a function of its configuration and seed: run alone (`avlab run`, no
    sweep, no Tune), with the sound SVM probe turned on besides, it logs every metric the trial
    measured, bit for bit, and the SVM's on top. (The same trial in a sweep of other concurrency
    and after a resume: test_a_single_worker_trial_whose_process_is_killed_...)."""
    home, _ = mem_sweep
    trial = trial_runs(home, "mem")[("method.memory_size=10", "1")]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run([AVLAB, "run", "--home", str(tmp_path / "runs"), *MEM_RUN, "tracking.run_name=alone",
                          "method.memory_size=10", "seed=1", "eval.sound_svm=true"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (alone,) = client.search_runs([client.get_experiment_by_name("avlab").experiment_id])
    shared, extra = measured(trial), measured(alone)
    assert {k: extra[k] for k in shared} == shared
    assert set(extra) - set(shared) >= {"sound_h_svm_acc", "sound_h_svm_iters"}
    assert alone.data.tags["avlab.env.id"] == trial.data.tags["avlab.env.id"]


@pytest.mark.slow
def test_small_sweep_parent_children_report_and_status(mem_sweep):
    home, out = mem_sweep
    assert "| method.memory_size=10 " in out.stdout and "| method.memory_size=100" in out.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("avlab-sweeps")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("avlab.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("avlab.kind") == "trial"]
    assert len(parents) == 1 and len(children) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert sorted((r.data.params["varied.method.memory_size"], r.data.params["seed"]) for r in children) == [
        ("10", "0"), ("10", "1"), ("100", "0"), ("100", "1")]
    for r in children:
        assert r.info.status == "FINISHED" and 0 <= r.data.metrics["image_h_linear_acc"] <= 1
        assert [m.step for m in client.get_metric_history(r.info.run_id, "loss_pair")] == [0, 1]
        # What the trial cost, next to what it scored: throughput and where its time went.
        m = r.data.metrics
        epochs = client.get_metric_history(r.info.run_id, "epoch_time_s")
        assert m["train_time_s"] == pytest.approx(sum(e.value for e in epochs))
        assert 0 < m["train_pairs_per_s"] <= max(x.value for x in client.get_metric_history(r.info.run_id, "pairs_per_s"))
        assert all(m[k] >= 0 for k in ("launch_time_s", "import_time_s", "setup_time_s", "checkpoint_time_s"))
        assert m["trial_time_s"] > m["launch_time_s"] + m["setup_time_s"] + m["train_time_s"] + m["eval_time_s"]
        assert r.data.tags["avlab.launcher"] == "trial"  # one worker: trained in the trial's own process
        # Where its numbers were computed: this machine's environment, the same for every trial.
        assert r.data.tags["avlab.env.id"] == r.data.tags["avlab.env.history"] == environment.describe()["id"]
        assert r.data.tags["avlab.env.torch"] == metadata.version("torch")
    # Tune reused the first trials' processes for the last ones: nothing imported there again.
    assert sum(r.data.metrics["import_time_s"] == 0 and r.data.metrics["launch_time_s"] == 0 for r in children) >= 1

    report = json.loads(subprocess.run([AVLAB, "report", "mem", "--format", "json", "--home", str(home)],
                                       capture_output=True, text=True, check=True).stdout)
    assert [row["configuration"] for row in report["rows"]] == ["method.memory_size=10", "method.memory_size=100"]
    assert all(row["seeds"] == 2 and row["metrics"]["image_h_linear_acc"]["n"] == 2 for row in report["rows"])
    assert all(row["metrics"]["train_pairs_per_s"]["mean"] > 0 for row in report["rows"])
    assert "train_pairs_per_s" in out.stdout  # the cost column of the printed report
    assert (home / "reports" / "mem" / "report.png").stat().st_size > 1000
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id, "report")}
    assert {"report/report.md", "report/report.json", "report/report.png"} <= artifacts

    status = subprocess.run([AVLAB, "status", "mem", "--home", str(home)], capture_output=True, text=True, check=True)
    assert status.stdout.count("FINISHED") >= 4 and "best so far: method.memory_size=" in status.stdout


@pytest.mark.slow
def test_evaluate_a_finished_trial_again_and_with_other_settings(mem_sweep, capsys):
    """`avlab evaluate`: with the trial's own settings, its own numbers bit for bit; with others,
    a second nested run; settings outside data.* and eval.*, or a sweep's name, exit 2."""
    from mlflow.tracking import MlflowClient

    home = mem_sweep[0]
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("avlab-sweeps")
    trial = client.search_runs([exp.experiment_id], "tags.`avlab.kind` = 'trial'", max_results=1)[0]
    assert main(["evaluate", trial.info.run_id, "--home", str(home)]) == 0
    assert main(["evaluate", trial.info.run_name, "eval.knn_k=3", "--home", str(home)]) == 0
    assert "[avlab] evaluated " in capsys.readouterr().out
    nested = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{trial.info.run_id}'",
                                order_by=["attributes.start_time ASC"])
    assert [r.data.tags["avlab.kind"] for r in nested] == ["evaluation", "evaluation"]
    assert all(r.info.status == "FINISHED" and r.data.tags["avlab.evaluated_run"] == trial.info.run_id for r in nested)
    assert nested[0].data.tags["avlab.changed"] == "none" and nested[1].data.tags["avlab.changed"] == "eval.knn_k=3"
    assert "checkpoint_epoch00001" in nested[0].data.params["weights"]
    for metric in ("image_h_linear_acc", "sound_h_linear_acc", "image_h_knn_acc", "retrieval_s2i_rank1"):
        assert nested[0].data.metrics[metric] == trial.data.metrics[metric], metric  # bit for bit
    assert nested[1].data.params["eval.knn_k"] == "3"

    assert main(["evaluate", trial.info.run_id, "train.epochs=3", "--home", str(home)]) == 2
    assert "train.epochs: an evaluation takes data.* and eval.* settings only" in capsys.readouterr().err
    assert main(["evaluate", "mem", "--home", str(home)]) == 2
    assert "is a sweep; evaluate one of its trials" in capsys.readouterr().err


@pytest.mark.slow
def test_export_best_trial_registers_and_reloads_bit_for_bit(mem_sweep, tmp_path, capsys):
    """Every trial logged its encoders and its system metrics, and no MLflow model (they are left
    to the export); `avlab export mem --best` copies the best trial's encoders, makes and registers
    its two MLflow models, and both ways of loading them give the features of the trial's own final
    checkpoint, bit for bit (the MLflow pt2 model: to float tolerance)."""
    import mlflow.pyfunc
    from mlflow.tracking import MlflowClient

    from methods.export import load_encoders
    from methods.registry import build_method
    from orchestrator import checkpoint
    from orchestrator.config import ExperimentConfig
    from orchestrator.export import load_registered

    home = mem_sweep[0]
    uri = f"sqlite:///{home / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("avlab-sweeps")
    trials = client.search_runs([exp.experiment_id], "tags.`avlab.kind` = 'trial'")
    from orchestrator.export import has_models

    for run in trials:
        logged = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert "encoders" in logged and run.data.metrics["export_time_s"] > 0
        assert not has_models(client, run.info.run_id)
    best = max(trials, key=lambda r: r.data.metrics["image_h_linear_acc"])

    out = tmp_path / "exported"
    assert main(["export", "mem", "--best", "--out", str(out), "--home", str(home)]) == 0
    folder = out / best.info.run_name.replace("/", "_")
    assert capsys.readouterr().out.strip() == str(folder)
    assert main(["export", "mem", "--out", str(out), "--home", str(home)]) == 0  # every trial; the best again
    assert len(list(out.iterdir())) == 4
    (tmp_path / "a-file").write_text("x")
    assert main(["export", "mem", "--out", str(tmp_path / "a-file"), "--home", str(home)]) == 2
    assert "--out: " in capsys.readouterr().err

    # The trial's own encoders: its last checkpoint (weights only), built again.
    states = [checkpoint.load(p.parent) for p in home.rglob("checkpoint.pt")]
    state = max((s for s in states if s["mlflow_run_id"] == best.info.run_id), key=lambda s: s["epoch"])
    cfg = ExperimentConfig.from_dict(load_encoders(folder).meta["config"])
    from methods.data.pools import DataInfo

    method = build_method(cfg.method_name, cfg.method, DataInfo(image_size=cfg.data.image_size, n_mels=cfg.data.n_mels,
                                                                n_frames=cfg.data.n_frames))
    method.load_state_dict(state["model"])
    method.eval()
    torch.manual_seed(0)
    images, sounds = torch.rand(5, 3, 32, 32), torch.randn(5, 1, cfg.data.n_mels, cfg.data.n_frames)
    with torch.no_grad():
        own = method.E_v(images), method.E_s(sounds)
        for enc in (load_encoders(folder), load_registered(uri, "mem")):
            assert torch.equal(enc.image(images), own[0]) and torch.equal(enc.sound(sounds), own[1])

    # MLflow's system metrics, one monitor per node, and the trial's use of its CPU.
    for run in trials:
        cpu = client.get_metric_history(run.info.run_id, "system/node0/cpu_utilization_percentage")
        assert len(cpu) >= 1 and all(0 <= m.value <= 100 for m in cpu)
        assert "system/node0/system_memory_usage_megabytes" in run.data.metrics
        assert run.data.metrics["train_cpu_pct"] > 0
    report = json.loads(subprocess.run([AVLAB, "report", "mem", "--format", "json", "--home", str(home)],
                                       capture_output=True, text=True, check=True).stdout)
    assert all(row["metrics"]["train_cpu_pct"]["mean"] > 0 for row in report["rows"])

    version = client.get_model_version_by_alias("mem.image_encoder", "best")
    assert version.run_id == best.info.run_id
    mlflow.set_tracking_uri(uri)
    try:
        predicted = mlflow.pyfunc.load_model("models:/mem.sound_encoder@best").predict(sounds.numpy())
    finally:
        mlflow.set_tracking_uri(None)
    assert predicted.shape == tuple(own[1].shape)
    assert torch.allclose(torch.from_numpy(predicted), own[1], atol=1e-5)


@pytest.mark.slow
def test_a_trial_and_a_run_of_one_configuration_measure_the_same(tmp_path, mem_sweep):
    """One training loop for both launchers: ``avlab run`` (a Ray Train ``TorchTrainer`` with one
    worker) of a sweep trial's configuration logs the same losses and downstream metrics as the
    trial, which trained in its own Tune trial process."""
    home = tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run([AVLAB, "run", "--preset", "tiny", "--home", str(home), "tracking.run_name=same",
                          "method.memory_size=10", "seed=1", *MEM_RUN], capture_output=True, text=True, env=env,
                         timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("avlab").experiment_id])
    trial = trial_runs(mem_sweep[0], "mem")[("method.memory_size=10", "1")]
    assert trial.data.tags["avlab.launcher"] == "trial"

    def config(r):  # the whole resolved config but the run's name
        return {k: v for k, v in r.data.params.items() if k != "tracking.run_name" and not k.startswith("varied.")}

    assert config(run) == config(trial)
    assert measured(run) == measured(trial)
    trial_client = MlflowClient(f"sqlite:///{mem_sweep[0] / 'mlflow.db'}")
    for key in ("loss", "loss_pair"):
        assert [m.value for m in client.get_metric_history(run.info.run_id, key)] == [
            m.value for m in trial_client.get_metric_history(trial.info.run_id, key)], key


@pytest.mark.slow
def test_reuse_trials_takes_identical_finished_trials_and_trains_the_rest(tmp_path, mem_sweep, capsys):
    """`avlab sweep --reuse-trials` in a copy of the module sweep's store: the trials whose config
    and seed equal a finished trial of `mem` take its every metric, step by step, without training
    (no checkpoint), tagged with the run that holds the weights, which `avlab export` and
    `avlab evaluate` then use; a seed that `mem` never ran trains. With a scheduler: exit 2."""
    import shutil

    from mlflow.tracking import MlflowClient

    home = tmp_path / "runs"
    shutil.copytree(mem_sweep[0], home, ignore=shutil.ignore_patterns("reports"))
    space = tmp_path / "again.yaml"
    space.write_text(MEM_SPACE.replace("[10, 100]", "[10]").replace("seeds: 2", "seeds: 3"))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run([AVLAB, "sweep", str(space), "--name", "again", "--reuse-trials", "--home", str(home),
                          *MEM_RUN], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert out.stdout.count("not trained again") == 2 and out.stdout.count("; the same code)") == 2, out.stdout[-4000:]
    assert "2 of 3 trials took the results of identical finished trials" in out.stdout

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    runs, donors = trial_runs(home, "again"), trial_runs(home, "mem")
    assert sorted(runs) == [("method.memory_size=10", s) for s in ("0", "1", "2")]
    for seed in ("0", "1"):
        run, donor = runs[("method.memory_size=10", seed)], donors[("method.memory_size=10", seed)]
        assert run.info.status == "FINISHED" and run.data.tags["avlab.reused_from"] == donor.info.run_id
        assert run.data.tags["avlab.launcher"] == "reused" and run.data.tags["avlab.reused_from_sweep"] == "mem"
        # The numbers are the donor's, made by the donor's code.
        assert run.data.tags["avlab.source_hash"] == donor.data.tags["avlab.source_hash"]
        assert measured(run) == measured(donor) and run.data.metrics == donor.data.metrics
        for key in ("loss", "image_h_knn_acc"):
            assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)] == [
                (m.step, m.value) for m in client.get_metric_history(donor.info.run_id, key)], key
        assert not (home / "ray" / "trials" / f"again-{run.info.run_id}").exists()  # never trained
    trained = runs[("method.memory_size=10", "2")]
    assert "avlab.reused_from" not in trained.data.tags and trained.data.tags["avlab.launcher"] == "trial"
    assert any((home / "ray" / "trials" / f"again-{trained.info.run_id}").glob("checkpoint_epoch*"))

    assert main(["status", "again", "--home", str(home)]) == 0
    assert capsys.readouterr().out.count("(reused: mem)") == 2
    reused = runs[("method.memory_size=10", "0")]
    assert main(["export", reused.info.run_id, "--out", str(tmp_path / "out"), "--home", str(home)]) == 0
    folder = Path(capsys.readouterr().out.strip())
    source = client.download_artifacts(reused.data.tags["avlab.reused_from"], "encoders", str(tmp_path / "src"))
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in Path(source).iterdir())
    assert main(["evaluate", reused.info.run_id, "--home", str(home)]) == 0  # from the source's checkpoint
    assert "evaluated " in capsys.readouterr().out

    asha = tmp_path / "asha.yaml"
    asha.write_text("base:\n  preset: tiny\n  config:\n    eval: {every_epochs: 1}\n"
                    "grid:\n  method.memory_size: [10]\nscheduler: {type: asha}\n")
    assert main(["sweep", str(asha), "--reuse-trials", "--home", str(tmp_path / "other")]) == 2
    assert "--reuse-trials: not with a scheduler" in capsys.readouterr().err


def test_mean_ci95_closed_form():
    from orchestrator.report import mean_ci95

    mean, ci = mean_ci95([1.0, 2.0, 3.0])  # sd 1, sem 1/sqrt(3), t_{0.975, 2} = 4.3027
    assert mean == 2.0 and ci == pytest.approx(4.302653 / 3**0.5, rel=1e-5)
    assert mean_ci95([0.7]) == (0.7, 0.0)


@pytest.mark.slow
def test_a_single_worker_trial_whose_process_is_killed_is_restarted_and_ends_identical(tmp_path, mem_sweep):
    """SIGKILL of a single-worker trial's process mid-training, as the OOM killer or a lost spot
    node does: Tune starts the trial again, it continues from its own last checkpoint, and the
    sweep ends exactly as the uninterrupted one, one MLflow run per trial, no repeated step."""
    import faults

    space = tmp_path / "mem.yaml"
    space.write_text(MEM_SPACE.replace("max_concurrent: 2", "max_concurrent: 1"))  # one trial process
    home, log = tmp_path / "runs", tmp_path / "sweep.log"
    proc = faults.start(["sweep", str(space), "--name", "kt", "--home", str(home), *MEM_RUN], log, tmp_path)
    trials = home / "ray" / "trials"

    def midway() -> bool:
        if not (home / "jobs" / "kt.json").exists():
            return False
        return any(r.info.status == "RUNNING" and (trials / f"kt-{r.info.run_id}" / "checkpoint_epoch00000").exists()
                   for r in trial_runs(home, "kt").values())

    # The trial trains in its actor's process: no Ray Train controller or worker exists.
    code, text = kill_the_trial_actor(proc, log, midway, without=("ray::RayTrainWorker", "ray::TrainController"))
    assert code == 0 and "resumed from" in text, text[-4000:]
    runs, reference = trial_runs(home, "kt"), trial_runs(mem_sweep[0], "mem")
    assert runs.keys() == reference.keys()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    for key, run in runs.items():
        assert run.info.status == "FINISHED", key
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss_pair")] == [0, 1], key
        assert measured(run) == measured(reference[key]), key


@pytest.mark.slow
def test_resume_of_a_finished_sweep_says_so_and_changes_nothing(mem_sweep):
    home, _ = mem_sweep
    before = {k: (r.info.status, r.info.end_time, r.data.metrics) for k, r in trial_runs(home, "mem").items()}
    files = {p: p.stat().st_mtime_ns for p in (home / "ray").rglob("*")}
    out = subprocess.run([AVLAB, "resume", "mem", "--home", str(home)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "sweep mem already finished" in out.stdout, out.stderr
    after = {k: (r.info.status, r.info.end_time, r.data.metrics) for k, r in trial_runs(home, "mem").items()}
    assert after == before
    assert {p: p.stat().st_mtime_ns for p in (home / "ray").rglob("*")} == files


@pytest.mark.slow
def test_sweep_stopped_by_ctrl_c_then_by_a_lost_node_resumes_and_finishes_every_trial_once(tmp_path, mem_sweep):
    """Stop the sweep twice; each time ``avlab resume`` runs only what is left, and the sweep ends
    exactly as the uninterrupted one did:

    1. once one trial has finished and another is part-way through, Ctrl-C (SIGINT to the
       driver): one line, exit 130, the sweep KILLED (not FINISHED), every child run settled;
    2. once the resumed sweep trains again, its node is lost: SIGKILL of the driver with its
       local Ray head and trial workers, nothing settled."""
    import faults

    space = tmp_path / "mem.yaml"
    space.write_text(MEM_SPACE)
    home, log = tmp_path / "runs", tmp_path / "sweep.log"
    proc = faults.start(["sweep", str(space), "--name", "cut", "--home", str(home), *MEM_RUN], log, tmp_path)
    trials = home / "ray" / "trials"

    def one_done_one_midway() -> bool:
        if not (home / "jobs" / "cut.json").exists():  # written once the MLflow store is set up
            return False
        runs = trial_runs(home, "cut")
        done = [r for r in runs.values() if r.info.status == "FINISHED"]
        midway = [r for r in runs.values() if r.info.status == "RUNNING"
                  and (trials / f"cut-{r.info.run_id}" / "checkpoint_epoch00000").exists()]
        return bool(done and midway)

    def finished() -> dict:
        return {k: (r.info.end_time, r.data.metrics) for k, r in trial_runs(home, "cut").items()
                if r.info.status == "FINISHED"}

    # 1. Ctrl-C.
    faults.wait_for(one_done_one_midway, timeout=600, what="a finished and a part-way trial", proc=proc, log=log)
    os.kill(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=300) == 130, log.read_text()[-3000:]
    ours = [line for line in log.read_text().splitlines() if line.startswith("avlab:")]
    assert len(ours) == 1 and ours[0].startswith("avlab: sweep cut interrupted with "), ours
    assert ours[0].endswith("trials ended; `avlab resume cut` continues it"), ours
    assert "[avlab] sweep cut finished" not in log.read_text()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    parent = client.search_runs([client.get_experiment_by_name("avlab-sweeps").experiment_id],
                                "tags.`avlab.kind` = 'sweep'")[0]
    assert parent.info.status == "KILLED"
    # Every child run settled: FINISHED (the part-way trial may finish while Tune stops) or
    # KILLED, none left RUNNING, none FAILED.
    statuses = sorted(r.info.status for r in trial_runs(home, "cut").values())
    assert "FINISHED" in statuses and set(statuses) <= {"FINISHED", "KILLED"}, statuses
    faults.kill_node(proc)  # whatever Ray left behind

    done_first = finished()
    assert done_first and len(done_first) < 4

    # 2. The resumed sweep loses its node once it trains again.
    again = tmp_path / "resume.log"
    proc = faults.start(["resume", "cut", "--home", str(home)], again, tmp_path)
    faults.wait_for(lambda: "[avlab] epoch " in again.read_text(), timeout=600, what="the resumed sweep to train",
                    proc=proc, log=again)
    faults.kill_node(proc)
    done_second = finished()
    assert all(done_second[k] == v for k, v in done_first.items())  # not run again

    out = faults.run(["resume", "cut", "--home", str(home)], cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    resumed, reference = trial_runs(home, "cut"), trial_runs(mem_sweep[0], "mem")
    assert resumed.keys() == reference.keys() and len(resumed) == 4
    for key, run in resumed.items():
        assert run.info.status == "FINISHED", key
        if key in done_second:  # not run again: untouched since it finished
            assert (run.info.end_time, run.data.metrics) == done_second[key], key
        assert measured(run) == measured(reference[key]), key  # identical to the uninterrupted sweep

    def report(home, name):
        return json.loads(subprocess.run([AVLAB, "report", name, "--format", "json", "--home", str(home)],
                                         capture_output=True, text=True, check=True).stdout)

    cut, whole = report(home, "cut"), report(mem_sweep[0], "mem")
    assert [r["configuration"] for r in cut["rows"]] == [r["configuration"] for r in whole["rows"]]
    assert [(r["seeds"], sorted(r["metrics"])) for r in cut["rows"]] == [
        (r["seeds"], sorted(r["metrics"])) for r in whole["rows"]]


def test_variant_trials_are_labelled_by_their_variant_then_the_grid():
    from orchestrator.search_space import point_label

    space = load_search_space(ROOT / "search_spaces" / "method_comparison.yaml")
    labels = [point_label(p, tuple(space.grid)) for p in space.grid_points()]
    assert labels == list(space.variants)  # bma, bma_pair_only, avid_cross, ...
    assert point_label({"variant": "a", "method.x": 1, "g": 2}, ("g",)) == "a,g=2"
    assert point_label({"method.memory_size": 10}) == "method.memory_size=10"


def test_a_single_worker_trial_holds_its_cpus_and_gpu_share_and_a_ddp_trial_only_drives(tmp_path):
    """What Tune reserves per trial: the training itself for a one-worker trial (its CPUs and GPU
    share, anywhere in the cluster), a head-node slot with no CPU for a multi-worker trial whose
    TorchTrainer workers hold the resources."""
    from orchestrator.sweep import trial_resources

    def bundles(text):
        path = tmp_path / "s.yaml"
        path.write_text(text)
        space = load_search_space(path)
        return [trial_resources(space, {"trial": i}).bundles for i in range(space.num_trials())]

    assert bundles("grid:\n  method.memory_size: [10]\nresources: {workers: 1, cpus_per_worker: 2}\n") == [
        [{"CPU": 2}]]
    # A share of a GPU (it passes the edge checks only on a machine that has a GPU).
    from orchestrator.config import ResourcesConfig
    from orchestrator.sweep import trial_bundles

    assert trial_bundles(ResourcesConfig(gpu=0.25)) == [{"CPU": 1, "GPU": 0.25}]
    assert trial_bundles(ResourcesConfig(gpu=True, cpus_per_worker=4)) == [{"CPU": 4, "GPU": 1.0}]
    (bundle,) = trial_bundles(ResourcesConfig(workers=2))
    assert bundle.get("CPU", 0) == 0 and "node:__internal_head__" in bundle


def test_a_grid_starts_its_longest_configurations_first():
    """Every seed of a configuration in a row, the longest configurations first (a random-init
    variant, which only evaluates, last), so short trials fill the slots at the end."""
    from ray.tune.search.variant_generator import generate_variants

    from orchestrator.search_space import trial_params

    space = load_search_space(ROOT / "search_spaces" / "demo_learning.yaml")
    order = [trial_params(space, v) for _, v in generate_variants(_param_space(space))]
    order = [(params["variant"], seed) for params, seed in order]
    assert order == [("l_pair", 0), ("l_pair", 1), ("l_pair", 2), ("l_pair", 3),
                     ("random_init", 0), ("random_init", 1), ("random_init", 2), ("random_init", 3)]
    # A sweep started before this order (one Tune dimension per index) still resolves its trials.
    assert trial_params(space, {"point": 0, "seed": 2}) == (space.grid_points()[0], 2)


def test_a_restored_sweep_runs_each_trial_with_its_own_configuration_whatever_the_key_order(tmp_path):
    """A resumed sweep rebuilds its space from the job file. Each Tune trial carries its
    configuration's label and seed, so even a space whose variants or grid keys come back in
    another order (job files were once written with sorted keys) gives every trial the
    configuration it started with; an index into the grid's order would name another one."""
    import json

    from ray.tune.search.variant_generator import generate_variants

    from orchestrator import jobs
    from orchestrator.search_space import SearchSpace
    from orchestrator.search_space import trial_params

    path = tmp_path / "s.yaml"
    path.write_text("base:\n  preset: tiny\nvariants:\n  zeta: {method.memory_size: 30}\n  alpha: {method.memory_size: 10}\n"
                    "  mid: {method.memory_size: 20}\ngrid:\n  method.loss_temperature: [0.2, 0.1]\nseeds: 2\n")
    space = load_search_space(path)
    configs = [v for _, v in generate_variants(_param_space(space))]
    started = [trial_params(space, c) for c in configs]
    assert len({json.dumps(p, sort_keys=True) + str(s) for p, s in started}) == space.num_trials() == 12
    sorted_back = SearchSpace.from_dict(json.loads(json.dumps(space.to_dict(), sort_keys=True)))
    assert list(sorted_back.variants) == ["alpha", "mid", "zeta"]  # what an old job file gave back
    jobs.write(tmp_path, jobs.JobRecord(kind="sweep", name="s", space=space.to_dict(), tracking_uri="sqlite:///x.db",
                                        run_id="0" * 32))
    kept = SearchSpace.from_dict(jobs.read(tmp_path, "s").space)
    assert list(kept.variants) == ["zeta", "alpha", "mid"]  # job files now keep the order
    for restored in (sorted_back, kept):
        assert [trial_params(restored, c) for c in configs] == started
