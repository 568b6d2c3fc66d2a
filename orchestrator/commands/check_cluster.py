"""``avlab check-cluster FILE...``: the placeholders a cluster recipe still holds."""

from __future__ import annotations

import argparse
from pathlib import Path

from orchestrator.errors import ConfigError

EXTRA_ARGS, WRITES_HOME, DRIVES_JOB = None, False, False


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("check-cluster", parents=[common],
                       help="find the placeholders a cluster recipe still holds (before `ray up` / kubectl apply)")
    p.add_argument("files", nargs="+", metavar="FILE", help="cluster.yaml, cluster-kuberay.yaml, ...")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from orchestrator.cluster_files import placeholders

    for name in args.files:
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"{name}: no such file")
        found = placeholders(path, name)
        if found:
            number, value, meaning = found[0]
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            raise ConfigError(f"{name}:{number}: {value} is a placeholder for {meaning}; fill it in{more}")
    print(f"[avlab] no placeholders left in {', '.join(args.files)}")
    return 0
