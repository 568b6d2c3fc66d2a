"""``avlab reproduce``: decide the papers' claims, running (or reusing) their sweeps, and report verdicts."""

from __future__ import annotations

import argparse

from orchestrator.commands.options import add_job_flags

EXTRA_ARGS, WRITES_HOME, DRIVES_JOB = "items", True, True


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    reproduce = sub.add_parser("reproduce", parents=[common],
                               help="decide the papers' claims: run (or reuse) their sweeps, then report verdicts")
    reproduce.add_argument("items", nargs="*", metavar="[CLAIM.yaml ...] [key.path=value ...]",
                           help="claim files (claims/*.yaml), then overrides applied to every trial")
    reproduce.add_argument("--all", action="store_true", help="every claim in claims/")
    reproduce.add_argument("--preset", help="tiny, small or paper (replaces each search space's base preset)")
    reproduce.add_argument("--seeds", type=int, help="seeds per configuration (default: each search space's)")
    reproduce.add_argument("--data", metavar="MANIFEST", help="a real dataset's manifest (data.manifest)")
    reproduce.add_argument("--finished-only", action="store_true",
                           help="run nothing: decide the claims whose sweeps have finished, list the others")
    reproduce.add_argument("--retry-failed", action="store_true",
                           help="a claim's sweep that ended with failed trials trains them again (see `avlab resume`)")
    reproduce.add_argument("--until-decided", action="store_true",
                           help="add seeds in rounds (as many as --seeds each, 3 by default) to the claims still "
                                "inconclusive, up to --max-seeds; every look tests at 5 %% over the planned looks")
    reproduce.add_argument("--max-seeds", type=int, metavar="K", help="with --until-decided: the most seeds a claim takes")
    reproduce.add_argument("--reuse-across-environments", action="store_true",
                           help="decide from sweeps and trials computed in another environment too (tag "
                                "avlab.env.id); the verdicts say which")
    add_job_flags(reproduce)
    reproduce.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from orchestrator.errors import ConfigError
    from orchestrator.reproduce import Request, reproduce, until_decided

    if args.max_seeds is not None and not args.until_decided:
        raise ConfigError("--max-seeds: the budget of --until-decided; add --until-decided or drop it")
    request = Request(
        claims=tuple(i for i in args.items if "=" not in i), every=args.all,
        overrides=tuple(i for i in args.items if "=" in i), preset=args.preset, seeds=args.seeds, data=args.data,
        finished_only=args.finished_only, retry_failed=args.retry_failed,
        reuse_any_environment=args.reuse_across_environments, max_seeds=args.max_seeds, address=args.address,
        home=args.home, tracking_uri=args.tracking_uri, ray_dashboard=args.ray_dashboard,
    )
    verdicts = until_decided(request) if args.until_decided else reproduce(request)
    if verdicts is not None:
        counts = verdicts.counts
        print()
        print(verdicts.markdown)
        print(f"[avlab] reproduce: {counts['holds']} hold, {counts['contradicted']} contradicted, "
              f"{counts['inconclusive']} inconclusive; report: {verdicts.report}")
    return 0
