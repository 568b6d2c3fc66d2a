"""The documentation site: its reference pages are what the code generates now, and it builds
with every link and page resolved (``mkdocs build --strict``)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import config, reference

from conftest import ROOT


def test_the_committed_reference_pages_are_what_the_code_generates():
    stale = reference.stale()
    assert not stale, (f"docs/reference/ is stale ({', '.join(stale)}): run "
                       "`.venv/bin/python -m orchestrator.reference` and commit the pages")


def test_a_config_field_added_without_regenerating_makes_the_reference_stale(monkeypatch, tmp_path):
    reference.write(tmp_path)
    assert reference.stale(tmp_path) == []
    grown = dataclasses.make_dataclass("TrainConfig", [("warmup_steps", int, dataclasses.field(default=0))],
                                       bases=(config.TrainConfig,), frozen=True)
    monkeypatch.setattr(config, "TrainConfig", grown)  # how ExperimentConfig's `train` annotation resolves
    assert reference.stale(tmp_path) == ["config.md"]
    assert "| `train.warmup_steps` | `int` | `0` |" in reference.config_page()


def test_the_config_reference_gives_presets_and_checks_of_every_field():
    page = reference.config_page()
    rows = {line.split(" | ")[0].strip("| `"): line for line in page.splitlines() if line.startswith("| `")}
    for section in ("data", "train", "optim", "eval", "resources", "tracking"):
        owner = type(getattr(config.resolve(), section))
        for f in dataclasses.fields(owner):
            assert f"{section}.{f.name}" in rows, f"{section}.{f.name} missing from the config reference"
    # A preset's value, and a check read from the dataclass's own error message.
    assert "| `data.image_size` | `int` | `32` | `32` | `32` | `224` |" in rows["data.image_size"]
    assert rows["optim.lr"].rstrip(" |").endswith("must be positive")
    for name in ("bma", "avid", "l3", "multissl", "supervised"):
        assert f"`method.name: {name}`" in page


def test_the_cli_reference_lists_every_command_and_flag():
    from orchestrator.cli import build_parser

    page = reference.cli_page()
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name, parser in sub.choices.items():
        assert f"## avlab {name}\n" in page
        for action in parser._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}" in page or f", {flag}" in page, f"avlab {name} {flag}"


@pytest.mark.skipif(not (Path(sys.executable).parent / "mkdocs").exists(), reason="pip install -e '.[dev]' (mkdocs-material)")
def test_the_site_builds_strictly(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    out = subprocess.run([str(Path(sys.executable).parent / "mkdocs"), "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    built = {p.relative_to(tmp_path / "site").as_posix() for p in (tmp_path / "site").rglob("index.html")}
    for page in ("guide/first-run/index.html", "reference/config/index.html", "methods/bma-memory/index.html"):
        assert page in built, sorted(built)
    # The equations are MathML (docs_hooks/mathml.py), not TeX waiting for a script from outside.
    method = (tmp_path / "site" / "methods" / "bma-memory" / "index.html").read_text()
    assert method.count("<math") > 10 and 'class="arithmatex"' not in method
    assert "cdn." not in method and "fonts.googleapis" not in method
