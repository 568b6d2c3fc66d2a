"""`avlab stop` signals only a live driver of the very job it names, a job's name is claimed by
one command only, and a copied home is a home of its own.

Every process that a test here lets `stop` signal is a throw-away child of the test; the job
files that name process ids 0, -1 or 1 are stopped inside a PID namespace of their own."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator import drivers, jobs, store, tracking
from orchestrator.cli import main

from conftest import AVLAB

SLEEPER = "import time; time.sleep(120)"


def _job(home: Path, name: str, *, status: str = "RUNNING", driver: dict | None = None) -> str:
    """A run job in ``home`` with a real MLflow run of ``status``; returns the run id."""
    uri = f"sqlite:///{home / 'mlflow.db'}"
    store.prepare_store(uri)
    run_id = tracking.create_run(tracking_uri=uri, home=home, experiment="stop-tests", run_name=name, params={},
                                 tags={"kind": "run", "run_name": name}, config_yaml="")
    if status != "RUNNING":
        MlflowClient(uri).set_terminated(run_id, status=status)
    jobs.write(home, jobs.JobRecord(kind="run", name=name, config={}, run_id=run_id, tracking_uri=uri,
                                    storage=str(home / "ray"), driver=driver or {}))
    return run_id


def _child(*argv: str) -> subprocess.Popen:
    """A throw-away process of the test's own; ``avlab`` in its command line when asked."""
    return subprocess.Popen([sys.executable, "-c", SLEEPER, *argv])


def _entry(proc: subprocess.Popen, **changes) -> dict:
    import psutil

    entry = {"pid": proc.pid, "host": os.uname().nodename, "since": time.time(),
             "started": psutil.Process(proc.pid).create_time()}
    return {**entry, **changes}


def _status(home: Path, run_id: str) -> str:
    return MlflowClient(f"sqlite:///{home / 'mlflow.db'}").get_run(run_id).info.status


@pytest.fixture
def children():
    started: list[subprocess.Popen] = []

    def start(*argv: str) -> subprocess.Popen:
        started.append(proc := _child(*argv))
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def test_stop_signals_the_live_driver_of_a_running_job(tmp_path, capsys, children):
    home = tmp_path / "home"
    proc = children("avlab", "run")
    run_id = _job(home, "live", driver=_entry(proc))
    assert main(["--home", str(home), "stop", "live"]) == 0
    assert proc.wait(timeout=30) == -signal.SIGTERM
    assert "[avlab] run live stopped" in capsys.readouterr().out
    assert _status(home, run_id) == "KILLED"


@pytest.mark.parametrize("case", ["reused pid", "not avlab", "finished", "old entry, later process"])
def test_stop_leaves_alone_a_process_that_is_not_the_jobs_driver(tmp_path, capsys, children, case):
    """A process with the recorded number that started at another time (the number was reused),
    one whose command line is not avlab's, the driver of a job that has finished, and a process
    started after an entry without a start time was written: none is signalled."""
    home = tmp_path / "home"
    proc = children("avlab") if case != "not avlab" else children("something-else")
    entry = {"reused pid": _entry(proc, started=_entry(proc)["started"] - 100),
             "not avlab": _entry(proc),
             "finished": _entry(proc),
             "old entry, later process": {k: v for k, v in _entry(proc, since=time.time() - 100).items()
                                          if k != "started"}}[case]
    run_id = _job(home, "job", status="FINISHED" if case == "finished" else "RUNNING", driver=entry)
    assert main(["--home", str(home), "stop", "job"]) == 0
    out = capsys.readouterr().out
    assert ("has finished" if case == "finished" else "run job was not running") in out, out
    time.sleep(0.2)
    assert proc.poll() is None  # alive, never signalled
    assert _status(home, run_id) == ("FINISHED" if case == "finished" else "KILLED")


