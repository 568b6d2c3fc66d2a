"""benchmarks/RESULTS.md is one current results page: a benchmark's ``record`` replaces the section of
its question in place and moves the old text to RESULTS-history.md, and the page names each
question once."""

from __future__ import annotations

import datetime as dt
import importlib.util
from pathlib import Path

import pytest

from conftest import ROOT

_spec = importlib.util.spec_from_file_location("benchmark_results", ROOT / "benchmarks" / "results.py")
results = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(results)

PAGE = """# Benchmark results

Intro.

## Sweep efficiency (demo sweep)

Measured 2026-12-02: old sweep table.

```bash
## not a heading: inside a code block
```

### A subsection of the sweep

Old detail.

## Test suite: count and wall time of `make test`

Measured 2026-12-03: 670 passed.
"""


def headings(text: str, prefix: str = "## ") -> list[str]:
    out, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith(prefix):
            out.append(line)
    return out


@pytest.fixture
def page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    current, history = tmp_path / "RESULTS.md", tmp_path / "RESULTS-history.md"
    current.write_text(PAGE)
    history.write_text("# Benchmark results: history\n\nOlder entries.\n")
    monkeypatch.setattr(results, "RESULTS", current)
    monkeypatch.setattr(results, "HISTORY", history)
    return current, history


def test_a_new_title_is_appended_at_the_end(page: tuple[Path, Path]) -> None:
    current, history = page
    history_before = history.read_text()
    results.record("Probe convergence", "Measured today: a table.")
    assert current.read_text() == PAGE + "\n## Probe convergence\n\nMeasured today: a table.\n"
    assert history.read_text() == history_before


def test_an_existing_title_is_replaced_in_place_and_its_old_text_moves_to_the_history(page: tuple[Path, Path]) -> None:
    current, history = page
    results.record("Sweep efficiency (demo sweep)", "Measured today: the new sweep table.\n")
    text = current.read_text()
    assert headings(text) == ["## Sweep efficiency (demo sweep)", "## Test suite: count and wall time of `make test`"]
    assert text == (
        "# Benchmark results\n\nIntro.\n\n"
        "## Sweep efficiency (demo sweep)\n\nMeasured today: the new sweep table.\n\n"
        "## Test suite: count and wall time of `make test`\n\nMeasured 2026-12-03: 670 passed.\n"
    )
    today = dt.date.today().isoformat()
    moved = history.read_text()
    assert moved.startswith("# Benchmark results: history\n\nOlder entries.\n")
    assert moved.endswith(
        f"\n## Sweep efficiency (demo sweep) (superseded {today})\n\n"
        "Measured 2026-12-02: old sweep table.\n\n```bash\n## not a heading: inside a code block\n```\n\n"
        "### A subsection of the sweep\n\nOld detail.\n"
    )


def test_the_last_section_is_replaced_too(page: tuple[Path, Path]) -> None:
    current, history = page
    results.record("Test suite: count and wall time of `make test`", "Measured today: 700 passed.")
    assert current.read_text().endswith(
        "Old detail.\n\n## Test suite: count and wall time of `make test`\n\nMeasured today: 700 passed.\n"
    )
    assert current.read_text().startswith(PAGE.split("## Test suite")[0])
    assert history.read_text().endswith(
        f"## Test suite: count and wall time of `make test` (superseded {dt.date.today().isoformat()})\n\n"
        "Measured 2026-12-03: 670 passed.\n"
    )


def test_the_results_page_names_each_question_once_and_no_issue() -> None:
    text = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    sections = headings(text)
    assert sections, "no ## sections in benchmarks/RESULTS.md"
    assert sorted(h for h in set(sections) if sections.count(h) > 1) == []
    assert [h for h in headings(text, "#") if "issue" in h.lower()] == []
