"""``avlab status NAME``: a sweep's trial states and its best trial so far."""

from __future__ import annotations

import argparse

from orchestrator.errors import ConfigError

EXTRA_ARGS, WRITES_HOME, DRIVES_JOB = None, False, False


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    status = sub.add_parser("status", parents=[common], help="trial states of a sweep and the best so far")
    status.add_argument("name")
    status.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from orchestrator import tracking
    from orchestrator.report import status_lines
    from orchestrator.submit import job_status_lines

    job = job_status_lines(tracking.resolve_home(args.home), args.name)  # a sweep sent by `avlab submit`
    if job is not None:
        print("\n".join(job))
    try:
        _, client = tracking.open_home_store(args.home, args.tracking_uri)
        print("\n".join(status_lines(client, args.name)))
    except ConfigError:
        if job is None:
            raise
        print(f"no trials of {args.name} in this MLflow store yet (the cluster's store may be elsewhere)")
    return 0
