"""Scheduling at cluster scale, simulated: `avlab sweep --dry-run` on a three-node Ray cluster on
this machine whose two worker nodes declare eight GPUs each that they do not have.

The sweep mixes 8-worker DDP trials (a whole GPU per worker) and single-worker trials on a
quarter of a GPU. Its trials train nothing: each worker records the node, GPU ids,
CUDA_VISIBLE_DEVICES and DDP rank it was given (``orchestrator.dry_run``). Mid-sweep the node of
a DDP trial is killed. The test checks what a real cluster would have to do: every worker group
of the size asked for, ranks 0-7 in one process group, a distinct GPU per DDP worker, quarter
trials sharing GPUs without holding more than a whole one, and the lost node's trial resumed,
from its checkpoint, on the other node.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import faults  # noqa: E402
from raycluster import LocalCluster, tails, wait  # noqa: E402

BIN = Path(sys.executable).parent

SPACE = """\
description: placement of DDP and fractional-GPU trials
base:
  preset: tiny
  overrides: [train.epochs=8, train.max_failures=3]
variants:
  ddp8-a: {resources.workers: 8, resources.gpu: true, resources.placement: strict_pack, method.memory_size: 16}
  ddp8-b: {resources.workers: 8, resources.gpu: true, resources.placement: strict_pack, method.memory_size: 32}
  quarter-a: {resources.gpu: 0.25, method.memory_size: 16}
  quarter-b: {resources.gpu: 0.25, method.memory_size: 32}
  quarter-c: {resources.gpu: 0.25, method.memory_size: 64}
seeds: 1
metric: image_h_linear_acc
mode: max
max_concurrent: 5
"""


@pytest.mark.slow
def test_a_dry_run_places_ddp_and_fractional_trials_as_declared_and_moves_a_lost_nodes_trial(tmp_path):
    from mlflow.tracking import MlflowClient

    space = tmp_path / "placement.yaml"
    space.write_text(SPACE)
    home, name = tmp_path / "home", "placement"
    cluster = LocalCluster(tmp_path, nodes=("head", "b", "c"), cpus={"head": 2, "b": 8, "c": 8},
                           gpus={"b": 8, "c": 8})
    try:
        cluster.start()
        nodes = cluster.node_ids()
        env = {**faults.env(), "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": f"127.0.0.1:{cluster.gcs}"}
        log = (tmp_path / "sweep.log").open("w")
        proc = subprocess.Popen([str(BIN / "avlab"), "sweep", str(space), "--dry-run", "16", "--name", name,
                                 "--address", f"127.0.0.1:{cluster.gcs}", "--home", str(home)],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")

        def explain() -> str:
            return f"{tails(tmp_path, 'ray-node-*.log')}\n--- sweep\n{(tmp_path / 'sweep.log').read_text()[-6000:]}"

        victim: dict = {}

        def a_ddp_trial_checkpointed() -> bool:
            assert proc.poll() is None, explain()
            if not (home / "mlflow.db").exists():
                return False
            try:
                exp = client.get_experiment_by_name("avlab-sweeps")
                runs = client.search_runs([exp.experiment_id], f"tags.`avlab.sweep_name` = '{name}' and "
                                          "tags.`avlab.kind` = 'trial'") if exp else []
            except Exception:  # noqa: BLE001 - sqlite busy with the trials' writes: ask again
                return False
            for run in runs:
                node = run.data.tags.get("avlab.nodes", "")
                # Past a checkpoint that Ray Train registered (what a restarted group is given),
                # not only one on disk: its snapshot of the run's checkpoints is written then.
                if (run.info.run_name.split("/")[1].startswith("ddp8") and node in (nodes["b"], nodes["c"])
                        and any((home / "ray" / "trials").glob(
                            f"*-{run.info.run_id}/checkpoint_manager_snapshot.json"))):
                    victim.update(run=run.info.run_id, node=node)
                    return True
            return False

        wait(a_ddp_trial_checkpointed, timeout=600, what="a DDP trial past its first checkpoint", explain=explain)
        lost = next(k for k, v in nodes.items() if v == victim["node"])
        cluster.kill(lost)
        code = proc.wait(timeout=900)
        out = (tmp_path / "sweep.log").read_text()
        assert code == 0, explain()
        assert f"[avlab] dry run {name}: every trial got the workers, ranks and GPUs it asked for" in out, out[-4000:]

        from orchestrator.dry_run import packing, problems, read_trials
        from orchestrator.runs import children, find_sweep_run

        parent = find_sweep_run(client, name)
        assert parent.info.status == "FINISHED" and parent.data.tags["avlab.dry_run"] == "true"
        runs = children(client, parent.info.run_id)
        # Every trial once, ended, and none mistaken for a result (no evaluation, tagged).
        assert sorted(r.info.run_name.split("/")[1] for r in runs) == ["ddp8-a", "ddp8-b", "quarter-a", "quarter-b",
                                                                       "quarter-c"]
        assert all(r.info.status == "FINISHED" and r.data.tags["avlab.dry_run"] == "done"
                   and "eval_time_s" not in r.data.metrics for r in runs)
        trials = {t.label.split(" ")[0]: t for t in read_trials(client, parent.info.run_id)}
        assert problems(trials.values()) == []
        gpu_nodes = {nodes["b"], nodes["c"]}
        for label in ("ddp8-a", "ddp8-b"):
            for attempt in trials[label].attempts:
                workers = attempt["workers"]
                assert [w["rank"] for w in workers] == list(range(8))
                assert {(w["dist_rank"], w["dist_world"], w["backend"]) for w in workers} == {
                    (r, 8, "gloo") for r in range(8)}
                # All eight on one node here (8 GPUs each), each with its own GPU; Ray Train
                # shows every worker the node's GPUs of its group.
                assert len({w["node"] for w in workers}) == 1 and workers[0]["node"] in gpu_nodes
                assert sorted(w["gpus"][0] for w in workers) == [str(g) for g in range(8)]
                assert all(sorted(w["cuda_visible_devices"].split(",")) == [str(g) for g in range(8)] for w in workers)
                assert all(w["device"] == f"cuda:{w['gpus'][0]}" for w in workers)
        moved = next(t for t in trials.values() if any(w["node"] == victim["node"] for a in t.attempts
                                                      for w in a["workers"]) and t.label.startswith("ddp8"))
        # Restored from its checkpoint (which carries the earlier attempts) on the node left.
        assert len(moved.attempts) >= 2 and moved.attempts[-1]["from_step"] >= 1, moved.attempts
        assert moved.attempts[-1]["workers"][0]["node"] == (gpu_nodes - {victim["node"]}).pop()
        for label in ("quarter-a", "quarter-b", "quarter-c"):
            for attempt in trials[label].attempts:
                (w,) = attempt["workers"]
                assert w["node"] in gpu_nodes and len(w["gpus"]) == 1 and w["device"] == "cuda:0"
                assert w["cuda_visible_devices"] == w["gpus"][0]
        packed = packing(trials.values())
        assert packed.get(0.25, 0) >= 2, packed  # quarter trials shared a GPU
        measured = {"nodes": {k: v[:8] for k, v in nodes.items()}, "killed": lost, "packing": packed,
                    "attempts": {k: [sorted({w['node'][:8] for w in a["workers"]}) for a in t.attempts]
                                 for k, t in trials.items()}}
        print("\n[dry-run placement]", json.dumps(measured, indent=2))
    finally:
        cluster.stop()
