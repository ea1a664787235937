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
from loadtests.calllog import CALL_LOG_ENV
from loadtests.errors import LoadTestError
from loadtests.tenants import API_KEYS_ENV, DEFAULT_TENANT, Tenant, format_api_keys

logger = logging.getLogger(__name__)

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
LOCUST_PREFIX = "locust"
CALL_LOG = "calls.jsonl"
STOP_TIMEOUT_S = 60.0
OPEN_LOOP_USER = "OpenLoopUser"
# Kinds of traffic (workloads.py) -> their closed-loop Locust users (scenarios.py).
USER_CLASSES = {"stream": "StreamingChatUser", "chat": "ChatUser",
                "completion": "CompletionUser", "cached": "CachedPromptUser",
                "conversation": "ConversationUser"}
# What the plan sets in Locust's environment; inherited values are dropped first.
PLAN_ENV = ("QUIVER_LOAD_SHAPE", "QUIVER_MODEL", "QUIVER_MAX_TOKENS", "QUIVER_RATE",
            "QUIVER_WORKLOAD", "QUIVER_MAX_IN_FLIGHT", "QUIVER_CONVERSATION_TURNS", "QUIVER_SEED",
            API_KEYS_ENV, CALL_LOG_ENV)


@dataclass(frozen=True)
class LocustPlan:
    host: str
    tenants: list[Tenant]          # one: its key is QUIVER_API_KEY; more: QUIVER_API_KEYS
    model: str | None
    users: int
    spawn_rate: float
    duration_s: int
    shape: str | None
    kinds: list[str]               # workloads (USER_CLASSES keys), run together by weight
    out_dir: Path
    max_tokens: int | None = None
    rate: float | None = None      # open loop: arrivals/s (users, spawn rate, shape unused)
    max_in_flight: int | None = None
    num_turns: int | None = None
    seed: int | None = None

    @property
    def prefix(self) -> Path:
        return self.out_dir / LOCUST_PREFIX

    @property
    def call_log(self) -> Path:
        return self.out_dir / CALL_LOG

    @property
    def user_classes(self) -> list[str]:
        if self.rate is not None:
            return [OPEN_LOOP_USER]
        return [USER_CLASSES[kind] for kind in self.kinds]


@dataclass
class Stack:
    process: subprocess.Popen
    url: str                       # the gateway
    server_url: str                # its model server
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


def key_store(workdir: Path) -> Path:
    return workdir / "keys.db"


def create_keys(workdir: Path, names: list[str]) -> dict[str, str]:
    """A new key per name in the local stack's store (`quiver keys create`), before it starts."""
    keys = {}
    for name in names:
        command = [sys.executable, "-m", "quiver", "keys", "create", "--name", name,
                   "--store", str(key_store(workdir))]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60,
                                check=False)
        if result.returncode != 0 or not result.stdout.strip():
            raise LoadTestError(f"cannot create a key for tenant {name}: "
                                f"{result.stderr.strip()[-500:]}")
        keys[name] = result.stdout.strip()
    return keys


def start_stack(model: Path, workdir: Path, api_key: str) -> Stack:
    port, server_port = free_port(), free_port()
    log_path = workdir / "stack.log"
    command = [sys.executable, "-m", "quiver", "up", "--model", str(model), "--port", str(port),
               "--server-port", str(server_port), "--store", str(key_store(workdir))]
    logger.info("starting the local stack: %s (log %s)", " ".join(command), log_path)
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=default_sigint,
            env={**os.environ, "QUIVER_API_KEY": api_key, "PYTHONUNBUFFERED": "1"})
    return Stack(process=process, url=f"http://127.0.0.1:{port}",
                 server_url=f"http://127.0.0.1:{server_port}", log_path=log_path)


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
    users, spawn_rate = (1, 1.0) if plan.rate is not None else (plan.users, plan.spawn_rate)
    return [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
            "--host", plan.host, "--users", str(users), "--spawn-rate", str(spawn_rate),
            "--run-time", f"{plan.duration_s}s", "--csv", prefix, "--csv-full-history",
            "--json-file", prefix, "--html", f"{prefix}.html", "--only-summary",
            *plan.user_classes]


def locust_env(plan: LocustPlan) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in PLAN_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    env["QUIVER_API_KEY"] = plan.tenants[0].api_key or ""
    if [tenant.name for tenant in plan.tenants] != [DEFAULT_TENANT]:
        env[API_KEYS_ENV] = format_api_keys(plan.tenants)
    env[CALL_LOG_ENV] = str(plan.call_log)
    optional = {"QUIVER_MODEL": plan.model, "QUIVER_LOAD_SHAPE": plan.shape,
                "QUIVER_MAX_TOKENS": plan.max_tokens, "QUIVER_RATE": plan.rate,
                "QUIVER_MAX_IN_FLIGHT": plan.max_in_flight,
                "QUIVER_CONVERSATION_TURNS": plan.num_turns, "QUIVER_SEED": plan.seed}
    env.update({key: str(value) for key, value in optional.items() if value is not None})
    if plan.rate is not None:
        env["QUIVER_WORKLOAD"] = ",".join(plan.kinds)
    return env


def run_locust(plan: LocustPlan) -> int:
    """Run Locust to the end (or to Ctrl-C); its exit code (1 when any request failed)."""
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    plan.call_log.unlink(missing_ok=True)   # appended to by Locust: start empty
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
