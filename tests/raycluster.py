"""Ray clusters of several nodes on this machine, for the tests: one `ray start` process per
node (the head with the dashboard), each with its own ports, temp folder and declared resources,
told apart by a custom resource ``node_<name>`` and stopped by killing what carries its marker."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import faults

BIN = Path(sys.executable).parent

MARK = "AVLAB_TEST_NODE"  # in the environment of every process of a node (Ray passes it on)


def marked(value: str) -> list[int]:
    """Processes whose environment carries MARK=value: one node and everything it started."""
    needle = f"{MARK}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def kill_marked(value: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while pids := marked(value):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise AssertionError(f"processes of node {value} survive SIGKILL: {pids}")
        time.sleep(0.2)


def wait(condition, *, timeout: float, what: str, every: float = 1.0, explain=None) -> None:
    """faults.wait_for at a gentler pace: each poll here is an HTTP or MLflow query. On a timeout,
    ``explain()`` (if given) adds what there is to see, e.g. the tails of the cluster's logs."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}" + (f"\n{explain()}" if explain else ""))
        time.sleep(every)


def tails(folder: Path, pattern: str = "*.log", chars: int = 3000) -> str:
    """The last ``chars`` characters of every file in ``folder`` matching ``pattern``."""
    return "\n".join(f"--- {path.name}\n{path.read_text(errors='replace')[-chars:]}" for path in sorted(folder.glob(pattern)))


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


class LocalCluster:
    """`ray start --head` (node_a, dashboard) and `ray start --address` for each other node.

    Each node gets its own --temp-dir (short, for Unix socket paths): sharing one makes both
    runtime-env agents own the same working_dir copy, and the one on the node that finishes
    first deletes it under the other's running job driver. Every fixed default port (GCS,
    dashboard, dashboard agent, Ray client) is set, so another Ray on this machine is left alone;
    stopping kills only the processes carrying this cluster's marker (no `ray stop`, which would
    stop every Ray instance of the user)."""

    def __init__(self, logs: Path, *, nodes: tuple[str, ...] = ("a", "b"), auth: dict[str, str] | None = None,
                 cpus: dict[str, int] | None = None, gpus: dict[str, int] | None = None):
        """``nodes``: their names, the first is the head; ``cpus``/``gpus``: what a node declares
        (1 CPU and no GPU unless given; a declared GPU need not exist)."""
        self.logs = logs
        self.names = nodes
        self.auth = auth or {"RAY_AUTH_MODE": "disabled"}
        self.tag = uuid.uuid4().hex[:8]
        self.temp = Path(tempfile.mkdtemp(prefix="avr-", dir="/tmp"))
        self.gcs, self.dashboard, client, *agents = faults.free_ports(3 + len(nodes))
        self.address = f"http://127.0.0.1:{self.dashboard}"
        self.agents = dict(zip(nodes, agents))
        self.common = ["--block", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
        head, *others = nodes
        self.nodes = {head: ["--head", "--port", str(self.gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port",
                             str(self.dashboard), "--include-dashboard=true", "--ray-client-server-port", str(client)]}
        self.nodes.update({node: ["--address", f"127.0.0.1:{self.gcs}"] for node in others})
        for node in nodes:
            self.nodes[node] += ["--dashboard-agent-listen-port", str(self.agents[node]),
                                 "--resources", json.dumps({f"node_{node}": 1}),
                                 "--num-cpus", str((cpus or {}).get(node, 1)),
                                 "--num-gpus", str((gpus or {}).get(node, 0))]
        self.procs: dict[str, subprocess.Popen] = {}

    def env(self, node: str) -> dict[str, str]:
        # RAY_ADDRESS: Ray's own helpers in workers (Train's placement-group cleaner) otherwise
        # look for "the" local cluster and find two when another Ray runs on this machine.
        return {**faults.env(), **self.auth, "RAY_ADDRESS": f"127.0.0.1:{self.gcs}", MARK: f"{self.tag}-{node}"}

    def start(self) -> None:
        for node in self.names:
            (self.temp / node).mkdir()
            log = (self.logs / f"ray-node-{node}.log").open("w")
            self.procs[node] = subprocess.Popen(
                [str(BIN / "ray"), "start", *self.nodes[node], *self.common, "--temp-dir", str(self.temp / node)],
                env=self.env(node), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
            faults.wait_for(lambda: port_open(self.agents[node]), timeout=180, proc=self.procs[node],
                            log=self.logs / f"ray-node-{node}.log", what=f"node {node}'s dashboard agent")
        if len(self.names) > 1:
            wait(lambda: len(self.node_ids()) == len(self.names), timeout=120, what="every node alive")

    def node_ids(self) -> dict[str, str]:
        """{name: node id} of the nodes alive now."""
        from ray.util.state import list_nodes

        out = {}
        for n in list_nodes(address=self.address, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False):
            for node in self.names:
                if f"node_{node}" in (n.resources_total or {}):
                    out[node] = n.node_id
        return out

    def actor_nodes(self, class_name: str) -> list[str]:
        from ray.util.state import list_actors

        # Ray names an actor class by its qualified name (Tune's function trainables are
        # `wrap_function.<locals>.ImplicitFunc`), so match the last component.
        return [a.node_id for a in list_actors(address=self.address, filters=[("state", "=", "ALIVE")])
                if a.class_name.rsplit(".", 1)[-1] == class_name]

    def kill(self, node: str) -> None:
        """The node is gone: its raylet, agents and workers, all at once (SIGKILL)."""
        kill_marked(f"{self.tag}-{node}")

    def stop(self) -> None:
        for node in reversed(self.names):
            kill_marked(f"{self.tag}-{node}")
        for proc in self.procs.values():
            proc.wait(timeout=30)
        shutil.rmtree(self.temp, ignore_errors=True)
