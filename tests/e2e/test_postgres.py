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
