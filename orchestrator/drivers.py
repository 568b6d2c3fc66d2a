"""The process that drives a job: as its job file records it, the test that a live process is
still that very driver, and the processes it must not leave behind when it ends.

A job file is data that anyone who can write the home can change, and a process id is reused
once its process ends. So a recorded driver is recognised only when every part agrees: a process
id that names one process (never 0, -1 or 1, which ``kill`` reads as a group, every process or
init), this host, the start time recorded for it (a later process with the same number started
later), and a command line of avlab's.

A driver that starts a local Ray is the ancestor of Ray's daemons and workers. Ray stops the
ones it started itself, but a process one of them started (the dashboard agent a raylet starts)
is orphaned when its parent stops before it has finished starting, and such a process can wait
on the stopped Ray for good. The driver therefore adopts its descendants' orphans
(``adopt_orphans``) and ends whatever of them is left when its command ends (``end_leftovers``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from orchestrator.errors import ConfigError

# Linux caps process ids at 2**22 (pid_max); no other system goes higher.
PID_MAX = 2**22
# The start time of one process, read twice, differs by the clock's rounding only.
START_TOLERANCE_S = 1.0


def driver_entry() -> dict[str, Any]:
    """What the job file records of this process, the job's driver."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
            "started": psutil.Process().create_time()}


def check_entry(entry: Any, where: Path | str) -> dict[str, Any]:
    """``entry`` if it has the shape ``driver_entry`` writes; else one line naming ``where``'s
    field. An empty entry (a job file written before drivers were recorded) is valid."""
    if entry is None or entry == {}:
        return {}
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: driver must be a mapping of pid, host and start time, got {entry!r}"[:300])
    pid = entry.get("pid")
    if type(pid) is not int or not 1 < pid <= PID_MAX:  # bool is an int: excluded by the type check
        raise ConfigError(f"{where}: driver.pid must be the id of one process (2 to {PID_MAX}), got {pid!r}"[:300])
    if not isinstance(entry.get("host"), str) or not entry["host"]:
        raise ConfigError(f"{where}: driver.host must name the machine of the driver, got {entry.get('host')!r}"[:300])
    for key in ("since", "started"):
        value = entry.get(key)
        if value is not None and (type(value) not in (int, float) or not 0 < value < 1e11):
            raise ConfigError(f"{where}: driver.{key} must be a time in seconds since 1970, got {value!r}"[:300])
    return entry


def is_here(entry: dict[str, Any]) -> bool:
    return entry.get("host") == socket.gethostname()


def is_live_driver(entry: dict[str, Any]) -> bool:
    """Whether the process ``entry`` names (checked with ``check_entry``) is alive on this host
    and is the very avlab process that wrote it, not a later process that reuses its number."""
    if not entry or not is_here(entry):
        return False
    try:
        process = psutil.Process(entry["pid"])
        created = process.create_time()
        cmdline = " ".join(process.cmdline())
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    started = entry.get("started")
    if started is not None:
        if abs(created - started) > START_TOLERANCE_S:
            return False
    elif entry.get("since") is None or created > entry["since"] + START_TOLERANCE_S:
        return False  # started after the driver wrote its entry: not the driver
    return "avlab" in cmdline or "orchestrator.cli" in cmdline


_PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
# How long a left process has to end after SIGTERM before it is killed.
LEFTOVER_GRACE_S = 5.0


def adopt_orphans() -> bool:
    """Make this process the reaper of its descendants' orphans (Linux): a process whose parent
    ends is then re-parented here instead of to init, so ``end_leftovers`` still finds it.
    Returns whether that holds."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def end_leftovers(grace_s: float = LEFTOVER_GRACE_S, *, rounds: int = 5) -> list[int]:
    """End every descendant of this process that is still running: SIGTERM, then SIGKILL after
    ``grace_s``; reap them. Called when a job command ends, after its Ray has stopped, so what is
    left is what Ray left. A process that was starting one more (a raylet stopped while it starts
    its agents) may have done so meanwhile: the descendants are looked for again until none is
    left or ``rounds`` rounds have passed. Returns the ids of the processes it ended."""
    ended: list[int] = []
    for _ in range(rounds):
        try:
            left = psutil.Process().children(recursive=True)
        except psutil.Error:
            break
        if not left:
            time.sleep(0.2)  # one look more: an orphan is re-parented here a moment after its parent ends
            if not psutil.Process().children(recursive=True):
                break
            continue
        for process in left:
            with contextlib.suppress(psutil.Error):
                process.terminate()
        _, alive = psutil.wait_procs(left, timeout=grace_s)
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(alive, timeout=grace_s)
        ended += [p.pid for p in left]
    return ended
