"""A real 2-node Ray cluster on 127.0.0.1 for tests: `ray start --head` with the dashboard (the job server)
plus a second `ray start --address`, each run with `--block` in its own process group.

Only what these tests started is torn down: each node's process group, then any process whose command
line or working directory is under this cluster's own temp dir (workers, job drivers). Never `ray stop`,
which would stop every Ray on the machine. Token authentication is on (RAY_AUTH_MODE=token) with a token
made up here, so the client side must send it.
"""

from __future__ import annotations

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

RAY = str(Path(sys.executable).with_name("ray"))


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class LocalRayCluster:
    def __init__(self, *, pythonpath: str, head_cpus: int = 4, worker_cpus: int = 2) -> None:
        # Short: Ray puts unix sockets under it (107-byte path limit).
        self.temp_dir = tempfile.mkdtemp(prefix="sw", dir="/tmp")
        self.token = uuid.uuid4().hex + uuid.uuid4().hex
        self.pythonpath = pythonpath
        self.head_cpus = head_cpus
        self.worker_cpus = worker_cpus
        self.gcs_port, self.dashboard_port = free_ports(2)
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self._procs: list[subprocess.Popen[bytes]] = []
        self.env = {
            **os.environ,
            "PYTHONPATH": pythonpath,
            # `python -m jobs run` in the job's entrypoint must be this venv's interpreter.
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_USAGE_STATS_ENABLED": "0",
            "TOKENIZERS_PARALLELISM": "false",
        }
        for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
            self.env.pop(k, None)

    def _node_ports(self) -> list[str]:
        # No Ray Client server port: it needs ray[client], which shardwise does not install.
        agent_http, agent_grpc, metrics, runtime_env, node_mgr, obj_mgr = free_ports(6)
        return [
            f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={runtime_env}",
            f"--node-manager-port={node_mgr}",
            f"--object-manager-port={obj_mgr}",
        ]

    def _start(self, args: list[str], log: str) -> None:
        out = open(Path(self.temp_dir) / log, "wb")  # noqa: SIM115 - lives as long as the node
        self._procs.append(
            subprocess.Popen(
                [RAY, "start", "--block", "--disable-usage-stats", *args],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: torn down as one
            )
        )

    def start(self, timeout_s: float = 90.0) -> None:
        self._start(
            [
                "--head",
                "--node-ip-address=127.0.0.1",
                f"--port={self.gcs_port}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--num-cpus={self.head_cpus}",
                f"--temp-dir={self.temp_dir}",
                *self._node_ports(),
            ],
            "head.log",
        )
        self._wait_dashboard(timeout_s)
        self._start(
            [
                f"--address=127.0.0.1:{self.gcs_port}",
                "--node-ip-address=127.0.0.1",
                f"--num-cpus={self.worker_cpus}",
                f"--temp-dir={self.temp_dir}",
                *self._node_ports(),
            ],
            "worker.log",
        )
        self._wait_nodes(2, timeout_s)

    def _check_alive(self) -> None:
        for p in self._procs:
            if p.poll() is not None:
                logs = "\n".join(
                    (Path(self.temp_dir) / n).read_text(errors="replace")[-3000:]
                    for n in ("head.log", "worker.log")
                    if (Path(self.temp_dir) / n).exists()
                )
                raise RuntimeError(f"ray start exited with {p.returncode}:\n{logs}")

    def _get(self, path: str) -> bytes | None:
        import urllib.request

        req = urllib.request.Request(self.address + path, headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.read()
        except OSError:
            return None

    def _wait_dashboard(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check_alive()
            if self._get("/api/version") is not None:
                return
            time.sleep(0.5)
        raise TimeoutError(f"the dashboard at {self.address} did not come up in {timeout_s} s")

    def _wait_nodes(self, n: int, timeout_s: float) -> None:
        import json

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check_alive()
            body = self._get("/nodes?view=summary")
            if body is not None:
                summary = json.loads(body)["data"]["summary"]
                if sum(1 for node in summary if node["raylet"]["state"] == "ALIVE") >= n:
                    return
            time.sleep(0.5)
        raise TimeoutError(f"{n} Ray nodes were not alive after {timeout_s} s")

    def _own_pids(self) -> set[int]:
        """Processes under this cluster's temp dir: in their command line or working directory."""
        pids = set()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
                cwd = os.readlink(entry / "cwd")
            except OSError:
                continue
            if self.temp_dir in cmdline or cwd.startswith(self.temp_dir):
                pids.add(int(entry.name))
        return pids

    def stop(self) -> None:
        for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            for p in self._procs:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
            for pid in self._own_pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and (
                any(p.poll() is None for p in self._procs) or self._own_pids()
            ):
                time.sleep(0.2)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_cluster(*, pythonpath: str, attempts: int = 2, **kwargs: int) -> LocalRayCluster:
    """A started cluster. On a loaded machine a raylet can miss Ray's fixed 30 s registration window
    ("The current node timed out during startup"); a fresh try with new ports usually makes it."""
    for attempt in range(attempts):
        cluster = LocalRayCluster(pythonpath=pythonpath, **kwargs)
        try:
            cluster.start()
            return cluster
        except BaseException as e:  # a Ctrl-C during start must not leave nodes behind either
            cluster.stop()
            if attempt == attempts - 1 or not isinstance(e, RuntimeError | TimeoutError):
                raise
    raise AssertionError("unreachable")
