"""What every benchmark script shares: the commit it measured and the section it appends to
``benchmarks/RESULTS.md``."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def commit() -> str:
    """The short hash of the checked-out commit ("unknown" outside a git checkout)."""
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def append(title: str, text: str) -> None:
    """Append ``text`` under a ``## title`` heading to RESULTS.md."""
    with RESULTS.open("a") as f:
        f.write(f"\n## {title}\n\n{text}\n")
