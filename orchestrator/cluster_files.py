"""``avlab check-cluster FILE...``: the cluster recipes' placeholders, found before a cluster starts.

``cluster.yaml`` (Ray's launcher on AWS), ``cluster-kuberay.yaml`` (KubeRay) and
``cluster-slurm.sbatch`` ship with values only the user can give (an EFS id, an AMI, an image
registry). Left unfilled, they fail late and far away: a mount error on a node minutes after
``ray up``, a pod that cannot pull its image. This check reads the files and exits 2 naming the
first placeholder's file, line and value, so ``avlab check-cluster cluster.yaml && ray up
cluster.yaml`` stops at once.
"""

from __future__ import annotations

import re
from pathlib import Path

from orchestrator.errors import ConfigError

# What the shipped recipes leave for the user to fill in.
PLACEHOLDERS = (
    (re.compile(r"\bfs-X{8}\b"), "the id of your EFS file system"),
    (re.compile(r"\bami-X{8,}\b"), "a GPU AMI of your region"),
    (re.compile(r"\bREGISTRY/"), "your image registry"),
    (re.compile(r"\bPOSTGRES_HOST\b"), "the host of your PostgreSQL server"),
)


def _code(line: str) -> str:
    """``line`` without its comment. In YAML and in shell alike a comment starts with a ``#`` at
    the start of the line or after a blank, outside quotes; a ``#`` inside a quoted string or a
    word (``"a # b"``, ``$#``, ``${#nodes[@]}``) is part of the value. An apostrophe inside a word
    (``don't``) opens no quote."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            if ch == quote and not (quote == '"' and _escaped(line, i)):  # \" inside "..." goes on
                quote = ""
        elif ch == '"' or (ch == "'" and not (i and line[i - 1].isalnum())):
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def _escaped(line: str, i: int) -> bool:
    """Whether ``line[i]`` follows an odd number of backslashes."""
    n = 0
    while i - n - 1 >= 0 and line[i - n - 1] == "\\":
        n += 1
    return n % 2 == 1


def _text(path: Path, name: str) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{name}: cannot be read ({exc.strerror})") from None
    if b"\0" in data:
        raise ConfigError(f"{name}: not a text file (it holds NUL bytes); give a cluster recipe")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None


def placeholders(path: Path, name: str | None = None) -> list[tuple[int, str, str]]:
    """(line number, placeholder, what it stands for) of every unfilled value outside comments;
    a file that is not UTF-8 text is a ConfigError naming it (as ``name``)."""
    found = []
    for number, line in enumerate(_text(path, name or str(path)).splitlines(), start=1):
        code = _code(line)
        for pattern, meaning in PLACEHOLDERS:
            match = pattern.search(code)
            if match:
                found.append((number, match.group(0), meaning))
    return found
