"""``avlab report NAME``: a sweep's table and plot, as a table, Markdown or JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXTRA_ARGS, WRITES_HOME, DRIVES_JOB = None, False, False


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    report = sub.add_parser("report", parents=[common], help="an ablation's table and plot")
    report.add_argument("name")
    report.add_argument("--format", choices=("table", "markdown", "json"), default="table")
    report.add_argument("--out", help="also write report.md / report.json / report.png here")
    report.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from orchestrator import tracking
    from orchestrator.report import build_report, to_markdown, to_table, write_report

    _, client = tracking.open_home_store(args.home, args.tracking_uri)
    from orchestrator.report import _sweep

    parent = _sweep(client, args.name)  # ConfigError for a name no sweep has
    if parent.data.tags.get("avlab.dry_run"):  # nothing trained: where it ran
        from orchestrator.dry_run import finish

        return 1 if finish(client, args.name, parent.info.run_id) else 0
    report = build_report(client, args.name)
    if args.out:
        paths = write_report(client, args.name, Path(args.out))
        print(f"[avlab] wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    if args.format == "json":
        print(json.dumps(report, indent=2, sort_keys=True))
    elif args.format == "markdown":
        print(to_markdown(report))
    else:
        print(to_table(report))
    return 0
