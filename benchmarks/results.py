"""What every benchmark script shares: the commit it measured and ``record``, which makes its section of
``benchmarks/RESULTS.md`` the current answer and moves the answer it replaces to ``RESULTS-history.md``."""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
HISTORY = ROOT / "benchmarks" / "RESULTS-history.md"


def commit() -> str:
    """The short hash of the checked-out commit ("unknown" outside a git checkout)."""
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def _section_starts(lines: list[str]) -> list[int]:
    """Indices of the ``## `` heading lines, code blocks left out."""
    starts, fenced = [], False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("## "):
            starts.append(i)
    return starts


def record(title: str, text: str) -> None:
    """Make ``text`` the ``## title`` section of RESULTS.md.

    A section of that title is replaced in place (up to the next ``## `` heading), and its old text
    is appended to RESULTS-history.md under ``## title (superseded YYYY-MM-DD)``. Without one, the
    section is appended at the end of RESULTS.md.
    """
    heading = f"## {title}"
    body = text.strip("\n")
    lines = RESULTS.read_text().splitlines() if RESULTS.exists() else ["# Benchmark results"]
    starts = _section_starts(lines)
    at = next((i for i in starts if lines[i].rstrip() == heading), None)
    if at is None:
        while lines and not lines[-1].strip():
            lines.pop()
        RESULTS.write_text("\n".join([*lines, "", heading, "", body]) + "\n")
        return
    end = next((i for i in starts if i > at), len(lines))
    old = "\n".join(lines[at + 1:end]).strip("\n")
    rest = lines[end:]
    RESULTS.write_text("\n".join([*lines[:at], heading, "", body, *([""] + rest if rest else [])]) + "\n")
    history = HISTORY.read_text().rstrip("\n") if HISTORY.exists() else "# Benchmark results: history"
    HISTORY.write_text(f"{history}\n\n## {title} (superseded {dt.date.today().isoformat()})\n\n{old}\n")
