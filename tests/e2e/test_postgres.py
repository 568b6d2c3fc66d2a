"""avlab on a real PostgreSQL store (a throw-away cluster on loopback, tests/postgres.py): a run
tracked into it, and the one-line errors for a database that is not there, before anything starts."""

from __future__ import annotations

import os
import subprocess

import pytest

import postgres
from conftest import AVLAB, ROOT, TINY_RUN

pytestmark = pytest.mark.skipif(postgres.binaries() is None, reason=postgres.MISSING)


@pytest.fixture(scope="module")
def server():
    with postgres.cluster() as uri:
        yield uri


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


@pytest.mark.slow
def test_a_run_tracked_into_postgresql_finishes_with_its_metrics(server, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"{server}/mlflow"
    out = _avlab(["run", "--tracking-uri", uri, *TINY_RUN, "tracking.run_name=on-postgres"], tmp_path / "home")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client = MlflowClient(uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
            if r.info.run_name == "on-postgres"]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert "image_h_linear_acc" in runs[0].data.metrics and "train_time_s" in runs[0].data.metrics


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
