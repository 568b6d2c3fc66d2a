"""avlab on a real PostgreSQL store (a throw-away cluster on loopback, tests/postgres.py): a sweep
of concurrent trials whose driver is killed, resumed; the database away for several epochs; a
claim reproduced and reproduced again from its finished trials; results moved between a SQLite
home and PostgreSQL both ways; `avlab ui --login` on it; and the one-line errors for a database
that is not there or a login without credentials, before anything starts."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

import postgres
from conftest import AVLAB, ROOT, TINY_RUN
from sweeps import write_mem_claim

pytestmark = pytest.mark.skipif(postgres.binaries() is None, reason=postgres.MISSING)


@pytest.fixture(scope="module")
def pg():
    with postgres.running() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def server(pg):
    """The cluster's URI, with a database ``mlflow``."""
    pg.create("mlflow")
    return pg.uri


def _avlab(args: list[str], home) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(RAY_AUTH_MODE="disabled")
    return subprocess.run([AVLAB, *args, "--home", str(home)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def test_a_database_that_is_not_there_exits_2_in_one_line_before_anything_starts(server, tmp_path):
    home = tmp_path / "home"
    out = _avlab(["run", "--tracking-uri", f"{server}/missing", *TINY_RUN], home)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
    assert lines[0].startswith("avlab: error: --tracking-uri: cannot connect to the PostgreSQL store at avlab@127.0.0.1:")
    assert lines[0].split(" at ", 1)[1].split(" ", 1)[0].endswith("/missing") and "(does not exist)" in lines[0], lines[0]
    assert not home.exists()


ADMIN, PASSWORD = "lab-admin", "a-long-password-for-tests"


@pytest.fixture(scope="module")
def login_server(server, tmp_path_factory):
    """`avlab ui --login` on the PostgreSQL database, on loopback: (its URL, its output file)."""
    import faults

    port = faults.free_port()
    log = tmp_path_factory.mktemp("login") / "ui.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_AUTH_ADMIN_USERNAME=ADMIN, MLFLOW_AUTH_ADMIN_PASSWORD=PASSWORD, PYTHONUNBUFFERED="1")
    with log.open("w") as out:
        proc = subprocess.Popen([AVLAB, "ui", "--tracking-uri", f"{server}/mlflow", "--login", "--port", str(port),
                                 "--home", str(log.parent / "home")], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        faults.wait_for(lambda: "MLflow UI at" in log.read_text() or proc.poll() is not None, timeout=180,
                        what="the MLflow server with its login")
        assert proc.poll() is None, log.read_text()[-3000:]
        yield f"http://127.0.0.1:{port}", log
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _client(args: list[str], url: str, **login) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=url, **login)
    return subprocess.run([AVLAB, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_a_server_with_a_login_refuses_clients_without_one_in_one_line_and_answers_its_users(login_server):
    url, log = login_server
    port = url.rsplit(":", 1)[1]
    for login, said in (({}, "refused a request without credentials"),
                        ({"MLFLOW_TRACKING_USERNAME": ADMIN, "MLFLOW_TRACKING_PASSWORD": "not-the-password"},
                         "refused the credentials of MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")):
        out = _client(["status", "anything"], url, **login)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
        assert lines[0].startswith(f"avlab: error: MLFLOW_TRACKING_URI: the tracking server at 127.0.0.1:{port} {said} "
                                   f"(HTTP 401)"), lines[0]
    out = _client(["status", "anything"], url, MLFLOW_TRACKING_USERNAME=ADMIN, MLFLOW_TRACKING_PASSWORD=PASSWORD)
    assert out.returncode == 2 and "no sweep named 'anything'" in out.stderr, out.stderr[-2000:]  # in, and answered
    assert PASSWORD not in log.read_text() + out.stdout + out.stderr


@pytest.mark.parametrize("admin, said", [
    ({}, "--login asks for MLflow's login: set MLFLOW_AUTH_ADMIN_USERNAME and MLFLOW_AUTH_ADMIN_PASSWORD"),
    ({"MLFLOW_AUTH_ADMIN_USERNAME": ADMIN, "MLFLOW_AUTH_ADMIN_PASSWORD": "short-pass"},
     "MLFLOW_AUTH_ADMIN_PASSWORD: MLflow's login takes passwords of at least 12 characters; this one has 10"),
])
def test_a_login_without_its_admin_exits_2_in_one_line_before_the_server_starts(server, tmp_path, admin, said):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(admin)
    out = subprocess.run([AVLAB, "ui", "--tracking-uri", f"{server}/mlflow", "--login", "--home", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"avlab: error: {said}"), out.stderr[-2000:]
    assert not out.stdout  # nothing started


# --- sweeps, faults, claims and bundles on PostgreSQL ----------------------------------------------

def _trials(uri: str, sweep: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("avlab-sweeps")
    if exp is None:
        return []
    return [r for r in client.search_runs([exp.experiment_id], f"tags.`avlab.sweep_name` = '{sweep}'")
            if r.data.tags.get("avlab.kind") == "trial"]


@pytest.fixture(scope="module")
def killed_sweep(pg, tmp_path_factory):
    """A sweep of 4 trials, 2 at a time, tracked into PostgreSQL, whose node (driver, Ray, trials)
    is SIGKILLed once a trial has finished and another is part-way, then resumed: (its URI, home,
    the trials before the kill, the most trials seen running at once, the resume's output)."""
    import faults
    from sweeps import MEM_RUN, MEM_SPACE

    uri = pg.create("sweeps")
    tmp = tmp_path_factory.mktemp("killed")
    home, log, space = tmp / "home", tmp / "sweep.log", tmp / "mem.yaml"
    space.write_text(MEM_SPACE)
    proc = faults.start(["sweep", str(space), "--name", "mem", "--home", str(home), "--tracking-uri", uri, *MEM_RUN],
                        log, tmp)
    most = [0]

    def one_done_one_midway() -> bool:
        runs = _trials(uri, "mem")
        most[0] = max(most[0], sum(r.info.status == "RUNNING" for r in runs))
        return any(r.info.status == "FINISHED" for r in runs) and any(
            r.info.status == "RUNNING" and (home / "ray" / "trials" / f"mem-{r.info.run_id}" / "checkpoint_epoch00000").exists()
            for r in runs)

    try:
        faults.wait_for(one_done_one_midway, timeout=600, what="a finished and a part-way trial", proc=proc, log=log)
    finally:
        faults.kill_node(proc)
    before = {r.info.run_id: r.info.status for r in _trials(uri, "mem")}
    out = faults.run(["resume", "mem", "--home", str(home)], cwd=tmp)  # the store from the job file
    return uri, home, before, most[0], out


@pytest.mark.slow
def test_a_sweep_of_concurrent_trials_whose_driver_is_killed_resumes_every_trial_once(killed_sweep):
    uri, home, before, most, out = killed_sweep
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert most == 2  # two trials tracked into the database at once
    runs = _trials(uri, "mem")
    keys = sorted((r.data.tags["avlab.config_label"], r.data.tags["avlab.seed"]) for r in runs)
    assert len(keys) == 4 and len(set(keys)) == 4, keys  # one run per trial, never two
    assert all(r.info.status == "FINISHED" and "image_h_linear_acc" in r.data.metrics for r in runs)
    assert set(before) <= {r.info.run_id for r in runs}  # the killed driver's runs were continued
    for run in runs:  # every epoch's metrics once, the part-way trial's included
        from mlflow.tracking import MlflowClient

        steps = [m.step for m in MlflowClient(uri).get_metric_history(run.info.run_id, "loss")]
        assert steps == [0, 1], (run.info.run_name, steps)
    assert not (home / "mlflow.db").exists()


@pytest.mark.slow
def test_results_move_from_postgresql_to_a_sqlite_home_and_back_unchanged(killed_sweep, pg, tmp_path):
    uri, home, *_ = killed_sweep

    def report(**where) -> dict:
        out = _avlab(["report", "mem", "--format", "json", *(["--tracking-uri", where["uri"]] if "uri" in where else [])],
                     where["home"])
        assert out.returncode == 0, out.stderr[-3000:]
        doc = json.loads(out.stdout)
        return {r["configuration"]: r["metrics"] for r in doc["rows"]}

    original = report(home=home, uri=uri)
    assert len(original) == 2
    out = _avlab(["results", "export", "mem", "--out", str(tmp_path / "from-pg"), "--tracking-uri", uri], home)
    assert out.returncode == 0, out.stderr[-3000:]
    sqlite_home = tmp_path / "sqlite-home"
    out = _avlab(["results", "import", str(tmp_path / "from-pg")], sqlite_home)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (sqlite_home / "mlflow.db").is_file() and report(home=sqlite_home) == original

    out = _avlab(["results", "export", "mem", "--out", str(tmp_path / "from-sqlite")], sqlite_home)
    assert out.returncode == 0, out.stderr[-3000:]
    again = pg.create("imported")
    out = _avlab(["results", "import", str(tmp_path / "from-sqlite"), "--tracking-uri", again], tmp_path / "pg-home")
    assert out.returncode == 0, out.stderr[-3000:]
    assert report(home=tmp_path / "pg-home", uri=again) == original


@pytest.mark.slow
def test_a_claim_reproduced_on_postgresql_is_decided_again_from_its_finished_trials(pg, tmp_path):
    claim = write_mem_claim(tmp_path)
    uri = pg.create("claims")
    verdicts = []
    for _ in range(2):
        out = _avlab(["reproduce", str(claim), "--seeds", "2", "--tracking-uri", uri, *TINY_RUN], tmp_path / "home")
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        latest = max((tmp_path / "home" / "reports" / "claims").iterdir())
        (entry,) = json.loads((latest / "verdicts.json").read_text())["claims"]
        verdicts.append((entry["verdict"], [r["values"] for r in entry["rows"]]))
    assert verdicts[0] == verdicts[1] and [len(v) for v in verdicts[0][1]] == [2, 2]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`avlab.kind` = 'trial'")
    launchers = sorted(r.data.tags["avlab.launcher"] for r in runs)
    assert launchers == ["trial"] * 4  # the second time decided from the first's finished sweep: nothing trained


@pytest.mark.slow
def test_the_database_away_for_several_epochs_loses_and_repeats_nothing(tmp_path):
    """A sweep tracking straight into PostgreSQL while the database server is down for several
    epochs (stopped as a crash would, then started on the same data): training goes on, each trial
    says once that the store is away and once that it is back, every epoch's metrics arrive once,
    and every run ends FINISHED."""
    import re
    import time

    import faults

    epochs = 8
    space = tmp_path / "space.yaml"
    space.write_text("base:\n  preset: tiny\ngrid:\n  method.memory_size: [10]\nseeds: 1\n"
                     "metric: image_h_linear_acc\nmode: max\nresources: {workers: 1, cpus_per_worker: 1}\n"
                     "max_concurrent: 1\n")
    run = [f"train.epochs={epochs}", "train.batch_size=64", "data.paired_size=640", "data.unpaired_sound_size=0",
           "data.unpaired_image_size=0", "data.train_size=100", "data.test_size=60", "data.transfer_train_size=0",
           "data.transfer_test_size=0"]
    with postgres.running() as database:
        uri = database.create("away")
        log = tmp_path / "sweep.log"
        proc = faults.start(["sweep", str(space), "--name", "away", "--home", str(tmp_path / "home"),
                             "--tracking-uri", uri, *run], log, tmp_path)
        try:
            from mlflow.tracking import MlflowClient

            def first_epoch_logged() -> bool:
                return any(MlflowClient(uri).get_metric_history(r.info.run_id, "loss") for r in _trials(uri, "away"))

            faults.wait_for(first_epoch_logged, timeout=300, what="the trial's first epoch in PostgreSQL", proc=proc,
                            log=log)
            database.stop()
            down = log.read_text()
            time.sleep(25)
            during = log.read_text()[len(down):]
            database.start()
            assert proc.wait(timeout=600) == 0, log.read_text()[-5000:]
        finally:
            if proc.poll() is None:
                faults.kill_node(proc)
        assert re.search(r"epoch \d+/%d" % epochs, during), during  # training went on
        text = log.read_text()
        away = [line for line in text.splitlines() if "unreachable" in line]
        back = [line for line in text.splitlines() if "is back after" in line]
        assert len(away) == 1 and len(back) == 1, text[-5000:]
        where = f"tracking database avlab@127.0.0.1:{database.port}"
        assert re.search(rf"{where} unreachable \((connection refused|the server closed the connection)\)", away[0]), away
        assert where in back[0], back
        assert "Traceback" not in text and "ERROR" not in text, text[-5000:]  # one line, not a traceback per query
        assert f"see it in MLflow: {AVLAB} ui --tracking-uri {uri}" in text
        (trial,) = _trials(uri, "away")
        client = MlflowClient(uri)
        assert trial.info.status == "FINISHED"
        for key in ("loss", "epoch_time_s", "lr"):
            steps = [m.step for m in client.get_metric_history(trial.info.run_id, key)]
            assert steps == list(range(epochs)), (key, steps)
        parent = client.get_run(trial.data.tags["mlflow.parentRunId"])
        assert parent.info.status == "FINISHED"
