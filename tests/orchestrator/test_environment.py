"""The environment a run's numbers were computed in: what is recorded, what its id covers, and
what a report says when the runs it compares ran in different environments."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

from orchestrator import environment
from orchestrator.report import to_markdown

from conftest import ROOT


def _describe(**env: str) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-m", "orchestrator.environment"], cwd=ROOT, capture_output=True,
                         text=True, check=True, env={**__import__("os").environ, **env})
    return json.loads(out.stdout)


def test_the_environment_names_the_kernels_and_libraries_and_its_id_follows_what_changes_numbers():
    here = environment.describe()
    for key in ("cpu", "cpu_capability", "numpy_simd", "blas", "onednn", "python", "torch", "numpy", "sklearn",
                "torchaudio", "ray", "id"):
        assert here[key], key
    # Another process of this machine with ATen's dispatch forced down to its portable kernels:
    # every other field the same, that one said and hashed into another id.
    forced = _describe(ATEN_CPU_CAPABILITY="default")
    changed = {"cpu_capability", "overrides", "id"}
    assert {k: v for k, v in forced.items() if k not in changed} == {k: v for k, v in here.items() if k not in changed}
    assert forced["cpu_capability"] == "DEFAULT" and forced["overrides"] == "ATEN_CPU_CAPABILITY=default"
    assert forced["id"] != here["id"] or here["cpu_capability"] == "DEFAULT"
    assert environment.environment_id({k: v for k, v in forced.items() if k != "overrides"} | {
        "cpu_capability": here["cpu_capability"]}) == here["id"]  # the id is a function of the fields
    # The CPU's model name and ray's and mlflow's versions are recorded, but change no number.
    assert environment.environment_id({**here, "cpu": "another", "ray": "0", "mlflow": "0"}) == here["id"]
    assert environment.environment_id({**here, "numpy": "0"}) != here["id"]


def _run(env_id: str | None, capability: str = "AVX2") -> SimpleNamespace:
    tags = {} if env_id is None else {"avlab.env.id": env_id, "avlab.env.cpu_capability": capability,
                                      "avlab.env.torch": "2.14.1", "avlab.env.cpu": "Some CPU"}
    return SimpleNamespace(data=SimpleNamespace(tags=tags))


def test_a_report_says_when_its_rows_ran_in_different_environments():
    assert environment.summary([_run("a"), _run("a")]) is None
    line = environment.summary([_run("a"), _run("b", "AVX512"), _run("b", "AVX512"), _run(None)])
    assert line.startswith("The runs compared here ran in 3 environments")
    assert "1 in a: AVX2" in line and "2 in b: AVX512" in line and "1 in not recorded" in line
    report = {"sweep": "s", "search_space": "x.yaml", "rows": [], "metric": "m", "mode": "max", "best": None,
              "environments": line}
    assert line in to_markdown(report)
