"""A real local Redis Sentinel setup for tests: one master, one replica, one Sentinel.

Started the way an operator would: two ``redis-server`` (the second with
``--replicaof``) and ``redis-server --sentinel`` monitoring the master as
``mymaster`` with quorum 1, all on free loopback ports in a temp dir.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.support.faults import free_port, wait_port

SERVICE = "mymaster"


def _cli(port: int, *args: str) -> str:
    return subprocess.run(
        ["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=10
    ).stdout


class LocalSentinel:
    def __init__(self) -> None:
        self.master, self.replica, self.sentinel = free_port(), free_port(), free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="overdrive-sentinel-"))
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel}/{SERVICE}"

    @staticmethod
    def available() -> bool:
        return bool(shutil.which("redis-server") and shutil.which("redis-cli"))

    def _server(self, *args: str) -> None:
        self.procs.append(
            subprocess.Popen(
                ["redis-server", *args, "--bind", "127.0.0.1", "--dir", str(self.dir)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )

    def start(self) -> LocalSentinel:
        try:
            no_disk = ("--save", "", "--appendonly", "no")
            self._server("--port", str(self.master), *no_disk)
            self._server(
                "--port", str(self.replica), *no_disk,
                "--replicaof", "127.0.0.1", str(self.master),
            )  # fmt: skip
            conf = self.dir / "sentinel.conf"
            conf.write_text(
                f"port {self.sentinel}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.master} 1\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 5000\n"
            )
            self._server(str(conf), "--sentinel")
            for port in (self.master, self.replica, self.sentinel):
                wait_port(port)
            self._wait(lambda: "master_link_status:up" in _cli(self.replica, "info", "replication"))
            # a failover needs the Sentinel to know the replica (it learns it from the master)
            self._wait(
                lambda: (
                    f"127.0.0.1:{self.replica}"
                    in _cli(self.sentinel, "sentinel", "replicas", SERVICE)
                )
            )
        except BaseException:
            self.close()
            raise
        return self

    @staticmethod
    def _wait(ready: Callable[[], bool], seconds: float = 30.0) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if ready():
                return
            time.sleep(0.1)
        raise RuntimeError("the local Redis Sentinel setup did not become ready")

    def master_port(self) -> int:
        """The port the Sentinel names as master now."""
        out = _cli(self.sentinel, "sentinel", "get-master-addr-by-name", SERVICE).split()
        return int(out[1])

    def get(self, port: int, key: str) -> str:
        """`GET key` on the server at `port`, through redis-cli (no client of ours)."""
        return _cli(port, "get", key).strip()

    def fail_over(self) -> None:
        """Make the replica master (SENTINEL FAILOVER); return once the failover is whole:
        the Sentinel names the replica, which is master, and the old master is demoted.
        Until the demotion the old master still takes writes, which are lost with it."""
        _cli(self.sentinel, "sentinel", "failover", SERVICE)
        self._wait(lambda: self.master_port() == self.replica)
        self._wait(lambda: "role:master" in _cli(self.replica, "info", "replication"))
        self._wait(lambda: "role:slave" in _cli(self.master, "info", "replication"))

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()
        self.procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
