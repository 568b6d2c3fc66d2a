"""Fault injection for the preemption tests: start avlab in its own process group (a stand-in for
a node: the driver, its local Ray head and every Ray worker), find its processes, kill them."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from conftest import AVLAB, default_sigint  # noqa: E402


def env() -> dict[str, str]:
    out = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out.pop("MLFLOW_TRACKING_URI", None)
    return out


def start(args: list[str], log: Path, cwd: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """``avlab ARGS`` in a new session, so its whole process tree shares one process group."""
    return subprocess.Popen([AVLAB, *args], cwd=cwd, env={**env(), **(extra_env or {})}, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=default_sigint)


def run(args: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([AVLAB, *args], cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


def _table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, process group, command line) of every live process."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        if fields[0] != "Z":
            out[int(entry.name)] = (int(fields[1]), int(fields[2]), cmdline)
    return out


def processes(root: int) -> dict[int, str]:
    """pid -> command line of ``root``, its process group and all their descendants (Ray starts
    some workers in process groups of their own)."""
    table = _table()
    found = {pid for pid, (_, group, _) in table.items() if pid == root or group == root}
    grew = True
    while grew:
        children = {pid for pid, (parent, _, _) in table.items() if parent in found} - found
        found |= children
        grew = bool(children)
    return {pid: table[pid][2] for pid in found}


def training_workers(root: int) -> list[int]:
    return sorted(pid for pid, cmd in processes(root).items() if cmd.startswith("ray::RayTrainWorker"))


def wait_for(condition: Callable[[], bool], *, timeout: float, what: str, proc: subprocess.Popen | None = None,
              log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log else ""
            raise AssertionError(f"avlab exited ({proc.returncode}) before {what}:\n{tail}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def kill_node(proc: subprocess.Popen, *, timeout: float = 60) -> None:
    """SIGKILL the driver and everything in its process group (the node is gone), and wait until
    nothing of it is left."""
    doomed = processes(proc.pid)
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    wait_for(lambda: not (set(doomed) & set(_table())), timeout=timeout, what="the killed processes to vanish")


def _hex_address(text: str) -> str:
    """/proc/net/tcp's "0100007F:1F90" or tcp6's 32-hex-digit form -> an IP address string."""
    import ipaddress

    raw = bytes.fromhex(text)
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw[::-1]))
    # tcp6: four 32-bit words, each in host (little-endian) order
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    address = ipaddress.IPv6Address(words)
    return str(address.ipv4_mapped or address)


def listening_sockets(pids) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP socket in LISTEN state owned by one of ``pids``, read
    from /proc (the socket table `ss -ltnp` shows)."""
    inode_pid = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inode_pid[target[8:-1]] = pid
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inode_pid:  # 0A: LISTEN
                host, port = local.split(":")
                found.append((_hex_address(host), int(port, 16), inode_pid[inode]))
    return found


def free_ports(n: int) -> list[int]:
    """``n`` free ports for a test cluster's fixed ports, chosen below the kernel's ephemeral range
    and above Ray's worker ports (10002-19999): a port taken from the ephemeral range (binding
    port 0) can be handed to another process, such as a Ray started by the other test worker,
    before the cluster binds it (its client server once died of that, and its node with it)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    candidates = random.sample(range(20000, low), low - 20000) if low > 21000 else []
    ports: list[int] = []
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == n:
            return ports
    socks = [socket.socket() for _ in range(n)]  # no room below the ephemeral range: any free port
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def free_port() -> int:
    """One free port, chosen as ``free_ports`` chooses them."""
    return free_ports(1)[0]
