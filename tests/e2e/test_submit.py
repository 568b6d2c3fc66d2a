"""`avlab submit` / `avlab logs`: sweeps as Ray jobs on a running cluster.

Fast tests check the bad-input contract (exit 2, one line, nothing sent). The slow test starts a
two-node Ray cluster on this machine (two `ray start` processes, 1 CPU each, told apart by the
custom resources node_a / node_b), submits a 2-trial sweep through the Jobs API, checks that the
trials ran on both nodes, kills the second node mid-trial and checks that the sweep still finishes
on the first: Ray Train restarts the interrupted trial from its checkpoint (train.max_failures).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from orchestrator import submit
from orchestrator.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import faults  # noqa: E402
import postgres  # noqa: E402
from raycluster import MARK, LocalCluster, kill_marked, marked, tails, wait  # noqa: E402

from conftest import ROOT
BIN = Path(sys.executable).parent


class FakeDashboard:
    """A port that records every connection and closes it at once (a client that gets this far
    fails fast instead of waiting for an answer)."""

    def __init__(self):
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.address = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.contacts = 0
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.running:
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.contacts += 1
            conn.close()

    def __enter__(self) -> FakeDashboard:
        return self

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.sock.close()


@pytest.mark.parametrize(
    "text, message",
    [
        ("grid:\n  method.memmory_size: [10]\n", "method.memmory_size: unknown config key"),
        ("grid:\n  method.memory_size: [10]\nmetric: top1\n", "metric: unknown metric 'top1'"),
    ],
)
def test_bad_search_space_exits_2_before_contacting_the_cluster(tmp_path, capsys, text, message):
    space = tmp_path / "bad.yaml"
    space.write_text(text)
    home = tmp_path / "home"
    with FakeDashboard() as dashboard:
        assert main(["submit", str(space), "--address", dashboard.address, "--home", str(home)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert dashboard.contacts == 0 and not home.exists()


def test_bad_name_override_or_existing_submission_exits_2_before_contacting_the_cluster(tmp_path, capsys):
    space = tmp_path / "ok.yaml"
    space.write_text("grid:\n  method.memory_size: [10]\n")
    home = tmp_path / "home"
    submit.write_record(home, submit.SubmissionRecord("taken", address="http://127.0.0.1:1", job_id="raysubmit_x"))
    cases = [
        (["--name", "a/b"], "--name: 'a/b' is not a valid name"),
        (["method.memory_temperature=0"], "method.memory_temperature"),
        (["--max-concurrent", "0"], "--max-concurrent: must be >= 1"),
        (["--dry-run", "inf"], "--dry-run: seconds each trial holds its resources"),
        (["--name", "taken"], "--name: a run, sweep or submission named 'taken' already exists"),
    ]
    with FakeDashboard() as dashboard:
        for extra, message in cases:
            assert main(["submit", str(space), *extra, "--address", dashboard.address, "--home", str(home)]) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and message in err, err
    assert dashboard.contacts == 0


def test_logs_of_an_unknown_name_exits_2(tmp_path, capsys):
    assert main(["logs", "nothing-here", "--home", str(tmp_path / "home")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "NAME: no submitted sweep named 'nothing-here'" in err, err
    assert submit.job_status_lines(tmp_path / "home", "nothing-here") is None


def test_unreachable_cluster_is_one_line_and_exit_1(tmp_path, capsys):
    with FakeDashboard() as dashboard:  # hangs up on every request
        assert main(["logs", "raysubmit_x", "--address", dashboard.address, "--home", str(tmp_path)]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "cannot reach the Ray dashboard" in err, err
        submit.write_record(tmp_path, submit.SubmissionRecord("gone", address=dashboard.address, job_id="raysubmit_x"))
        lines = submit.job_status_lines(tmp_path, "gone")
    assert lines and "status unknown" in lines[0] and dashboard.contacts >= 2


def test_entrypoint_runs_the_sweep_on_the_cluster(tmp_path, monkeypatch):
    import dataclasses

    args = submit.Submission(search_space="search_spaces/memory_size_fig6.yaml", address="http://head:8265",
                             overrides=("train.epochs=1",), preset="tiny", max_concurrent=3)
    monkeypatch.delenv(submit.JOB_PYTHON_ENV, raising=False)
    command = submit.entrypoint(args, "search_spaces/memory_size_fig6.yaml", "fig6")
    # Without --home the cluster's AVLAB_HOME decides, and its absence stops the job at once.
    assert command.startswith('if [ -z "$AVLAB_HOME" ]; then')
    assert command.endswith("exec python -m orchestrator.cli sweep search_spaces/memory_size_fig6.yaml "
                            "train.epochs=1 --name fig6 --address auto --preset tiny --max-concurrent 3")
    monkeypatch.setenv(submit.JOB_PYTHON_ENV, "/opt/venv/bin/python")
    args = dataclasses.replace(args, home=str(tmp_path / "shared home"), tracking_uri="http://mlflow:5000")
    command = submit.entrypoint(args, "submitted/x.yaml", "x")
    assert command.startswith("/opt/venv/bin/python -m orchestrator.cli sweep submitted/x.yaml")
    assert f"--home '{tmp_path / 'shared home'}' --tracking-uri http://mlflow:5000" in command
    args = dataclasses.replace(args, reuse_trials=True)  # avlab submit --reuse-trials: the cluster's sweep reuses too
    assert "--name x --address auto --preset tiny --max-concurrent 3 --reuse-trials --home " in submit.entrypoint(
        args, "submitted/x.yaml", "x")
    args = dataclasses.replace(args, reuse_trials=False, dry_run_s=30.0)  # avlab submit --dry-run 30
    assert "--max-concurrent 3 --dry-run 30 --home " in submit.entrypoint(args, "submitted/x.yaml", "x")


def test_a_search_space_from_elsewhere_travels_in_a_copy_of_the_project(tmp_path):
    space = tmp_path / "my_ablation.yaml"
    space.write_text("grid:\n  method.memory_size: [10]\n")
    with submit._working_dir(space, "x") as (folder, path):
        assert path == "submitted/my_ablation.yaml" and (folder / path).read_text() == space.read_text()
        assert (folder / "orchestrator" / "cli.py").exists() and (folder / "methods").is_dir()
        for name in (".venv", ".git", "avlab-runs"):
            assert not (folder / name).exists()
    assert not folder.exists()
    inside = ROOT / "search_spaces" / "memory_size_fig6.yaml"
    with submit._working_dir(inside, "y") as (folder, path):
        assert folder == ROOT and path == "search_spaces/memory_size_fig6.yaml"


# ---------------------------------------------------------------------------------------------
# Two nodes on one machine

SPACE = """\
base:
  preset: tiny
  overrides: [data.paired_size=512, data.unpaired_sound_size=128, data.unpaired_image_size=128,
              data.train_size=100, data.test_size=60, data.transfer_train_size=0, data.transfer_test_size=0,
              train.epochs=3, train.batch_size=64, method.memory_size=16]
