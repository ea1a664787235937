"""Start an OpenAI-compatible model server as its users do, time it to ready, stop it.

A `ServerSpec` is a command line and environment. `start()` launches it in its own process
group and waits until it answers: `/health` returns 200, then a one-token completion
succeeds; time to ready runs from the launch to that answer, imports and compiling
included. `CpuMeter` says how much CPU the rest of the machine used meanwhile, so a figure
taken while something else ran can be told apart.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


@dataclass(frozen=True)
class ServerSpec:
    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    port: int
    model_name: str
    log_path: Path


@dataclass
class RunningServer:
    spec: ServerSpec
    process: subprocess.Popen
    ready_s: float = 0.0
    log_file: object = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.spec.port}"

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM the whole process group (vLLM forks engine processes), then SIGKILL."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.log_file is not None:
            self.log_file.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(spec: ServerSpec, timeout_s: float) -> RunningServer:
    """Launch and wait until the server answers a completion; raise if it never does."""
    spec.log_path.parent.mkdir(parents=True, exist_ok=True)
    log_file = open(spec.log_path, "w")  # noqa: SIM115 - closed by RunningServer.stop
    launched = time.perf_counter()
    process = subprocess.Popen(spec.argv, env=spec.env, cwd=spec.cwd, stdout=log_file,
                               stderr=subprocess.STDOUT, start_new_session=True)
    server = RunningServer(spec, process, log_file=log_file)
    try:
        _wait_until_answering(server, launched + timeout_s)
    except BaseException:
        server.stop()
        raise
    server.ready_s = round(time.perf_counter() - launched, 2)
    return server


def _wait_until_answering(server: RunningServer, deadline: float) -> None:
    body = {"model": server.spec.model_name, "prompt": "Hello", "max_tokens": 1}
    with httpx.Client(timeout=30) as client:
        while True:
            if server.process.poll() is not None:
                raise RuntimeError(f"{server.spec.name} exited with {server.process.returncode}; "
                                   f"see {server.spec.log_path}")
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{server.spec.name} not ready in time; "
                                   f"see {server.spec.log_path}")
            try:
                if client.get(f"{server.url}/health").status_code == 200:
                    response = client.post(f"{server.url}/v1/completions", json=body)
                    if response.status_code == 200:
                        return
            except httpx.TransportError:
                pass
            time.sleep(0.05)


class CpuMeter:
    """CPU seconds the machine spent outside `pids` (and their descendants) since start."""

    def __init__(self, *pids: int) -> None:
        self.pids = pids
        self.start = self._busy() - self._tree_cpu()

    def other_cpu_s(self) -> float:
        return round(max(0.0, self._busy() - self._tree_cpu() - self.start), 1)

    @staticmethod
    def _busy() -> float:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        idle = values[3] + values[4]
        return (sum(values) - idle) / os.sysconf("SC_CLK_TCK")

    def _tree_cpu(self) -> float:
        parents: dict[int, int] = {}
        cpu: dict[int, float] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            pid = int(entry.name)
            parents[pid] = int(fields[1])
            cpu[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return sum(value for pid, value in cpu.items() if self._in_tree(pid, parents))

    def _in_tree(self, pid: int, parents: dict[int, int]) -> bool:
        while pid > 1:
            if pid in self.pids:
                return True
            pid = parents.get(pid, 0)
        return False
