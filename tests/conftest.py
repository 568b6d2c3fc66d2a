"""What the tests share: the project root, the installed ``avlab`` command, the cut-down run
that end-to-end tests start from, the one harness that runs code under two DDP workers, and the
order in which test files are handed to pytest-xdist's workers (the longest first)."""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

# Under pytest-xdist each worker computes with one thread: two workers on two cores, each with
# torch's default of one thread per core, run four threads that spin for two cores (a torch-heavy
# test beside another took 3-9x its time alone). Subprocesses keep their own settings.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
AVLAB = str(Path(sys.executable).parent / "avlab")

# The tiny preset cut to a run of seconds: one epoch of two steps, probes on 100 / 60 items (and a
# validation split of 60, what a search or the quick probe scores), no transfer split. Tests add what their assertion needs (more epochs, a bigger pool) after it:
# a later override of the same key wins.
TINY_RUN = [
    "train.epochs=1", "train.batch_size=64", "data.paired_size=128", "data.unpaired_sound_size=64",
    "data.unpaired_image_size=64", "data.train_size=100", "data.test_size=60", "data.val_size=60",
    "data.transfer_train_size=0", "data.transfer_test_size=0",
    "tracking.log_model=false",  # the MLflow models of the encoders: test_export checks them
]


def default_sigint() -> None:
    """In a child before exec: Ctrl-C (SIGINT) does what it does in a terminal, even when the tests
    were started in the background of a shell, whose children inherit SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _ddp_process(rank: int, world: int, init_file: str, out_dir: str, fn: Callable[[int, int], Any]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(fn(rank, world), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn_ddp(fn: Callable[[int, int], Any], world: int = 2) -> list[Any]:
    """``fn(rank, world)`` in ``world`` processes joined by a gloo process group (one thread
    each); returns what each rank returned (tensors, dicts of them), in rank order. ``fn`` must
    be a module-level function, which the spawned processes import by name."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ddp_process, args=(world, os.path.join(tmp, "init"), tmp, fn), nprocs=world, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]


@pytest.fixture(scope="session")
def ddp() -> Callable[..., list[Any]]:
    """The DDP harness (``spawn_ddp``) as a fixture."""
    return spawn_ddp


# --- the order of the test files -------------------------------------------------------------
# `make test` hands whole files to two workers (`--dist loadfile --no-loadscope-reorder`), in
# collection order. Started last, one long file leaves the other worker idle for minutes, so the
# files go longest first, by the seconds their *selected* tests took in a measured run
# (tests/durations.json, one entry per test, written by `--store-durations`): `make test` and
# `make test-fast` (which leaves the slow tests out) each get the order of their own selection.
# A test not listed there counts as 0 s.
DURATIONS = Path(__file__).resolve().parent / "durations.json"
_spent: dict[str, float] = defaultdict(float)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--store-durations", action="store_true",
                     help=f"write each test's measured seconds to {DURATIONS.name} (the files' order)")


@pytest.hookimpl(trylast=True)  # after `-m` and `-k` have deselected what will not run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    seconds = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
    per_file: dict[str, float] = defaultdict(float)
    for item in items:
        per_file[item.nodeid.split("::")[0]] += seconds.get(item.nodeid, 0.0)
    items.sort(key=lambda item: -per_file[item.nodeid.split("::")[0]])  # stable within a file


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _spent[report.nodeid] += report.duration  # setup, call and teardown


def pytest_sessionfinish(session: pytest.Session) -> None:
    # On the controller (the process without ``workerinput``), which sees every worker's reports.
    # Tests that did not run this time (another selection) keep their earlier seconds.
    if session.config.getoption("store_durations") and not hasattr(session.config, "workerinput"):
        seconds = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
        seconds = {k: v for k, v in seconds.items() if "::" in k}  # per-file entries of an older format
        seconds.update({k: round(v, 2) for k, v in _spent.items()})
        DURATIONS.write_text(json.dumps(dict(sorted(seconds.items())), indent=0) + "\n")
