"""``avlab sweep``: run an ablation, a search space's trials on Ray Tune."""

from __future__ import annotations

import argparse

from orchestrator.commands.options import add_job_flags

EXTRA_ARGS, WRITES_HOME, DRIVES_JOB = "overrides", True, True


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    sweep = sub.add_parser("sweep", parents=[common], help="run an ablation: a search space on Ray Tune")
    sweep.add_argument("search_space", metavar="SEARCH_SPACE.yaml")
    sweep.add_argument("overrides", nargs="*", metavar="key.path=value", help="applied to every trial")
    sweep.add_argument("--preset", help="replaces the search space's base preset")
    sweep.add_argument("--name", help="sweep name (default: <search space>-<time>)")
    sweep.add_argument("--max-concurrent", type=int, help="trials at once (default: the search space's)")
    sweep.add_argument("--seeds", type=int, help="seeds per configuration (default: the search space's)")
    sweep.add_argument("--reuse-trials", action="store_true",
                       help="a trial whose resolved config and seed equal a finished trial of another sweep in "
                            "the store takes its results instead of training (tagged avlab.reused_from)")
    sweep.add_argument("--reuse-across-environments", action="store_true",
                       help="with --reuse-trials: also take trials computed in another environment (CPU "
                            "dispatch, library versions; tag avlab.env.id), whose last digits may differ")
    sweep.add_argument("--dry-run", type=float, metavar="SECONDS",
                       help="train nothing: each trial holds its resources SECONDS and records where its workers "
                            "ran (node, GPU ids, DDP rank); the end checks that against what the trials asked for "
                            "(a placement check of a cluster before it spends GPU hours)")
    add_job_flags(sweep)
    sweep.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from orchestrator.service import start_sweep

    return start_sweep(args.search_space, seeds=args.seeds, preset=args.preset, overrides=args.overrides,
                       name=args.name, home_arg=args.home, tracking_uri=args.tracking_uri, address=args.address,
                       max_concurrent=args.max_concurrent, reuse_trials=args.reuse_trials,
                       reuse_any_environment=args.reuse_across_environments,
                       ray_dashboard=args.ray_dashboard, dry_run_s=args.dry_run)
