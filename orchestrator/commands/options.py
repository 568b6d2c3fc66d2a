"""What several subcommands declare alike: the flags they share and their help."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

RAY_DASHBOARD_HELP = "with a local Ray: also start its dashboard, on 127.0.0.1 (or set AVLAB_RAY_DASHBOARD=1)"
ADDRESS_HELP = "Ray cluster address (default: start a local Ray instance)"


def add_job_flags(parser: argparse.ArgumentParser, *, address_help: str = ADDRESS_HELP) -> None:
    """``--address`` and ``--ray-dashboard``, for the commands that start Ray (run, sweep, resume,
    reproduce)."""
    parser.add_argument("--address", help=address_help)
    parser.add_argument("--ray-dashboard", action="store_true", help=RAY_DASHBOARD_HELP)


def cluster_errors_exit_1(main: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``main`` with a cluster that refuses or fails a request (``submit.ClusterError``) reported
    in one line, exit 1: the input was fine, the cluster was not."""

    def run(args: argparse.Namespace) -> int:
        from orchestrator.submit import ClusterError

        try:
            return main(args)
        except ClusterError as exc:
            print(f"avlab: error: {exc}", file=sys.stderr)
            return 1

    return run
