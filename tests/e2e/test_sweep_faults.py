"""Sweeps that are stopped, killed, restarted or diverge: each test runs a sweep of its own (none
shares test_sweep.py's module sweep), so this file runs beside it on another test worker."""

import json
import os
import re
import subprocess

import pytest

from orchestrator.search_space import load_search_space
from orchestrator.sweep import _param_space, build_searcher

from conftest import AVLAB, TINY_RUN
from sweeps import MEM_RUN, MEM_SPACE, kill_the_trial_actor, trial_runs

SMALL = TINY_RUN


@pytest.mark.slow
def test_optuna_asha_sweep_settles_every_trial_run(tmp_path):
    """Optuna proposals with ASHA on the kNN accuracy measured each epoch: every child run ends
    FINISHED (with its final evaluation) or KILLED and tagged as stopped early, and the report
    holds exactly the finished ones. One trial at a time on both CPUs: a trial stopped early
    must give its workers' CPUs back, or the next trial waits for them until the timeout; its
    actor runs the next trial."""
    space = tmp_path / "asha.yaml"
    space.write_text(
        "base:\n  preset: tiny\n  config:\n    eval: {every_epochs: 1, features: [h]}\n"
        "search:\n  method.loss_temperature: {type: loguniform, low: 0.02, high: 1.0}\n"
        "num_samples: 4\nseeds: 1\nmetric: image_h_linear_acc\n"
        "scheduler: {type: asha, metric: image_h_knn_acc, grace_period: 1, reduction_factor: 2}\n"
        "resources: {workers: 1, cpus_per_worker: 2}\nmax_concurrent: 1\n"
    )
    home = tmp_path / "runs"
    small = [o for o in SMALL if not o.startswith("train.epochs")] + ["train.epochs=3"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run([AVLAB, "sweep", str(space), "--name", "asha", "--home", str(home), *small],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    # The stopped trials' CPUs came back without Ray's dashboard (its state API): avlab's
    # placement-group cleaner asks the GCS, quietly.
    assert "Ray dashboard" not in out.stdout and "Failed to query" not in out.stdout + out.stderr

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("avlab-sweeps")
    children = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("avlab.kind") == "trial"]
    assert len(children) == 4
    finished = set()
    for r in children:
        if r.info.status == "FINISHED":
            assert "eval_time_s" in r.data.metrics and "image_h_linear_acc" in r.data.metrics
            finished.add(r.data.tags["avlab.config_label"])
        else:
            assert r.info.status == "KILLED" and r.data.tags.get("avlab.stopped_early") == "true"
            assert "eval_time_s" not in r.data.metrics
    assert finished  # the first trial at every rung is never stopped
    # One-worker trials under a scheduler reuse their actor, after a trial it stopped too: every
    # trial trained in the first one's process (Tune waits for a stopped trial to close its run).
    pids = set(re.findall(r"\(run_trial pid=(\d+)\)", out.stdout + out.stderr))
    assert len(pids) == 1, pids
    report = json.loads(subprocess.run([AVLAB, "report", "asha", "--format", "json", "--home", str(home)],
                                       capture_output=True, text=True, check=True).stdout)
    assert {row["configuration"] for row in report["rows"]} == finished


@pytest.mark.slow
def test_a_ddp_trial_whose_actor_is_killed_gives_its_workers_back_and_is_restarted(tmp_path):
    """SIGKILL of a two-worker trial's actor mid-training: its TorchTrainer controller dies with
    it, and the placement group that holds its workers' CPUs must be removed, or the restarted
    trial, which needs the same two CPUs, waits for them forever. Tune restarts the trial, whose
    new TorchTrainer continues from the checkpoint, and it finishes."""
    import faults

    space = tmp_path / "two.yaml"
    space.write_text(
        "base:\n  preset: tiny\ngrid:\n  method.memory_size: [10]\nseeds: 1\n"
        "metric: image_h_linear_acc\nmode: max\nresources: {workers: 2, cpus_per_worker: 1}\nmax_concurrent: 1\n"
    )
    home, log = tmp_path / "runs", tmp_path / "sweep.log"
    proc = faults.start(["sweep", str(space), "--name", "oom", "--home", str(home), *MEM_RUN], log, tmp_path)
    trials = home / "ray" / "trials"

    def registered() -> bool:  # Ray Train has registered the first checkpoint (what a restart resumes from)
        return any("checkpoint_epoch00000" in p.read_text()
                   for p in trials.glob("oom-*/checkpoint_manager_snapshot.json"))

    code, text = kill_the_trial_actor(proc, log, registered)
    assert code == 0, text[-4000:]
    runs = trial_runs(home, "oom")
    assert [r.info.status for r in runs.values()] == ["FINISHED"]
    assert "resumed from" in text and "[avlab] sweep oom finished" in text
    assert "is dead. Cleaning up placement group" in text  # what freed the CPUs: avlab's cleaner, via the GCS
    assert "Failed to query" not in text and "multiple active Ray instances" not in text


@pytest.mark.slow
def test_avlab_stop_then_resume_finishes_the_sweep_with_one_child_run_per_trial(tmp_path):
    """`avlab stop NAME` from another process while a trial trains: the driver ends as after
    Ctrl-C (exit 130, one line), the sweep is KILLED with no run left RUNNING, a second stop
    says it is not running, and `avlab resume` finishes it with one child run per trial."""
    import faults

    space = tmp_path / "stop.yaml"
    space.write_text(MEM_SPACE.replace("seeds: 2", "seeds: 1").replace("max_concurrent: 2", "max_concurrent: 1"))
    home, log = tmp_path / "runs", tmp_path / "sweep.log"
    run = [o for o in MEM_RUN if not o.startswith("train.epochs")] + ["train.epochs=6"]
    proc = faults.start(["sweep", str(space), "--name", "halt", "--home", str(home), *run], log, tmp_path)

    def training() -> bool:
        if not (home / "jobs" / "halt.json").exists():
            return False
        return any(r.info.status == "RUNNING" and any((home / "ray" / "trials" / f"halt-{r.info.run_id}").glob("checkpoint_epoch*"))
                   for r in trial_runs(home, "halt").values())

    faults.wait_for(training, timeout=600, what="a trial past its first epoch", proc=proc, log=log)
    out = faults.run(["stop", "halt", "--home", str(home)], cwd=tmp_path)
    assert out.returncode == 0 and "[avlab] sweep halt stopped with " in out.stdout, out.stdout + out.stderr
    assert proc.wait(timeout=60) == 130, log.read_text()[-3000:]
    ours = [line for line in log.read_text().splitlines() if line.startswith("avlab:")]
    assert len(ours) == 1 and ours[0].startswith("avlab: sweep halt interrupted with "), ours
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    parent = client.search_runs([client.get_experiment_by_name("avlab-sweeps").experiment_id],
                                "tags.`avlab.kind` = 'sweep'")[0]
    assert parent.info.status == "KILLED"
    assert {r.info.status for r in trial_runs(home, "halt").values()} <= {"FINISHED", "KILLED"}
    faults.kill_node(proc)  # whatever Ray left behind
    out = faults.run(["stop", "halt", "--home", str(home)], cwd=tmp_path)
    assert out.returncode == 0 and "[avlab] sweep halt was not running" in out.stdout, out.stdout + out.stderr

    out = faults.run(["resume", "halt", "--home", str(home)], cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    runs = trial_runs(home, "halt")  # asserts one child run per trial
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs.values())
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_optuna_sweep_driver_sigkill_then_resume_keeps_trial_ids_and_proposals(tmp_path):
    """A two-objective Optuna search through a lost driver: the study comes back from the
    experiment folder, trials keep their ids (no KeyError in the restored searcher), the
    proposals are the ones the seeded sampler makes without interruption, and the report's
    Pareto front is the non-dominated set, as a brute-force check and Optuna's own study (kept in
    <home>/optuna.db) say."""
    import faults

    space_file = tmp_path / "opt.yaml"
    space_file.write_text(
        "base:\n  preset: tiny\nsearch:\n  method.loss_temperature: {type: loguniform, low: 0.02, high: 1.0}\n"
        "num_samples: 3\nseeds: 1\nmetrics: {image_h_linear_acc: max, train_time_s: min}\n"
        "resources: {workers: 1, cpus_per_worker: 1}\nmax_concurrent: 1\n"
    )
    home, log = tmp_path / "runs", tmp_path / "sweep.log"
    proc = faults.start(["sweep", str(space_file), "--name", "opt", "--home", str(home), *MEM_RUN], log, tmp_path)

    def one_done_one_midway() -> bool:
        if not (home / "jobs" / "opt.json").exists():
            return False
        runs = trial_runs(home, "opt").values()
        return any(r.info.status == "FINISHED" for r in runs) and any(
            r.info.status == "RUNNING" and (home / "ray" / "trials" / f"opt-{r.info.run_id}" / "checkpoint_epoch00000").exists()
            for r in runs)

    faults.wait_for(one_done_one_midway, timeout=600, what="a finished and a part-way trial", proc=proc, log=log)
    faults.kill_node(proc)
    before = {r.info.run_id: (r.data.tags["avlab.trial_id"], r.info.status) for r in trial_runs(home, "opt").values()}

    out = faults.run(["resume", "opt", "--home", str(home)], cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    runs = list(trial_runs(home, "opt").values())
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
    after = {r.info.run_id: r.data.tags["avlab.trial_id"] for r in runs}
    # Every run of the killed driver was continued, none duplicated (a proposal that Tune had not
    # recorded before the kill came again under a new trial id and took over its run); the
    # finished trials kept their ids.
    assert set(before) <= set(after)
    assert all(after[run] == trial for run, (trial, status) in before.items() if status == "FINISHED")

    space = load_search_space(space_file)
    searcher = build_searcher(space)
    searcher.set_search_properties(None, None, _param_space(space))  # the searcher has both metrics
    # It chooses, so it reads the probe on the validation split (a cost is the same on every split).
    assert searcher.metric == ["val_image_h_linear_acc", "train_time_s"] and searcher.mode == ["max", "min"]
    expected = sorted(searcher.suggest(f"t{i}")["method.loss_temperature"] for i in range(3))
    got = sorted(float(r.data.params["varied.method.loss_temperature"]) for r in runs)
    assert got == pytest.approx(expected, rel=1e-12)

    report = json.loads(subprocess.run([AVLAB, "report", "opt", "--format", "json", "--home", str(home)],
                                       capture_output=True, text=True, check=True).stdout)
    assert report["objectives"] == [{"metric": "image_h_linear_acc", "mode": "max"}, {"metric": "train_time_s", "mode": "min"}]
    points = {r["configuration"]: (r["metrics"]["image_h_linear_acc"]["mean"], r["metrics"]["train_time_s"]["mean"])
              for r in report["rows"]}
    brute = {a for a, (acc, t) in points.items()
             if not any(acc2 >= acc and t2 <= t and (acc2, t2) != (acc, t) for acc2, t2 in points.values())}
    assert len(points) == 3 and set(report["pareto"]) == brute and brute
    assert (home / "reports" / "opt" / "report.png").stat().st_size > 1000

    import optuna

    from orchestrator.optuna_store import storage_url

    # The study holds what the search read: the validation split's accuracy and the cost.
    study = optuna.load_study(study_name="opt", storage=storage_url(home))
    assert len(study.trials) == 3 and study.metric_names == ["val_image_h_linear_acc", "train_time_s"]
    read = {r.info.run_id: (r.data.metrics["val_image_h_linear_acc"], r.data.metrics["train_time_s"]) for r in runs}
    front = {a for a, (acc, t) in read.items()
             if not any(acc2 >= acc and t2 <= t and (acc2, t2) != (acc, t) for acc2, t2 in read.values())}
    assert {t.user_attrs["mlflow_run_id"] for t in study.best_trials} == front


@pytest.mark.slow
def test_a_trial_that_diverges_fails_once_and_the_others_finish(tmp_path):
    """A deterministic error in a single-worker trial (its loss diverges) ends that trial at its
    first attempt, FAILED with the line in ``avlab.failed``: Tune does not restart it, although it
    restarts trials whatever their error. The other trial finishes; the sweep exits 1 naming it."""
    space = tmp_path / "lr.yaml"
    space.write_text(
        "base:\n  preset: tiny\n  config:\n    optim: {name: sgd}\ngrid:\n  optim.lr: [0.01, 1.0e+30]\nseeds: 1\n"
        "metric: image_h_linear_acc\nmode: max\nresources: {workers: 1, cpus_per_worker: 1}\nmax_concurrent: 2\n"
    )
    home = tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run([AVLAB, "sweep", str(space), "--name", "lr", "--home", str(home), *MEM_RUN],
                         capture_output=True, text=True, env=env, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-4000:]
    # One line of avlab's own (Ray may still forward a trial's log lines after it).
    ours = [line for line in out.stderr.splitlines() if line.startswith("avlab:")]
    assert len(ours) == 1, ours
    assert ours[0].startswith("avlab: sweep lr: 1 of 2 trials failed; first: trial ") and (
        "NonFiniteLoss: the training loss is nan in epoch 0" in ours[0]), ours
    runs = trial_runs(home, "lr")
    by_lr = {r.data.params["optim.lr"]: r for r in runs.values()}
    assert by_lr["0.01"].info.status == "FINISHED"
    failed = by_lr["1e+30"]
    assert failed.info.status == "FAILED" and failed.data.tags["avlab.failed"].startswith("NonFiniteLoss")
    assert "|" not in failed.data.tags["avlab.node_history"]  # one attempt: not restarted
    assert "resumed from" not in text


@pytest.mark.slow
def test_a_sweep_whose_ray_node_is_declared_dead_ends_with_one_line_and_resumes(tmp_path):
    """A raylet starved past the GCS's health checks (stopped here with SIGSTOP, as a machine too
    busy to run it leaves it) gets its node marked dead; Tune then waits for ever for resources
    that no node has (a sweep once hung like that for hours, nothing running, nothing said). The
    driver sees its node lost: one line, exit 1, its runs settled, its Ray stopped; `avlab
    resume` finishes the sweep."""
    import signal

    import faults

    space = tmp_path / "one.yaml"
    space.write_text("base:\n  preset: tiny\ngrid:\n  method.memory_size: [10]\nseeds: 1\n"
                     "metric: image_h_linear_acc\nmode: max\nresources: {workers: 1, cpus_per_worker: 1}\n"
                     "max_concurrent: 1\n")
    home, log = tmp_path / "runs", tmp_path / "sweep.log"
    run = [o for o in MEM_RUN if not o.startswith(("train.epochs", "data.paired_size"))] + [
        "train.epochs=3", "data.paired_size=1024"]  # epochs of several seconds
    # Health checks every 0.5 s: the node is dead after 3 missed ones (avlab's own Ray waits 5 min).
    quick = {"RAY_health_check_period_ms": "500", "RAY_health_check_timeout_ms": "500",
             "RAY_health_check_failure_threshold": "3"}
    proc = faults.start(["sweep", str(space), "--name", "starved", "--home", str(home), *run], log, tmp_path, quick)
    raylet = None
    try:
        faults.wait_for(lambda: any((home / "ray" / "trials").glob("starved-*/checkpoint_epoch00000/checkpoint.json")),
                        timeout=300, what="the first epoch's checkpoint", proc=proc, log=log)
        (raylet,) = [pid for pid, cmd in faults.processes(proc.pid).items() if "/raylet/raylet " in cmd]
        os.kill(raylet, signal.SIGSTOP)
        assert proc.wait(timeout=120) == 1, log.read_text()[-3000:]
    finally:
        if raylet is not None:
            try:
                os.kill(raylet, signal.SIGCONT)
            except ProcessLookupError:
                pass
        faults.kill_node(proc)
    ours = [line for line in log.read_text().splitlines() if line.startswith("avlab:")]
    assert len(ours) == 1 and ours[0].startswith("avlab: Ray stopped under sweep starved (its Ray node is lost: "), ours
    assert ours[0].endswith("`avlab resume starved` continues it from its last checkpoint"), ours
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("avlab-sweeps")
    statuses = {r.data.tags.get("avlab.kind"): r.info.status for r in client.search_runs([exp.experiment_id])}
    # Settled as when Ray raises in the driver: the sweep FAILED, its unfinished trial KILLED.
    assert statuses == {"sweep": "FAILED", "trial": "KILLED"}, statuses

    out = faults.run(["resume", "starved", "--home", str(home)], cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "resumed from" in out.stdout + out.stderr
    (trial,) = trial_runs(home, "starved").values()
    assert trial.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(trial.info.run_id, "loss")] == [0, 1, 2]  # each epoch once


@pytest.mark.slow
def test_a_failed_trial_trains_again_with_retry_failed_once_its_cause_is_fixed(tmp_path, capsys):
    """A bug that ends one trial at the end of its training (here one put into a copy of the
    project's encoder export, as the concatenated Multi-SSL runs once failed) fails that trial for
    good; the sweep's line says how to retry. With the bug fixed, `avlab resume --retry-failed`
    trains that trial again from its last checkpoint (its epochs are not trained twice) and the
    sweep finishes; the finished trial is not touched, and the failure stays on record."""
    import shutil

    from conftest import ROOT

    project = tmp_path / "project"
    for folder in ("methods", "orchestrator"):
        shutil.copytree(ROOT / folder, project / folder, ignore=shutil.ignore_patterns("__pycache__"))
    export = project / "orchestrator" / "export.py"
    anchor = "    from methods.export import exportable, save_encoders\n"
    text = export.read_text()
    assert anchor in text
    export.write_text(text.replace(anchor, anchor + "    if cfg.method.memory_size == 10:\n"
                                   "        raise AttributeError('injected: no export at memory 10')\n", 1))
    space = tmp_path / "fix.yaml"
    space.write_text("base:\n  preset: tiny\ngrid:\n  method.memory_size: [10, 100]\nseeds: 1\n"
                     "metric: image_h_linear_acc\nmode: max\nresources: {workers: 1, cpus_per_worker: 1}\n"
                     "max_concurrent: 2\n")
    home = tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(PYTHONPATH=str(project), PYTHONUNBUFFERED="1")

    def avlab(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([AVLAB, *args, "--home", str(home)], cwd=project, env=env, capture_output=True,
                              text=True, timeout=600)

    def read(*args: str) -> str:  # status and report read the store: in this process
        from orchestrator.cli import main

        capsys.readouterr()
        assert main([*args, "--home", str(home)]) == 0
        return capsys.readouterr().out

    out = avlab("sweep", str(space), "--name", "fix", *SMALL)
    assert out.returncode == 1, (out.stdout + out.stderr)[-4000:]
    last = out.stderr.strip().splitlines()[-1]
    assert "injected: no export at memory 10" in last and "`avlab resume fix --retry-failed`" in last, last
    before = trial_runs(home, "fix")
    failed, done = before[("method.memory_size=10", "0")], before[("method.memory_size=100", "0")]
    assert failed.info.status == "FAILED" and done.info.status == "FINISHED"
    status = read("status", "fix").splitlines()
    assert any(line.split()[:2] == ["FAILED", "method.memory_size=10"] and "failed: AttributeError: injected" in line
               for line in status), status
    assert status[-1] == "1 failed; once the cause is fixed, `avlab resume fix --retry-failed` trains it again"

    shutil.copy(ROOT / "orchestrator" / "export.py", export)  # the fix
    out = avlab("resume", "fix", "--retry-failed")
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "retrying 1 failed trial from its last checkpoint" in out.stdout
    after = trial_runs(home, "fix")
    again, same = after[("method.memory_size=10", "0")], after[("method.memory_size=100", "0")]
    assert again.info.run_id == failed.info.run_id and again.info.status == "FINISHED"
    assert "avlab.failed" not in again.data.tags and "avlab.retry_pending" not in again.data.tags
    assert again.data.tags["avlab.retried_failure"].startswith("AttributeError: injected") and (
        again.data.tags["avlab.retries"] == "1")
    assert "image_h_linear_acc" in again.data.metrics and "eval_time_s" in again.data.metrics
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    assert len(client.get_metric_history(again.info.run_id, "epoch_time_s")) == 1  # its one epoch, once
    assert (same.info.end_time, same.data.metrics) == (done.info.end_time, done.data.metrics)
    status = read("status", "fix").splitlines()
    assert status[0].startswith("sweep fix: FINISHED") and "failed" not in status[-1]
    assert any("(retried after: AttributeError: injected" in line for line in status), status
    report = json.loads(read("report", "fix", "--format", "json"))
    assert {row["configuration"] for row in report["rows"]} == {"method.memory_size=10", "method.memory_size=100"}
    buggy, fixed = done.data.tags["avlab.source_hash"], again.data.tags["avlab.retried_source_hash"]
    assert buggy != fixed and report["code_versions"] == {buggy: 1, f"{buggy} then {fixed}": 1}


def test_a_retried_optuna_proposal_gets_back_the_values_and_config_of_its_run(tmp_path):
    """`--retry-failed` runs a failed Optuna proposal again outside the search: its Tune config is
    rebuilt from the run's logged values (strings in MLflow), typed by their dimension, so that
    the trial resolves to the config it had and finds its run by that config's identity."""
    from types import SimpleNamespace

    from orchestrator.retry import _proposal
    from orchestrator.search_space import trial_params

    path = tmp_path / "opt.yaml"
    path.write_text(
        "base:\n  preset: tiny\n"
        "search:\n  method.loss_temperature: {type: loguniform, low: 1.0e-5, high: 1.0}\n"
        "  method.memory_size: {type: int, low: 10, high: 100}\n"
        "  method.paired_loss: {type: choice, values: [true, false]}\n"
        "num_samples: 2\nseeds: 2\nmetric: image_h_linear_acc\n")
    space = load_search_space(path)
    proposed = {"method.loss_temperature": 1.2345e-05, "method.memory_size": 42, "method.paired_loss": False, "seed": 1}
    params, seed = trial_params(space, proposed)
    cfg = space.config_for(params, seed)
    run = SimpleNamespace(data=SimpleNamespace(  # what MLflow gives back of the trial's run
        params={f"varied.{k}": str(v) for k, v in params.items()},
        tags={"avlab.seed": str(seed), "avlab.run_identity": cfg.identity()}))
    again = {"retry": _proposal(space, run)}
    assert trial_params(space, again) == (params, seed)
    assert space.config_for(*trial_params(space, again)).identity() == run.data.tags["avlab.run_identity"]