def test_stop_refuses_a_name_that_is_a_path(tmp_path, capsys, children):
    """`avlab stop ../../x` would read a job file outside the home and signal what it names."""
    outside = tmp_path / "x"
    proc = children("avlab")
    _job(outside, "x", driver=_entry(proc))
    home = tmp_path / "a" / "b"
    home.mkdir(parents=True)
    assert main(["--home", str(home), "stop", "../../x/jobs/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("avlab: error: NAME: "), err
    assert proc.poll() is None


BAD_PIDS = {"minus-one": -1, "zero": 0, "one": 1, "true": True, "huge": 2**63, "text": "123"}


@pytest.mark.slow
def test_stop_refuses_process_ids_that_signal_groups_or_init_inside_a_pid_namespace(tmp_path):
    """`kill(-1)` reaches every process the user may signal, `kill(0)` the caller's group,
    `true` is 1 (init) and a huge number overflows. Each job file that names one of them ends in
    one line naming its driver.pid, exit 2, and a canary in the same PID namespace (where such a
    signal would land, had it been sent) is alive afterwards."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                                                         capture_output=True).returncode != 0:
        pytest.skip("no PID namespace here (needs unshare and the right to create namespaces)")
    home = tmp_path / "home"
    for name, pid in BAD_PIDS.items():
        _job(home, name, driver={"pid": pid, "host": os.uname().nodename, "since": time.time()})
    stops = "; ".join(f'{AVLAB} stop {name} --home {home} 2>&1; echo "exit {name} $?"' for name in BAD_PIDS)
    script = f"sleep 300 & canary=$!; {stops}; kill -0 $canary && echo canary-alive; kill $canary"
    out = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "bash", "-c", script],
                         capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"})
    lines = out.stdout.splitlines()
    assert "canary-alive" in lines, out.stdout + out.stderr
    for name in BAD_PIDS:
        at = lines.index(f"exit {name} 2")
        assert lines[at - 1].startswith(f"avlab: error: {jobs.job_path(home, name)}: driver.pid must be"), lines


CLAIM = """
import os, sys, time
from pathlib import Path
from orchestrator import jobs
home, go = Path(sys.argv[1]), Path(sys.argv[2])
while not go.exists():
    time.sleep(0.001)
try:
    with jobs.reserved(home, "dup", "run", "--name"):
        jobs.write(home, jobs.JobRecord(kind="run", name="dup", config={}, run_id=str(os.getpid()), tracking_uri="sqlite:///x"))
    print("won", os.getpid())
except Exception as exc:
    print("lost", exc)
"""


def test_of_several_commands_claiming_one_name_at_once_exactly_one_gets_it(tmp_path):
    """Six processes (avlab drivers by their command line) claim one name at the same moment."""
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CLAIM, str(tmp_path), str(go), "avlab"], stdout=subprocess.PIPE,
                              text=True) for _ in range(6)]
    time.sleep(3)  # every process imported avlab and waits
    go.touch()
    outcomes = [proc.communicate(timeout=60)[0].strip().split(" ", 1) for proc in procs]
    winners = [value for kind, value in outcomes if kind == "won"]
    assert len(winners) == 1, outcomes
    assert all(v.startswith("--name: a run or sweep named 'dup' already exists") for k, v in outcomes if k == "lost"), outcomes
    assert json.loads(jobs.job_path(tmp_path, "dup").read_text())["mlflow_run_id"] == winners[0]


def test_a_claim_is_withdrawn_when_the_command_fails_and_a_dead_commands_claim_does_not_block(tmp_path):
    with pytest.raises(RuntimeError), jobs.reserved(tmp_path, "job", "run", "--name"):
        assert jobs.exists(tmp_path, "job")
        with pytest.raises(Exception, match="is being created by another avlab command"):
            jobs.read(tmp_path, "job")
        raise RuntimeError("the MLflow run could not be created")
    assert not jobs.exists(tmp_path, "job")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = {"pid": int(gone.stdout), "host": os.uname().nodename, "since": time.time() - 5, "started": time.time() - 5}
    jobs.job_path(tmp_path, "job").write_text(json.dumps(
        {"format": jobs.FORMAT, "name": "job", "kind": "run", "reserved": True, "driver": dead}))
    with jobs.reserved(tmp_path, "job", "run", "--name"):
        claim = json.loads(jobs.job_path(tmp_path, "job").read_text())
    assert claim["driver"]["pid"] == os.getpid()


@pytest.mark.slow
def test_two_runs_given_one_name_at_once_one_finishes_and_the_other_exits_2(tmp_path):
    """Both pass the name check while neither has written its job file: one claims the name, the
    other stops with one line before its MLflow run exists; the name leads to the finished run."""
    from conftest import TINY_RUN

    home = tmp_path / "home"
    argv = [AVLAB, "run", "--home", str(home), *TINY_RUN, "tracking.run_name=dup"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    procs = [subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [proc.communicate(timeout=600) for proc in procs]
    codes = sorted(proc.returncode for proc in procs)
    assert codes == [0, 2], outs
    loser = outs[[p.returncode for p in procs].index(2)][1].strip().splitlines()
    assert loser[-1].startswith("avlab: error: tracking.run_name: a run or sweep named 'dup' already exists"), loser
    assert not any(line.startswith(("Traceback", "avlab:")) for line in loser[:-1]), loser
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`avlab.run_name` = 'dup'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert jobs.read(home, "dup").run_id == runs[0].info.run_id


def test_a_copied_home_reads_and_settles_its_own_store(tmp_path, capsys, children):
    """A job file records absolute paths of the home that wrote it; in a copy (or after a move),
    the store and the checkpoints in the home are the copy's own. Job files written before the home
    was recorded are recognised by their default storage folder."""
    original, copy = tmp_path / "original", tmp_path / "copy"
    run_id = _job(original, "job")
    (original / "jobs" / "old.json").write_text(json.dumps(
        {**{k: v for k, v in json.loads(jobs.job_path(original, "job").read_text()).items() if k != "home"},
         "name": "old"}))
    shutil.copytree(original, copy)
    for name in ("job", "old"):
        record = jobs.read(copy, name)
        assert record.tracking_uri == f"sqlite:///{copy / 'mlflow.db'}"
        assert record.storage == str(copy / "ray")
    assert main(["--home", str(copy), "stop", "job"]) == 0
    assert _status(copy, run_id) == "KILLED" and _status(original, run_id) == "RUNNING"
    shared = {**json.loads(jobs.job_path(original, "job").read_text()),
              "tracking_uri": "postgresql://db.example/mlflow", "storage": "s3://bucket/avlab"}
    record = jobs.JobRecord.from_json(shared, jobs.job_path(original, "job"))
    assert jobs.follow_home(record, copy) == dataclasses.replace(record, home=str(copy))  # shared places stay


def test_a_damaged_job_file_is_one_line_naming_it(tmp_path, capsys):
    _job(tmp_path, "job")
    path = jobs.job_path(tmp_path, "job")
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "mlflow_run_id"}))
    for command in (["stop", "job"], ["resume", "job"], ["resume", "job", "--retry-failed"]):
        assert main(["--home", str(tmp_path), *command]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"avlab: error: {path}: damaged avlab job file"), err


@pytest.mark.parametrize("store_there", [False, True])
def test_a_job_file_of_another_store_is_one_line_and_signals_nothing(tmp_path, capsys, children, store_there):
    """A job file whose store is missing, or does not hold its run (copied in from elsewhere, or
    crafted), names a live avlab process: nothing is signalled, created or settled."""
    home = tmp_path / "home"
    if store_there:
        _job(home, "other")  # the store exists and holds some other run
    proc = children("avlab", "run")
    jobs.write(home, jobs.JobRecord(kind="run", name="stray", config={}, run_id="0123456789abcdef",
                                    tracking_uri=f"sqlite:///{home / 'mlflow.db'}", storage=str(home / "ray"),
                                    driver=_entry(proc)))
    before = sorted(p.name for p in home.iterdir())
    assert main(["--home", str(home), "stop", "stray"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"avlab: error: {jobs.job_path(home, 'stray')}: its ") and "\n" not in err, err
    assert proc.poll() is None  # not signalled
    assert sorted(p.name for p in home.iterdir()) == before
