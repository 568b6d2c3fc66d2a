"""``avlab resume NAME``: continue an interrupted run or sweep where it stopped."""

from __future__ import annotations

import argparse

from orchestrator.commands.options import add_job_flags

EXTRA_ARGS, WRITES_HOME, DRIVES_JOB = None, True, True


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    resume = sub.add_parser("resume", parents=[common], help="continue an interrupted run or sweep where it stopped")
    resume.add_argument("name", metavar="NAME", help="the run's or sweep's name")
    resume.add_argument("--retry-failed", action="store_true",
                        help="train again the trials (or the run) that a deterministic error ended, once its cause "
                             "is fixed: they continue from their last checkpoint; finished trials stay as they are")
    add_job_flags(resume, address_help="Ray cluster address (default: the one the job started with)")
    resume.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from orchestrator.service import resume

    return resume(args.name, home_arg=args.home, tracking_uri=args.tracking_uri, address=args.address,
                  retry_failed=args.retry_failed, ray_dashboard=args.ray_dashboard)
