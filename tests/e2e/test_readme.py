"""The README's tour runs as written: every `.venv/bin/avlab` command of its "six commands"
section, in its order, on one fresh home, cut down where it trains (the tiny run of the tests
appended), `avlab ui` on a free port until it prints its links."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time

import pytest

import faults
from conftest import AVLAB, ROOT, TINY_RUN, default_sigint

TRAINS = ("run", "sweep", "reproduce")


def _tour() -> list[list[str]]:
    """The tour's commands, as argument lists, in the README's order."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## The six commands to know", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith(".venv/bin/avlab "):
                commands.append(shlex.split(line)[1:])
    return commands


def test_the_tour_names_the_six_commands():
    assert [c[0] for c in _tour()] == ["run", "sweep", "status", "report", "ui", "resume", "reproduce"]


@pytest.mark.slow
def test_the_readme_tour_runs_as_written(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(AVLAB_HOME=str(tmp_path / "home"), RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    default_home = ROOT / "avlab-runs"
    had_default_home = default_home.exists()
    for argv in _tour():
        if argv[0] == "ui":
            port = faults.free_port()
            log = tmp_path / "ui.log"
            with log.open("w") as out:
                proc = subprocess.Popen([AVLAB, *argv, "--port", str(port)], cwd=ROOT, env=env, stdout=out,
                                        stderr=subprocess.STDOUT, preexec_fn=default_sigint)
            try:
                deadline = time.monotonic() + 180
                while "MLflow UI at" not in log.read_text():
                    assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                    time.sleep(0.5)
                assert f"http://127.0.0.1:{port}" in log.read_text()
            finally:
                proc.send_signal(signal.SIGINT)
                assert proc.wait(60) == 0, log.read_text()[-3000:]
            continue
        # One seed: the claim's sweep then reuses every trial of the tour's sweep (same configs and seeds).
        extra = [*(["--seeds", "1"] if argv[0] in ("sweep", "reproduce") else []), *TINY_RUN] if argv[0] in TRAINS else []
        out = subprocess.run([AVLAB, *argv, *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, f"avlab {' '.join(argv)}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        if argv[0] == "reproduce":
            assert "bma_fig6_memory_plateau" in out.stdout and "reused" in out.stdout, out.stdout[-3000:]
    assert (tmp_path / "home" / "mlflow.db").is_file()
    assert default_home.exists() == had_default_home  # $AVLAB_HOME is where everything went
