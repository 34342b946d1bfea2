"""A real local Redis Cluster for tests: 3 masters, no replicas, on free ports.

Started once per test session (the `redis_cluster` fixture) the way an operator
would: three ``redis-server --cluster-enabled yes`` in a temp dir, then
``redis-cli --cluster create ... --cluster-replicas 0 --cluster-yes``.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import time

from tests.support.faults import wait_port


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too (so at most 55535)."""
    for _ in range(1000):
        port = random.randint(20000, 55000)
        if _free(port) and _free(port + 10000):
            return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


class LocalCluster:
    def __init__(self, masters: int = 3) -> None:
        self.ports = [free_cluster_port() for _ in range(masters)]
        self.dir = tempfile.mkdtemp(prefix="overdrive-cluster-")
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    @staticmethod
    def available() -> bool:
        return bool(shutil.which("redis-server") and shutil.which("redis-cli"))

    def start(self) -> LocalCluster:
        for port in self.ports:
            self.procs.append(
                subprocess.Popen(
                    [
                        "redis-server",
                        "--port",
                        str(port),
                        "--bind",
                        "127.0.0.1",
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        f"nodes-{port}.conf",
                        "--cluster-node-timeout",
                        "2000",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--dir",
                        self.dir,
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        for port in self.ports:
            wait_port(port, "redis-server (cluster node)")
        subprocess.run(
            ["redis-cli", "--cluster", "create",
             *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            info = subprocess.run(
                ["redis-cli", "-p", str(self.ports[0]), "cluster", "info"],
                capture_output=True, text=True, timeout=10,
            ).stdout  # fmt: skip
            if "cluster_state:ok" in info:
                return self
            time.sleep(0.1)
        raise RuntimeError("the local Redis Cluster did not reach cluster_state:ok")

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()
        self.procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
