"""`avlab sweep --dry-run`: the placement checks on records of where workers ran, and the
command's bad input refused in one line before anything starts. The dry run itself, on a
simulated multi-node cluster with declared GPUs, is tests/e2e/test_scheduling.py."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT
from orchestrator import jobs
from orchestrator.cli import main
from orchestrator.dry_run import DryTrial, packing, problems, table

SPACE = ROOT / "search_spaces" / "memory_size_fig6.yaml"


def _worker(rank: int, world: int, node: str, gpu: str | None, visible: str | None = None) -> dict:
    return {"rank": rank, "world": world, "dist_rank": rank if world > 1 else None,
            "dist_world": world if world > 1 else None, "backend": "gloo" if world > 1 else None,
            "node": node, "host": "h", "gpus": [gpu] if gpu is not None else [],
            "cuda_visible_devices": visible if visible is not None else (gpu or ""), "device": "cpu", "pid": 1}


def _trial(label: str, workers: list[dict], share: float, start: float = 0.0, end: float = 10.0) -> DryTrial:
    return DryTrial(label=label, workers=len(workers), cpus_per_worker=1, gpu_share=share,
                    attempts=[{"started": start, "last": end, "workers": workers}])


def _ddp(label: str, node: str, gpus: list[str]) -> DryTrial:
    return _trial(label, [_worker(r, len(gpus), node, g, ",".join(gpus)) for r, g in enumerate(gpus)], 1.0)


def test_a_placement_as_declared_has_no_problems_and_counts_the_packing():
    trials = [
        _ddp("ddp", "nodeA", ["0", "1", "2", "3"]),
        _trial("q1", [_worker(0, 1, "nodeB", "0")], 0.25),
        _trial("q2", [_worker(0, 1, "nodeB", "0")], 0.25, start=5.0, end=15.0),
        _trial("q3", [_worker(0, 1, "nodeB", "0")], 0.25, start=11.0, end=20.0),
        _trial("cpu", [_worker(0, 1, "nodeB", None)], 0.0),
    ]
    assert problems(trials) == []
    assert packing(trials) == {0.25: 2}  # q1 and q2 at once, then q2 and q3
    text = table(trials)
    assert "| ddp | 4 x (1 CPU, 1 GPU) | 1 | 0:n0/0 1:n0/1 2:n0/2 3:n0/3 | 10 s |" in text
    assert "| cpu | 1 x (1 CPU) | 1 | 0:n1/- | 10 s |" in text


@pytest.mark.parametrize("trials, line", [
    # three halves of one GPU at once
    ([_trial(f"h{i}", [_worker(0, 1, "nodeB", "2")], 0.5) for i in range(3)],
     "GPU 2 of node nodeB: h0 attempt 1, h1 attempt 1, h2 attempt 1 held 1.5 of it at once"),
    # a whole GPU given to two ranks of one DDP trial
    ([_ddp("ddp", "nodeA", ["0", "0"])], "ddp attempt 1: ranks 0 and 1 share GPU 0 of node nodeA"),
    # a worker that did not get the GPU it asked for
    ([_trial("q", [_worker(0, 1, "nodeB", None)], 0.5)], "q attempt 1: rank 0 was given GPU none, asked for 0.5"),
    # a GPU the worker cannot see
    ([_trial("q", [_worker(0, 1, "nodeB", "3", visible="0")], 1.0)],
     "q attempt 1: rank 0's GPU 3 is not in its CUDA_VISIBLE_DEVICES='0'"),
    # a worker group short of a worker
    ([DryTrial("ddp", 4, 1, 0.0, [{"started": 0, "last": 1, "workers": [_worker(r, 4, "n", None) for r in range(3)]}])],
     "ddp attempt 1: 3 workers with ranks [0, 1, 2], asked for 4"),
    # a trial that never recorded a worker
    ([DryTrial("lost", 1, 1, 0.0, [], status="KILLED")], "lost: no worker recorded where it ran (KILLED)"),
])
def test_each_way_a_placement_differs_from_the_ask_is_named(trials, line):
    found = problems(trials)
    assert found[0] == line, found
    # Two ranks on one whole GPU also hold two of it at once; nothing else is said.
    assert found[1:] == (["GPU 0 of node nodeA: ddp attempt 1 held 2 of it at once"] if "share GPU" in line else [])


def test_a_process_group_that_disagrees_with_the_ranks_is_named():
    workers = [_worker(r, 2, "n", None) for r in range(2)]
    workers[1]["dist_world"] = 3
    assert problems([_trial("ddp", workers, 0.0)]) == ["ddp attempt 1: rank 1 is rank 1 of 3 in its process group, not of 2"]


@pytest.mark.parametrize("argv, field", [
    (["--dry-run", "nan"], "--dry-run:"),
    (["--dry-run", "-1"], "--dry-run:"),
    (["--dry-run", "1e9"], "--dry-run:"),
    (["--dry-run", "5", "--reuse-trials"], "--reuse-trials: a dry run trains nothing"),
    (["resources.placement=tight"], "resources.placement:"),
])
def test_bad_dry_run_or_placement_exits_2_before_anything_starts(tmp_path, capsys, argv, field):
    home = tmp_path / "home"
    assert main(["sweep", str(SPACE), *argv, "--home", str(home)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and field in err, err
    assert not home.exists()


def test_a_dry_runs_job_file_keeps_its_seconds_and_refuses_a_damaged_value(tmp_path):
    record = jobs.JobRecord(kind="sweep", name="dry", run_id="r1", tracking_uri="sqlite:///x.db", space={},
                            max_concurrent=2, dry_run_s=12.5)
    path = jobs.write(tmp_path, record)
    assert jobs.read(tmp_path, "dry").dry_run_s == 12.5
    data = json.loads(path.read_text())
    assert data["dry_run_s"] == 12.5
    plain = jobs.write(tmp_path, jobs.JobRecord(kind="sweep", name="real", run_id="r2", tracking_uri="sqlite:///x.db",
                                                space={}, max_concurrent=1))
    assert "dry_run_s" not in json.loads(plain.read_text()) and jobs.read(tmp_path, "real").dry_run_s is None
    data["dry_run_s"] = "soon"
    path.write_text(json.dumps(data))
    with pytest.raises(jobs.ConfigError, match=r"dry\.json: damaged avlab job file \(dry_run_s"):
        jobs.read(tmp_path, "dry")
