"""``avlab results export NAME... --out DIR`` / ``avlab results import DIR``: move finished runs and
sweeps between avlab homes as a bundle of plain files."""

from __future__ import annotations

import argparse
from pathlib import Path

EXTRA_ARGS, WRITES_HOME, DRIVES_JOB = None, False, False


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    results = sub.add_parser("results", parents=[common],
                             help="move finished runs and sweeps to another home (export / import a bundle)")
    results_sub = results.add_subparsers(dest="results_command", required=True)
    out = results_sub.add_parser("export", parents=[common], help="write finished runs and sweeps, with everything they logged, "
                                                "into a new folder")
    out.add_argument("names", nargs="+", metavar="NAME", help="a run's or a sweep's name (its job name)")
    out.add_argument("--out", required=True, metavar="DIR", help="the bundle folder to create (new or empty)")
    out.set_defaults(func=main)
    into = results_sub.add_parser("import", parents=[common], help="read a bundle into this home (--home), as if it had run here")
    into.add_argument("bundle", metavar="DIR", help="a folder written by `avlab results export`")
    into.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from orchestrator import bundle, tracking

    if args.results_command == "export":
        home, client = tracking.open_home_store(args.home, args.tracking_uri)
        moved = bundle.export_bundle(home, client, args.names, Path(args.out))
        lines = bundle.summary(moved, "exported", Path(args.out))
    else:
        home = tracking.resolve_home(args.home, writable=True)
        uri = tracking.resolve_tracking_uri(home, args.tracking_uri)
        moved = bundle.import_bundle(home, uri, Path(args.bundle))
        lines = bundle.summary(moved, "imported", home)
    for line in lines:
        print(line)
    return 0
