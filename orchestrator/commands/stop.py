"""``avlab stop NAME``: stop a running sweep or run, local or submitted; ``avlab resume`` continues it."""

from __future__ import annotations

import argparse

EXTRA_ARGS, WRITES_HOME, DRIVES_JOB = None, False, False


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from orchestrator.stop import STOP_TIMEOUT_S

    p = sub.add_parser("stop", parents=[common],
                       help="stop a running sweep or run, local or submitted; `avlab resume` continues it")
    p.add_argument("name", metavar="NAME", help="the sweep's (or run's) name")
    p.add_argument("--timeout", type=float, help=f"seconds to wait for it to stop (default {STOP_TIMEOUT_S:.0f})")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from orchestrator.stop import stop
    from orchestrator.tracking import resolve_home

    print(stop(resolve_home(args.home), args.name, args.timeout))
    return 0
