"""`quiver up --monitoring`: a local Prometheus scraping the stack, with Quiver's rules.

The config is written for the ports the stack actually uses (the committed
monitoring/prometheus/prometheus.yml assumes the defaults) and loads the recording and
alert rules from monitoring/prometheus/rules/ in place: one copy of every rule. Data goes
to `.quiver/prometheus/` under the working directory. Without a `prometheus` binary the
stack runs without it and says so.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from common.errors import QuiverError
from common.processes import wait_until_serving

logger = logging.getLogger(__name__)

MONITORING_DIR = Path(__file__).resolve().parents[1] / "monitoring"
RULES_DIR = MONITORING_DIR / "prometheus" / "rules"
PROMETHEUS_PORT = 9090
SCRAPE_INTERVAL = "5s"
READY_TIMEOUT_S = 60


@dataclass(frozen=True)
class ScrapeTargets:
    gateway: str              # host:port of the gateway's metrics_port (not its API port)
    servers: tuple[str, ...]


def prometheus_config(targets: ScrapeTargets, rules_dir: Path = RULES_DIR,
                      interval: str = SCRAPE_INTERVAL) -> dict:
    rule_files = sorted(str(path) for path in rules_dir.glob("*.yml"))
    if not rule_files:
        raise QuiverError(f"no Prometheus rules in {rules_dir}: is this a Quiver checkout?")
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": rule_files,
        "scrape_configs": [
            {"job_name": "quiver-gateway", "static_configs": [{"targets": [targets.gateway]}]},
            {"job_name": "quiver-server",
             "static_configs": [{"targets": list(targets.servers)}]},
        ],
    }


def start_prometheus(targets: ScrapeTargets, *, port: int = PROMETHEUS_PORT,
                     workdir: Path = Path(".quiver/prometheus"),
                     interval: str = SCRAPE_INTERVAL) -> subprocess.Popen | None:
    """Start Prometheus and wait until it is ready; None when the binary or the rules (an
    install without the repository's monitoring/) are missing."""
    binary = shutil.which("prometheus")
    if binary is None:
        logger.warning("--monitoring: no `prometheus` binary on PATH (Debian/Ubuntu: "
                       "apt-get install prometheus); running without it")
        return None
    if not any(RULES_DIR.glob("*.yml")):
        logger.warning("--monitoring: no rules in %s (run from a Quiver checkout); running "
                       "without Prometheus", RULES_DIR)
        return None
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(targets, interval=interval),
                                     sort_keys=False), encoding="utf-8")
    log = (workdir / "prometheus.log").open("ab")
    process = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=2d"],
        stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        wait_prometheus_ready(process, port, workdir / "prometheus.log")
    except BaseException:
        stop_prometheus(process)
        raise
    return process


def wait_prometheus_ready(process: subprocess.Popen, port: int, log: Path) -> None:
    def log_tail() -> str:
        tail = log.read_text(encoding="utf-8", errors="replace")[-2000:]
        return f"; {log} ends:\n{tail}"

    wait_until_serving(process, f"http://127.0.0.1:{port}/-/ready",
                       what=f"Prometheus on :{port}", timeout_s=READY_TIMEOUT_S,
                       log_hint=log_tail)


def stop_prometheus(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
