"""`quiver up`: model server(s) and the gateway on loopback, a working key, clean stop."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import openai
import pytest

from quiver.cli import main
from tests.gateway.conftest import free_port, wait_until

KEY_LINE = re.compile(r"API key \(new, named 'quiver-up'\): (qk-\S+)")


def free_port_pair() -> int:
    """A port whose successor is free too: `quiver up` puts the canary server there."""
    import socket

    while True:
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port


def start_up(tmp_path, *args: str, env: dict[str, str] | None = None):
    # ports the caller chose (metrics, Prometheus) are released until quiver up binds them
    taken = {int(value) for flag, value in zip(args, args[1:], strict=False)
             if flag.endswith("-port")}
    server_port = free_port_pair()
    while {server_port, server_port + 1} & taken:
        server_port = free_port_pair()
    taken |= {server_port, server_port + 1}
    gateway_port = free_port()
    while gateway_port in taken:
        gateway_port = free_port()
    log = (tmp_path / "up.log").open("w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "quiver", "up", "--port", str(gateway_port), "--server-port",
         str(server_port), "--store", str(tmp_path / "keys.db"), *args],
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, stdout=log,
        stderr=subprocess.STDOUT, cwd=tmp_path)
    return process, log, gateway_port


def read_log(log) -> str:
    log.seek(0)
    return log.read()


def stop(process, log) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    finally:
        log.close()


@pytest.mark.slow
def test_up_serves_through_the_gateway_with_a_printed_key(tiny_model_dir, tmp_path):
    process, log, port = start_up(tmp_path, "--model", str(tiny_model_dir),
                                  env={"QUIVER_API_KEY": ""})
    try:
        wait_until(lambda: KEY_LINE.search(read_log(log)) or process.poll() is not None, 180,
                   "quiver up")
        output = read_log(log)
        match = KEY_LINE.search(output)
        assert match, output
        assert f"http://127.0.0.1:{port}/v1/chat/completions" in output
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=match[1],
                           max_retries=2) as client:
            raw = client.chat.completions.with_raw_response.create(  # EOS ignored: sampled
                model="tiny-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                extra_body={"ignore_eos": True})
        assert raw.parse().usage.completion_tokens == 4
        assert raw.headers["x-quiver-variant"] == "stable"
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="qk-wrong",
                           max_retries=0) as wrong, pytest.raises(openai.AuthenticationError):
            wrong.models.list()
    finally:
        output = read_log(log)
        stop(process, log)
    assert process.returncode == 0, output[-3000:]


@pytest.mark.slow
def test_up_with_a_canary_and_a_given_key(tiny_model_dir, tmp_path):
    secret = "qk-given-by-the-environment-for-this-test"
    process, log, port = start_up(tmp_path, "--model", str(tiny_model_dir), "--canary-model",
                                  str(tiny_model_dir), "--canary-weight", "50",
                                  env={"QUIVER_API_KEY": secret})
    try:
        wait_until(lambda: "Ctrl-C stops it" in read_log(log) or process.poll() is not None,
                   240, "quiver up")
        assert "API key: the one in $QUIVER_API_KEY" in read_log(log)
        time.sleep(0.5)
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=secret,
                           max_retries=2) as client:
            seen = set()
            for user in range(24):
                raw = client.chat.completions.with_raw_response.create(
                    model="tiny-llama", messages=[{"role": "user", "content": "hi"}],
                    max_tokens=1, user=f"user-{user}")
                seen.add(raw.headers["x-quiver-variant"])
            assert seen == {"stable", "canary"}
            pinned = client.chat.completions.with_raw_response.create(
                model="tiny-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=1,
                extra_headers={"x-quiver-variant": "canary"})
            assert pinned.headers["x-quiver-variant"] == "canary"
    finally:
        output = read_log(log)
        stop(process, log)
    assert secret not in output


def test_up_rejects_a_canary_weight_without_a_canary(capsys, tmp_path):
    assert main(["up", "--model", str(tmp_path), "--canary-weight", "10"]) == 1
    assert "--canary-weight needs --canary-model" in capsys.readouterr().err


def test_up_rejects_a_missing_model_dir(capsys, tmp_path):
    assert main(["up", "--model", str(tmp_path / "absent")]) == 1
    assert "is not a directory" in capsys.readouterr().err


def test_up_refuses_a_canary_port_already_in_use(capsys, tmp_path):
    """The canary server goes on --server-port + 1: a stale server listening there would
    answer the readiness check in place of the new one."""
    import socket

    with socket.socket() as taken, socket.socket() as probe:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        try:
            probe.bind(("127.0.0.1", port - 1))  # the stable server's port must be free
        except OSError:
            pytest.skip(f"port {port - 1} is taken by something else on this host")
        probe.close()
        assert main(["up", "--model", str(tmp_path), "--canary-model", str(tmp_path),
                     "--server-port", str(port - 1)]) == 1
    error = capsys.readouterr().err
    assert f"port {port} for the canary model server is in use" in error
    assert "--server-port" in error
