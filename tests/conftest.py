"""What the tests share: the project root, the installed ``avlab`` command, the cut-down run
that end-to-end tests start from, and the one harness that runs code under two DDP workers."""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
AVLAB = str(Path(sys.executable).parent / "avlab")

# The tiny preset cut to a run of seconds: one epoch of two steps, probes on 100 / 60 items, no
# transfer split. Tests add what their assertion needs (more epochs, a bigger pool) after it:
# a later override of the same key wins.
TINY_RUN = [
    "train.epochs=1", "train.batch_size=64", "data.paired_size=128", "data.unpaired_sound_size=64",
    "data.unpaired_image_size=64", "data.train_size=100", "data.test_size=60",
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
