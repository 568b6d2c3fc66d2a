"""``avlab submit SEARCH_SPACE.yaml --address http://HEAD:8265``: a sweep as a Ray job on a running cluster."""

from __future__ import annotations

import argparse

from orchestrator.commands.options import cluster_errors_exit_1

EXTRA_ARGS, WRITES_HOME, DRIVES_JOB = "overrides", True, False


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    submit = sub.add_parser("submit", parents=[common], help="run a sweep as a Ray job on a running cluster")
    submit.add_argument("search_space", metavar="SEARCH_SPACE.yaml")
    submit.add_argument("overrides", nargs="*", metavar="key.path=value", help="applied to every trial")
    submit.add_argument("--address", required=True, metavar="http://HEAD:8265",
                        help="the cluster's dashboard (Ray Jobs API) address")
    submit.add_argument("--name", help="sweep name (default: <search space>-<time>)")
    submit.add_argument("--preset", help="replaces the search space's base preset")
    submit.add_argument("--max-concurrent", type=int, help="trials at once (default: the search space's)")
    submit.add_argument("--seeds", type=int, help="seeds per configuration (default: the search space's)")
    submit.add_argument("--reuse-trials", action="store_true",
                        help="as avlab sweep --reuse-trials: identical finished trials are not trained again")
    submit.add_argument("--dry-run", type=float, metavar="SECONDS",
                        help="as avlab sweep --dry-run: the trials train nothing and record where they ran")
    submit.set_defaults(func=cluster_errors_exit_1(main))


def main(args: argparse.Namespace) -> int:
    from orchestrator.submit import Submission, submit

    name, trials, job_id = submit(Submission(
        search_space=args.search_space, address=args.address, overrides=tuple(args.overrides), name=args.name,
        preset=args.preset, max_concurrent=args.max_concurrent, seeds=args.seeds, reuse_trials=args.reuse_trials,
        home=args.home, tracking_uri=args.tracking_uri, dry_run_s=args.dry_run,
    ))
    address = args.address.rstrip("/")
    print(f"[avlab] submitted sweep {name} ({trials} trials) to {address} as Ray job {job_id}")
    print(f"[avlab] follow it: avlab logs {name} --follow   |   avlab status {name}   |   dashboard: {address}")
    return 0
