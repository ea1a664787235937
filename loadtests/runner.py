"""Running a load test: the local stack (`quiver up` as a subprocess) and Locust headless.

Both run in their own session, so a Ctrl-C reaches only this process, which then stops them in
order: Locust first (SIGINT: it writes its reports), then the stack (SIGINT, wait, kill).
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from common.processes import wait_until_serving
from loadtests.errors import LoadTestError

logger = logging.getLogger(__name__)

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
LOCUST_PREFIX = "locust"
STOP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class LocustPlan:
    host: str
    api_key: str | None
    model: str | None
    users: int
    spawn_rate: float
    duration_s: int
    shape: str | None
    user_classes: list[str]        # Locust class names; empty: every class, by weight
    out_dir: Path
    max_tokens: int | None = None

    @property
    def prefix(self) -> Path:
        return self.out_dir / LOCUST_PREFIX


@dataclass
class Stack:
    process: subprocess.Popen
    url: str
    log_path: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def new_api_key() -> str:
    return f"qk-loadtest-{secrets.token_urlsafe(24)}"


def log_tail(path: Path, num_chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-num_chars:]
    except OSError:
        return ""


def default_sigint() -> None:
    """In the child: SIGINT back to its default, so that our SIGINT stops it even when this
    process was started with SIGINT ignored (a background job, some CI runners)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_stack(model: Path, workdir: Path, api_key: str) -> Stack:
    port, server_port = free_port(), free_port()
    log_path = workdir / "stack.log"
    command = [sys.executable, "-m", "quiver", "up", "--model", str(model), "--port", str(port),
               "--server-port", str(server_port), "--store", str(workdir / "keys.db")]
    logger.info("starting the local stack: %s (log %s)", " ".join(command), log_path)
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=default_sigint,
            env={**os.environ, "QUIVER_API_KEY": api_key, "PYTHONUNBUFFERED": "1"})
    return Stack(process=process, url=f"http://127.0.0.1:{port}", log_path=log_path)


def wait_ready(stack: Stack, timeout_s: float) -> None:
    wait_until_serving(
        stack.process, f"{stack.url}/ready", what="the local stack", timeout_s=timeout_s,
        log_hint=lambda: f"; its log ({stack.log_path}) ends:\n{log_tail(stack.log_path)}",
        error=LoadTestError)


def stop_process(process: subprocess.Popen, what: str) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        logger.warning("%s did not stop within %g s of SIGINT: killing it", what, STOP_TIMEOUT_S)
        process.kill()
        process.wait()


def locust_command(plan: LocustPlan) -> list[str]:
    prefix = str(plan.prefix)
    return [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
            "--host", plan.host, "--users", str(plan.users), "--spawn-rate", str(plan.spawn_rate),
            "--run-time", f"{plan.duration_s}s", "--csv", prefix, "--csv-full-history",
            "--json-file", prefix, "--html", f"{prefix}.html", "--only-summary",
            *plan.user_classes]


def locust_env(plan: LocustPlan) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if key not in ("QUIVER_LOAD_SHAPE", "QUIVER_MODEL", "QUIVER_MAX_TOKENS")}
    env["PYTHONUNBUFFERED"] = "1"
    env["QUIVER_API_KEY"] = plan.api_key or ""
    if plan.model:
        env["QUIVER_MODEL"] = plan.model
    if plan.shape:
        env["QUIVER_LOAD_SHAPE"] = plan.shape
    if plan.max_tokens:
        env["QUIVER_MAX_TOKENS"] = str(plan.max_tokens)
    return env


def run_locust(plan: LocustPlan) -> int:
    """Run Locust to the end (or to Ctrl-C); its exit code (1 when any request failed)."""
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    log_path = plan.out_dir / "locust.log"
    logger.info("running Locust for %d s against %s (log %s)", plan.duration_s, plan.host,
                log_path)
    with log_path.open("w") as log:
        process = subprocess.Popen(locust_command(plan), stdout=log, stderr=subprocess.STDOUT,
                                   env=locust_env(plan), start_new_session=True,
                                   preexec_fn=default_sigint)
        try:
            return process.wait()
        finally:
            stop_process(process, "Locust")


def check_outputs(plan: LocustPlan, returncode: int) -> None:
    if not Path(f"{plan.prefix}.json").is_file():
        raise LoadTestError(f"Locust exited with code {returncode} without writing its "
                            f"results; its log ({plan.out_dir / 'locust.log'}) ends:\n"
                            f"{log_tail(plan.out_dir / 'locust.log')}")
