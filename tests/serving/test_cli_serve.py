"""`quiver serve`: flags map one-to-one onto ServerSettings (env as defaults); a real
server in a subprocess answers /ready and drains then exits cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from quiver.cli import build_parser
from serving.cli import settings_from_args


def parse(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_flags_map_onto_server_settings(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("QUIVER_SERVER_MAX_NUM_SEQS", "7")
    monkeypatch.setenv("QUIVER_SERVER_PORT", "9100")
    settings = settings_from_args(parse(
        "--model", str(tiny_model_dir), "--engine", "native", "--port", "9001",
        "--served-model-name", "m", "--device", "cpu", "--dtype", "float32",
        "--kv-cache-memory", "0.5", "--max-num-batched-tokens", "512",
        "--max-model-len", "1024", "--no-enable-prefix-caching",
        "--shutdown-grace-seconds", "3"))
    assert (settings.port, settings.max_num_seqs) == (9001, 7)  # flag beats env; env default
    assert settings.name == "m" and settings.kv_cache_memory == 0.5
    assert settings.max_model_len == 1024 and settings.enable_prefix_caching is False
    assert settings.max_num_batched_tokens == 512 and settings.shutdown_grace_seconds == 3


def test_bad_settings_are_one_clear_error(tmp_path):
    from common.errors import QuiverError

    with pytest.raises(QuiverError, match="max_num_seqs"):
        settings_from_args(parse("--model", str(tmp_path), "--max-num-seqs", "0"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_answers_ready_then_drains_on_sigterm(tiny_model_dir):
    port = free_port()
    script = Path(sys.executable).parent / "quiver"
    env = {**os.environ, "QUIVER_SERVER_DEVICE": "cpu"}
    process = subprocess.Popen(
        [str(script), "serve", "--model", str(tiny_model_dir), "--port", str(port),
         "--kv-cache-memory", "0.02", "--shutdown-grace-seconds", "10"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server never became ready"
            time.sleep(0.2)
        result = {}

        def in_flight() -> None:
            result["response"] = httpx.post(f"{base}/v1/completions", timeout=60, json={
                "model": tiny_model_dir.name, "prompt": "Hi", "max_tokens": 300,
                "ignore_eos": True})

        thread = threading.Thread(target=in_flight)
        thread.start()
        time.sleep(0.3)
        process.send_signal(signal.SIGTERM)
        thread.join(60)
        assert process.wait(timeout=20) == 0
        response = result["response"]
        assert response.status_code == 200  # the in-flight request was drained, not cut
        assert response.json()["usage"]["completion_tokens"] == 300
        output = process.stdout.read()
        assert "stopping the engine" in output and "Traceback" not in output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()


def test_vllm_options_from_flags_and_env(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("QUIVER_SERVER_VLLM_ENGINE_ARGS", '{"swap_space": 8}')
    settings = settings_from_args(parse("--model", str(tiny_model_dir), "--engine", "vllm",
                                        "--tensor-parallel-size", "2"))
    assert settings.tensor_parallel_size == 2
    assert settings.vllm_engine_args == {"swap_space": 8}
    monkeypatch.delenv("QUIVER_SERVER_VLLM_ENGINE_ARGS")
    flagged = settings_from_args(parse("--model", str(tiny_model_dir), "--engine", "vllm",
                                       "--vllm-engine-args", '{"quantization": "awq_marlin"}'))
    assert flagged.vllm_engine_args == {"quantization": "awq_marlin"}


def test_vllm_options_are_refused_on_other_engines_and_bad_json(tiny_model_dir, capsys):
    from common.errors import QuiverError

    with pytest.raises(QuiverError, match="need --engine vllm"):
        settings_from_args(parse("--model", str(tiny_model_dir), "--engine", "native",
                                 "--tensor-parallel-size", "2"))
    with pytest.raises(SystemExit):
        parse("--model", str(tiny_model_dir), "--vllm-engine-args", "[1, 2]")
    assert "expected a JSON object" in capsys.readouterr().err


def test_vllm_engine_arguments_carry_our_settings_and_the_extras(tiny_model_dir):
    from types import SimpleNamespace

    from serving.backends.vllm import engine_args

    class FakeEngineArgs:  # what vllm.AsyncEngineArgs checks: known keyword arguments only
        def __init__(self, *, model, served_model_name, dtype, max_num_seqs,
                     max_num_batched_tokens, max_model_len, enable_prefix_caching,
                     gpu_memory_utilization, kv_cache_memory_bytes, enforce_eager,
                     tensor_parallel_size, disable_log_stats, structured_outputs_config,
                     swap_space=4):
            self.tensor_parallel_size, self.swap_space = tensor_parallel_size, swap_space
            self.enforce_eager = enforce_eager
            self.structured_outputs_config = structured_outputs_config

    vllm = SimpleNamespace(AsyncEngineArgs=FakeEngineArgs, StructuredOutputsConfig=dict)
    settings = settings_from_args(parse(
        "--model", str(tiny_model_dir), "--engine", "vllm", "--tensor-parallel-size", "4",
        "--vllm-engine-args", '{"swap_space": 16, "enforce_eager": true}'))
    args = engine_args(vllm, settings, is_cpu=False)
    assert (args.tensor_parallel_size, args.swap_space, args.enforce_eager) == (4, 16, True)
    assert args.structured_outputs_config == {"backend": "xgrammar",
                                              "disable_any_whitespace": True}
    clash = settings.model_copy(update={"vllm_engine_args": {"max_num_seqs": 3}})
    with pytest.raises(ValueError, match="max_num_seqs, which Quiver's own settings own"):
        engine_args(vllm, clash, is_cpu=False)
    unknown = settings.model_copy(update={"vllm_engine_args": {"no_such_arg": 1}})
    with pytest.raises(ValueError, match="vllm_engine_args: .*no_such_arg"):
        engine_args(vllm, unknown, is_cpu=False)
