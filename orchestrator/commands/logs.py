"""``avlab logs NAME``: the output of a submitted sweep's Ray job (``--follow``: until it ends)."""

from __future__ import annotations

import argparse
import sys

from orchestrator.commands.options import cluster_errors_exit_1

EXTRA_ARGS, WRITES_HOME, DRIVES_JOB = None, False, False


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    logs = sub.add_parser("logs", parents=[common], help="the output of a submitted sweep's Ray job")
    logs.add_argument("name", metavar="NAME", help="a submitted sweep's name, or a Ray job id with --address")
    logs.add_argument("--follow", action="store_true", help="keep printing until the job ends")
    logs.add_argument("--address", metavar="http://HEAD:8265",
                      help="the dashboard (default: the one the sweep was submitted to)")
    logs.set_defaults(func=cluster_errors_exit_1(main))


def main(args: argparse.Namespace) -> int:
    """Exit 0 if the job succeeded or is still running, 1 if it failed or was stopped."""
    from orchestrator.submit import TERMINAL, logs
    from orchestrator.tracking import resolve_home

    job_id, status = logs(resolve_home(args.home), args.name, address=args.address, follow=args.follow)
    if status in TERMINAL or args.follow:
        print(f"[avlab] Ray job {job_id}: {status}", file=sys.stderr)
    return 1 if status in ("FAILED", "STOPPED") else 0
