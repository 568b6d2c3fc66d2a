"""``avlab export NAME --out DIR``: a run's or a sweep's encoders (safetensors + JSON) in a folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXTRA_ARGS, WRITES_HOME, DRIVES_JOB = None, False, False


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("export", parents=[common],
                       help="copy a run's or a sweep's encoders (safetensors + JSON) into a folder")
    p.add_argument("name", metavar="RUN|SWEEP", help="a run id, a run name, or a sweep name (its finished trials)")
    p.add_argument("--out", required=True, metavar="DIR", help="one folder per run is written here")
    p.add_argument("--best", action="store_true",
                   help="only the sweep's best trial by its metric, registered as <sweep>.image_encoder / "
                        "<sweep>.sound_encoder in the MLflow model registry")
    p.add_argument("--alias", help="with --best: the registered versions' alias (default: best)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from orchestrator.export import export, registered_name
    from orchestrator.tracking import open_home_store

    _, client = open_home_store(args.home, args.tracking_uri)
    folders = export(client, args.name, Path(args.out), best=args.best, alias=args.alias)
    for folder in folders:
        print(folder)
    if args.best:
        print(f"[avlab] registered {registered_name(args.name, 'image')} and {registered_name(args.name, 'sound')} "
              f"@{args.alias or 'best'}", file=sys.stderr)
    return 0