grid:
  method.memory_temperature: [0.1, 0.2]
seeds: 1
metric: image_h_linear_acc
mode: max
resources: {workers: 1, cpus_per_worker: 1}
max_concurrent: 2
"""


def _children(client, name: str) -> list:
    exp = client.get_experiment_by_name("avlab-sweeps")
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id],
                              f"tags.`avlab.sweep_name` = '{name}' and tags.`avlab.kind` = 'trial'")


def _history(run) -> list[str]:
    return [h for h in run.data.tags.get("avlab.node_history", "").split(" | ") if h]


@pytest.mark.slow
def test_sweep_on_two_nodes_survives_losing_one(tmp_path):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobSubmissionClient
    from ray.util.state.exception import RayStateApiException

    space = tmp_path / "two_nodes.yaml"
    space.write_text(SPACE)
    home, name = tmp_path / "home", "two-nodes"
    cluster = LocalCluster(tmp_path)
    times: dict[str, float] = {}
    try:
        t0 = time.monotonic()
        cluster.start()
        times["cluster_start_s"] = time.monotonic() - t0
        nodes = cluster.node_ids()
        env = {**faults.env(), "RAY_AUTH_MODE": "disabled", submit.JOB_PYTHON_ENV: sys.executable}
        out = subprocess.run([str(BIN / "avlab"), "submit", str(space), "--address", cluster.address,
                              "--name", name, "--home", str(home)], env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        t_submit = time.monotonic()
        record = submit.read_record(home, name)
        assert record.name == name and record.address == cluster.address
        assert record.job_id in out.stdout and f"avlab logs {name} --follow" in out.stdout
        jobs = JobSubmissionClient(cluster.address)
        job_id = record.job_id

        def job_status() -> str:
            status = str(jobs.get_job_status(job_id).value)
            assert status not in ("FAILED", "STOPPED"), jobs.get_job_logs(job_id)[-6000:]
            return status

        # The sweep's own job file exists once its parent run (and mlflow.db) does.
        wait(lambda: job_status() and (home / "jobs" / f"{name}.json").exists(), timeout=300,
              what="the sweep to start on the cluster")
        client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
        on_b: dict = {}
        seen_actors: set = set()

        def actor_nodes_seen() -> set:
            try:
                seen_actors.update(cluster.actor_nodes("ImplicitFunc"))
            except RayStateApiException:  # the dashboard busy or starting: ask again
                pass
            return seen_actors

        def both_nodes_training() -> bool:
            job_status()
            actor_nodes_seen()
            try:
                runs = {r.data.tags.get("avlab.nodes"): r for r in _children(client, name)}
            except MlflowException:  # sqlite busy with the trials' writes: ask again
                return False
            if set(runs) != set(nodes.values()):
                return False
            on_b["run"] = runs[nodes["b"]]
            # Node b's trial has written its first checkpoint (what a restart resumes from).
            return any((home / "ray" / "trials").glob(f"*-{on_b['run'].info.run_id}/checkpoint_epoch*"))

        wait(both_nodes_training, timeout=600, what="a trial on each node, node b's past its first epoch")
        times["until_both_training_s"] = time.monotonic() - t_submit
        # Single-worker trials train in Tune's trial actors, wherever their CPU is: one per node.
        # The state API answers from the dashboard's view of the cluster, which can lag the
        # trials' own reports: collect what it lists while the trials train, then ask until it
        # has listed a trial actor on each node.
        try:
            wait(lambda: actor_nodes_seen() >= set(nodes.values()), timeout=60, what="trial actors")
        except AssertionError:
            raise AssertionError(f"trial actors listed on {sorted(seen_actors)}, nodes {nodes}") from None
        t_kill = time.monotonic()
        wall_kill = time.time()
        cluster.kill("b")
        times["kill_s"] = time.monotonic() - t_kill
        interrupted = on_b["run"].info.run_id
        events: dict[str, float] = {}
        while (status := job_status()) not in ("SUCCEEDED",):
            now = time.monotonic()
            if now - t_kill > 900:
                raise AssertionError(f"sweep not finished 15 min after the kill (job {status})")
            if "node_dead" not in events and "b" not in cluster.node_ids():
                events["node_dead"] = now - t_kill
            try:
                if "restarted" not in events and len(_history(client.get_run(interrupted))) > 1:
                    events["restarted"] = now - t_kill
            except MlflowException:
                pass
            time.sleep(1)
        times["sweep_wall_s"] = time.monotonic() - t_submit
        info = jobs.get_job_info(job_id)
        times["job_runtime_s"] = (info.end_time - info.start_time) / 1000

        logs = subprocess.run([str(BIN / "avlab"), "logs", name, "--home", str(home)], env=env,
                              capture_output=True, text=True, timeout=120)
        (tmp_path / "job.log").write_text(logs.stdout)
        assert logs.returncode == 0 and f"[avlab] sweep {name} finished" in logs.stdout, logs.stderr[-3000:]
        assert "[avlab] resumed from " in logs.stdout  # the restarted trial continued from its checkpoint
        assert "SUCCEEDED" in submit.job_status_lines(home, name)[0]

        # Every trial finished, in its own child run; the interrupted one resumed on node a.
        children = _children(client, name)
        assert len(children) == 2
        for run in children:
            assert run.info.status == "FINISHED" and "eval_time_s" in run.data.metrics, run.data.tags
            assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [0, 1, 2]
        by_id = {r.info.run_id: r for r in children}
        assert _history(by_id[interrupted])[0] == nodes["b"] and _history(by_id[interrupted])[-1] == nodes["a"]
        assert by_id[interrupted].data.tags["avlab.nodes"] == nodes["a"]
        other = next(r for r in children if r.info.run_id != interrupted)
        assert _history(other) == [nodes["a"]]
        assert {n for r in children for n in _history(r)} == set(nodes.values())
        parent = client.get_run(children[0].data.tags["mlflow.parentRunId"])
        assert parent.info.status == "FINISHED"

        after = min(m.timestamp for m in client.get_metric_history(interrupted, "loss") if m.timestamp / 1000 > wall_kill)
        measured = {
            **{k: round(v, 1) for k, v in times.items()},
            **{f"after_kill_{k}_s": round(v, 1) for k, v in events.items()},
            "after_kill_next_epoch_logged_s": round(after / 1000 - wall_kill, 1),
            "other_trial_ended_after_kill_s": round(other.info.end_time / 1000 - wall_kill, 1),
            "trials": {r.info.run_name: {"node_history": " | ".join(n[:8] for n in _history(r)),
                                         "runtime_s": round((r.info.end_time - r.info.start_time) / 1000, 1)}
                       for r in children},
            "nodes": {k: v[:8] for k, v in nodes.items()},
        }
        (tmp_path / "measurements.json").write_text(json.dumps(measured, indent=2))
        print("\n[two-node sweep]", json.dumps(measured, indent=2))
    finally:
        cluster.stop()


@pytest.mark.slow
def test_token_authentication_and_a_run_the_cluster_cannot_hold(tmp_path):
    """A cluster started with RAY_AUTH_MODE=token refuses a client without the token in one line
    (exit 1); with RAY_AUTH_MODE=token and the token in RAY_AUTH_TOKEN the request goes through
    (here: an unknown job id, exit 2). On the same one-CPU cluster, a run that needs two workers,
    or one worker with two CPUs, fails after the bounded wait (AVLAB_WORKER_WAIT_S) with one line,
    instead of waiting forever."""
    token = uuid.uuid4().hex * 2
    cluster = LocalCluster(tmp_path, nodes=("a",), auth={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
    try:
        cluster.start()
        argv = [str(BIN / "avlab"), "logs", "raysubmit_nope", "--address", cluster.address, "--home", str(tmp_path)]
        base = {k: v for k, v in faults.env().items() if not k.startswith("RAY_AUTH")}
        for extra, code, message in [
            ({}, 1, "RAY_AUTH_MODE=token"),
            ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}, 1, "RAY_AUTH_MODE=token"),
            ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}, 2, "the cluster has no Ray job 'raysubmit_nope'"),
        ]:
            out = subprocess.run(argv, env={**base, **extra}, capture_output=True, text=True, timeout=300)
            err = out.stderr.strip().splitlines()
            assert out.returncode == code and len(err) == 1 and message in err[0], out.stderr[-3000:]

        wait = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "AVLAB_WORKER_WAIT_S": "6",
                "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "3"}
        # Two DDP workers (a TorchTrainer), and one worker that needs two CPUs (a Ray task).
        for name, args, told in [("big", ["--workers", "2"], "its 2 workers (1 CPU each)"),
                                 ("wide", ["resources.cpus_per_worker=2"], "its 1 worker (2 CPUs each)")]:
            out = subprocess.run([str(BIN / "avlab"), "run", "--address", f"127.0.0.1:{cluster.gcs}", "--home",
                                  str(tmp_path / "home"), *args, f"tracking.run_name={name}", "train.epochs=1"],
                                 env={**base, **wait}, capture_output=True, text=True, timeout=300)
            lines = [line for line in out.stderr.splitlines() if line.startswith("avlab:")]
            assert out.returncode == 1 and len(lines) == 1, out.stdout[-3000:] + out.stderr[-3000:]
            assert f"run {name}: {told} did not start within 6 s" in lines[0], lines
            # No traceback of avlab's (Ray Train's controller logs each timed-out attempt its own way).
            assert f'File "{ROOT / "orchestrator"}' not in out.stderr, out.stderr[-3000:]
    finally:
        cluster.stop()


@pytest.mark.parametrize("value", ["nan", "-1", "1e9", "soon"])
def test_a_bad_worker_wait_exits_2_before_anything_starts(tmp_path, capsys, monkeypatch, value):
    monkeypatch.setenv("AVLAB_WORKER_WAIT_S", value)
    assert main(["run", "--home", str(tmp_path / "home"), "train.epochs=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "AVLAB_WORKER_WAIT_S:" in err, err
    assert not (tmp_path / "home").exists()


@pytest.fixture
def tracking_db(request):
    """None for the recipe's default store (SQLite in $AVLAB_HOME), else the URI of a database
    on a throw-away PostgreSQL cluster."""
    if request.param == "sqlite":
        yield None
        return
    if postgres.binaries() is None:
        pytest.skip(postgres.MISSING)
    with postgres.cluster() as uri:
        yield f"{uri}/mlflow"


@pytest.mark.slow
@pytest.mark.parametrize("tracking_db", ["sqlite", "postgresql"], indirect=True)
def test_the_slurm_recipe_starts_ray_on_two_nodes_and_runs_a_sweep(tmp_path, tracking_db):
    """cluster-slurm.sbatch under a two-node simulation: `scontrol` names two nodes, `srun` runs
    its command here, and the extra `ray start` options give the two nodes on one machine their
    own ports (as two hosts would have). The head starts, the worker joins, the sweep runs with
    `--address auto` into $AVLAB_HOME, and the job's Ray nodes are gone when the script ends.
    With AVLAB_TRACKING_DB, the head also runs the MLflow tracking server on that PostgreSQL
    database, behind MLflow's login: the trial tracks through it with the job's credentials,
    which reach no file, tag, parameter or log."""
    from mlflow.tracking import MlflowClient

    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "scontrol").write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "n1\\nn2\\n"\n')
    # srun [options] command...: the options (with their values) dropped, the command run here.
    (shims / "srun").write_text('#!/bin/sh\nwhile [ $# -gt 0 ]; do case "$1" in -w) shift 2;; -*) shift;; *) break;; '
                                'esac; done\nexec "$@"\n')
    for shim in shims.iterdir():
        shim.chmod(0o755)
    space = tmp_path / "one.yaml"
    space.write_text(SPACE.replace("method.memory_temperature: [0.1, 0.2]", "method.memory_temperature: [0.1]")
                     .replace("train.epochs=3", "train.epochs=1"))
    gcs, dashboard, agent_head, agent_worker, client_port = faults.free_ports(5)
    tag = uuid.uuid4().hex[:8]
    home = tmp_path / "home"
    env = {**faults.env(), "PATH": f"{shims}:{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
           "AVLAB_HOME": str(home), "AVLAB_DIR": str(ROOT), "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_ID": tag,
           "SLURM_CPUS_PER_TASK": "1", "AVLAB_RAY_PORT": str(gcs), "AVLAB_HEAD_IP": "127.0.0.1", MARK: tag,
           "AVLAB_RAY_HEAD_ARGS": f"--dashboard-port {dashboard} --dashboard-agent-listen-port {agent_head} "
                                  f"--ray-client-server-port {client_port}",
           "AVLAB_RAY_WORKER_ARGS": f"--node-ip-address 127.0.0.1 --dashboard-agent-listen-port {agent_worker}",
           "TMPDIR": tempfile.mkdtemp(prefix="avs-", dir="/tmp")}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    password = f"pw-{uuid.uuid4().hex}"
    if tracking_db:
        env.update(AVLAB_TRACKING_DB=tracking_db, AVLAB_TRACKING_PORT=str(faults.free_port()),
                   AVLAB_TRACKING_WORKERS="1", MLFLOW_TRACKING_USERNAME="sweeper", MLFLOW_TRACKING_PASSWORD=password)
    try:
        out = subprocess.run(["bash", str(ROOT / "cluster-slurm.sbatch"), str(space), "--name", "slurm"], env=env,
                             cwd=tmp_path, capture_output=True, text=True, timeout=900)
        log = out.stdout + out.stderr
        assert out.returncode == 0, log[-5000:]
        assert "[avlab] Ray head on n1 (127.0.0.1:" in log and "[avlab] Ray worker on n2" in log
        assert "[avlab] sweep slurm finished" in log, log[-3000:]
        client = MlflowClient(tracking_db or f"sqlite:///{home / 'mlflow.db'}")
        runs = _children(client, "slurm")
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        if tracking_db:
            assert "[avlab] MLflow tracking server on n1 (http://127.0.0.1:" in log, log[-3000:]
            assert not (home / "mlflow.db").exists()  # everything went to the database
            assert "image_h_linear_acc" in runs[0].data.metrics
            assert password not in log
            leaks = [str(f) for f in [*home.rglob("*"), *tmp_path.glob("*.log")]
                     if f.is_file() and password.encode() in f.read_bytes()]
            assert not leaks, leaks
            dump = postgres.dump(tracking_db)
            assert password not in dump and "sweeper" in dump  # the login exists; only its hash is stored
        # The script stops the nodes it started.
        wait(lambda: not marked(tag), timeout=60, what="the job's Ray nodes to stop")
    finally:
        kill_marked(tag)
        shutil.rmtree(env["TMPDIR"], ignore_errors=True)


@pytest.mark.slow
def test_avlab_stop_stops_a_submitted_sweep_through_the_job_api(tmp_path):
    """`avlab stop NAME` on a sweep sent with `avlab submit`: Ray stops the job (SIGTERM to its
    driver), and what the driver had no time to settle is settled from here, through the home
    this machine shares with the cluster: the parent KILLED, no trial left RUNNING."""
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobSubmissionClient

    space = tmp_path / "two.yaml"
    space.write_text(SPACE)
    home, name = tmp_path / "home", "stopped"
    cluster = LocalCluster(tmp_path, nodes=("a",))
    try:
        cluster.start()
        env = {**faults.env(), "RAY_AUTH_MODE": "disabled", submit.JOB_PYTHON_ENV: sys.executable}
        out = subprocess.run([str(BIN / "avlab"), "submit", str(space), "--address", cluster.address, "--name", name,
                              "--home", str(home)], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        jobs = JobSubmissionClient(cluster.address)
        job_id = submit.read_record(home, name).job_id

        def training() -> bool:
            try:
                if any((home / "ray" / "trials").glob(f"{name}-*/checkpoint_epoch*")):
                    return True
            except OSError:
                return False
            # A job that ended before training fails here at once, with its logs.
            status = str(jobs.get_job_status(job_id).value)
            assert status not in ("FAILED", "STOPPED", "SUCCEEDED"), status + "\n" + job_logs()
            return False

        def job_logs() -> str:
            logs = subprocess.run([str(BIN / "avlab"), "logs", name, "--home", str(home)], env=env,
                                  capture_output=True, text=True, timeout=120)
            return f"{tails(tmp_path)}\n--- avlab logs {name}\n{(logs.stdout + logs.stderr)[-6000:]}"

        wait(training, timeout=600, what="a trial of the submitted sweep past its first epoch", explain=job_logs)
        # Only now: the job's driver has made the store. An MLflow client opened on a home whose
        # store does not exist yet creates and migrates it itself, racing the driver's migration.
        client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
        out = subprocess.run([str(BIN / "avlab"), "stop", name, "--home", str(home)], env=env, capture_output=True,
                             text=True, timeout=300)
        last = out.stdout.strip().splitlines()[-1]  # the one line that says what happened, nothing after it
        assert out.returncode == 0 and last.startswith(f"[avlab] stopped {name}: Ray job "), out.stdout + out.stderr
        assert "is STOPPED" in out.stdout
        parent = client.search_runs([client.get_experiment_by_name("avlab-sweeps").experiment_id],
                                    f"tags.`avlab.sweep_name` = '{name}' and tags.`avlab.kind` = 'sweep'")[0]
        assert parent.info.status == "KILLED"
        assert all(r.info.status in ("FINISHED", "KILLED") for r in _children(client, name))
    finally:
        cluster.stop()
