"""``avlab check-cluster FILE...``: the cluster recipes' placeholders, found before a cluster starts.

``cluster.yaml`` (Ray's launcher on AWS), ``cluster-kuberay.yaml`` (KubeRay) and
``cluster-slurm.sbatch`` ship with values only the user can give (an EFS id, an AMI, an image
registry). Left unfilled, they fail late and far away: a mount error on a node minutes after
``ray up``, a pod that cannot pull its image. This check reads the files and exits 2 naming the
first placeholder's file, line and value, so ``avlab check-cluster cluster.yaml && ray up
cluster.yaml`` stops at once.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from orchestrator.errors import ConfigError

# What the shipped recipes leave for the user to fill in.
PLACEHOLDERS = (
    (re.compile(r"\bfs-X{8}\b"), "the id of your EFS file system"),
    (re.compile(r"\bami-X{8,}\b"), "a GPU AMI of your region"),
    (re.compile(r"\bREGISTRY/"), "your image registry"),
)


def placeholders(path: Path) -> list[tuple[int, str, str]]:
    """(line number, placeholder, what it stands for) of every unfilled value outside comments."""
    found = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        code = line.split("#", 1)[0]
        for pattern, meaning in PLACEHOLDERS:
            match = pattern.search(code)
            if match:
                found.append((number, match.group(0), meaning))
    return found


def cmd_check_cluster(args: argparse.Namespace) -> int:
    for name in args.files:
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"{name}: no such file")
        found = placeholders(path)
        if found:
            number, value, meaning = found[0]
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            raise ConfigError(f"{name}:{number}: {value} is a placeholder for {meaning}; fill it in{more}")
    print(f"[avlab] no placeholders left in {', '.join(args.files)}")
    return 0


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("check-cluster", parents=[common],
                       help="find the placeholders a cluster recipe still holds (before `ray up` / kubectl apply)")
    p.add_argument("files", nargs="+", metavar="FILE", help="cluster.yaml, cluster-kuberay.yaml, ...")
    p.set_defaults(func=cmd_check_cluster)
