"""A method is one file: the example of docs/adding-a-method.md, written into a copy of the project
as its only new module plus one registry line and a search space, runs end to end with
`avlab run --preset tiny` and a 2-point `avlab sweep` over its own config field, with its own
training metric as the sweep's objective. Nothing in orchestrator/ changes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import AVLAB, ROOT
CUT = [  # the tiny preset cut to seconds
    "train.epochs=1", "train.batch_size=32", "data.paired_size=128", "data.train_size=60",
    "data.test_size=40", "data.transfer_train_size=0", "data.transfer_test_size=0",
]


def _doc_blocks(language: str) -> list[str]:
    text = (ROOT / "docs" / "adding-a-method.md").read_text()
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def _project_with_the_toy_method(dest: Path) -> Path:
    for folder in ("methods", "orchestrator", "search_spaces"):
        shutil.copytree(ROOT / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__"))
    module, registry_line = _doc_blocks("python")[:2]
    (dest / "methods" / "mymethod.py").write_text(module)  # the one new file
    registry = dest / "methods" / "registry.py"
    text = registry.read_text()
    entry = next(line for line in registry_line.splitlines() if '"mymethod"' in line)
    text = text.replace("from methods import avid,", "from methods import mymethod, avid,", 1)
    text = text.replace("\n}\n", f"\n{entry}\n}}\n", 1)  # the one registry line, at the end of METHODS
    registry.write_text(text)
    (dest / "search_spaces" / "mymethod_temperature.yaml").write_text(_doc_blocks("yaml")[0])
    return dest


def _changed_files(project: Path) -> set[str]:
    """Files of the copy that differ from the project's, or are new."""
    changed = set()
    for path in project.rglob("*"):
        rel = path.relative_to(project)
        if path.is_file() and "__pycache__" not in rel.parts:
            original = ROOT / rel
            if not original.exists() or original.read_bytes() != path.read_bytes():
                changed.add(str(rel))
    return changed


def _run(args: list[str], project: Path, home: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(PYTHONPATH=str(project), RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    return subprocess.run([AVLAB, *args, "--home", str(home)], cwd=project, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow
def test_the_documented_toy_method_runs_and_sweeps_with_one_new_file(tmp_path):
    project = _project_with_the_toy_method(tmp_path / "project")
    home = tmp_path / "home"
    assert _changed_files(project) == {"methods/mymethod.py", "methods/registry.py", "search_spaces/mymethod_temperature.yaml"}
    before = (ROOT / "methods" / "registry.py").read_text().splitlines()
    after = (project / "methods" / "registry.py").read_text().splitlines()
    assert len(after) == len(before) + 1 and len(set(after) - set(before)) == 2  # the registry line; the import

    run = _run(["run", "--preset", "tiny", "method.name=mymethod", "tracking.run_name=toy", *CUT], project, home)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "image_h_linear_acc" in run.stdout

    sweep = _run(["sweep", "search_spaces/mymethod_temperature.yaml", "--name", "toy-sweep", *CUT], project, home)
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
    assert "metric pair_cos (max)" in sweep.stdout
    assert "method.temperature=0.05" in sweep.stdout and "method.temperature=0.2" in sweep.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    trials = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
              if r.data.tags.get("avlab.kind") == "trial"]
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials)
    assert all(-1.0 <= r.data.metrics["pair_cos"] <= 1.0 for r in trials)
    assert {r.data.params["varied.method.temperature"] for r in trials} == {"0.05", "0.2"}
