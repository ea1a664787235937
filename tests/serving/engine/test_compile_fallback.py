"""A host where the C++ kernels cannot build and torch.compile cannot compile still serves.

`quiver serve` runs in a subprocess whose C++ compiler (`CXX`, which both our kernel build
and inductor use) always fails, over empty caches: the engine must log both fallbacks,
become ready, and answer like the default engine does.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

PROMPT = [5, 17, 33, 101, 7, 64]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def failing_compiler(directory: Path) -> Path:
    """A `c++` that reports a version (so it looks installed) and fails every build."""
    path = directory / "failing-c++"
    path.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo 'c++ 0' && exit 0\n"
                    "echo 'error: this compiler always fails' >&2\nexit 1\n")
    path.chmod(0o755)
    return path


def serve_and_complete(model_dir: Path, repo_root: Path, env: dict[str, str],
                       cache_dir: Path) -> tuple[list[str], str]:
    """Start `quiver serve`, ask for 8 greedy tokens, stop it; (the answer's text, log)."""
    port = free_port()
    env = {key: value for key, value in env.items() if not key.startswith("TORCHINDUCTOR_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "quiver", "serve", "--model", str(model_dir), "--port", str(port),
         "--dtype", "float32", "--kv-cache-memory", "0.02", "--compile-cache-dir",
         str(cache_dir)],
        cwd=repo_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server never became ready"
            time.sleep(0.2)
        response = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60, json={
            "model": model_dir.name, "prompt": PROMPT, "max_tokens": 8, "temperature": 0,
            "ignore_eos": True, "logprobs": 0})
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
    finally:
        process.terminate()
        log, _ = process.communicate(timeout=60)
    return choice["logprobs"]["tokens"], log


def test_server_falls_back_when_nothing_compiles(tiny_model_dir, repo_root, tmp_path,
                                                 quiver_cache_dir):
    env = {**os.environ, "CXX": str(failing_compiler(tmp_path))}
    tokens, log = serve_and_complete(tiny_model_dir, repo_root, env, tmp_path / "cache")
    assert "C++ kernels are unavailable" in log and "always fails" in log
    assert "not compiling the model" in log and "running it eagerly" in log
    assert "eager, attention torch" in log
    expected, default_log = serve_and_complete(tiny_model_dir, repo_root, dict(os.environ),
                                               quiver_cache_dir)
    assert "compiled, attention cpp" in default_log
    assert tokens == expected and len(tokens) == 8




def test_a_miscompiled_graph_is_caught_at_start_and_the_model_runs_eagerly(
        tiny_model_dir, compiled_config, monkeypatch, caplog) -> None:
    """The start-up check compares every warmed graph with eager; a graph that answers
    wrongly (as inductor's AVX2 code around the packed-linear op did, with NaNs) is never
    served: the runner logs why and runs eagerly, with the same answers."""
    import torch

    from serving.engine.model_runner import ModelRunner
    from serving.engine.sampler import Sampler
    from serving.models import compiled as compiled_module

    def miscompiled(self, kv_caches, example_step, num_tokens):
        raise RuntimeError("the compiled 1-token step differs from eager (max error nan)")

    monkeypatch.setattr(compiled_module.CompiledForward, "_check_against_eager", miscompiled)
    with caplog.at_level("WARNING"):
        runner = ModelRunner(tiny_model_dir, device="cpu", dtype=torch.float32, num_blocks=16,
                             block_size=16, sampler=Sampler("cpu"), compilation=compiled_config)
    assert "compiling the model failed, running it eagerly: the compiled 1-token step" \
        in caplog.text
    assert not runner.is_compiled
    input_ids, positions, metadata = runner._example_step(3)
    input_ids = torch.tensor([5, 17, 33])
    with torch.inference_mode():
        served = runner.forward(input_ids, positions, runner.kv_caches, metadata)
        with torch.compiler.set_stance("force_eager"):
            eager = runner.model(input_ids, positions, runner.kv_caches, metadata)
    torch.testing.assert_close(served, eager, atol=0, rtol=0)

def test_the_start_check_rejects_nan_and_wrong_answers() -> None:
    """What the check accepts: bf16 rounding of hidden states; not O(1) errors or NaN."""
    import torch

    from serving.models.compiled import CHECK_TOLERANCE, relative_error

    hidden = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)) * 3
    rounded = hidden.to(torch.bfloat16) * (1 + 0.05 * torch.randn(8, 64).sign() / 3)
    assert relative_error(rounded, hidden) <= CHECK_TOLERANCE
    assert relative_error(torch.zeros_like(hidden), hidden) > CHECK_TOLERANCE  # token 0 forever
    assert relative_error(hidden.flip(0), hidden) > CHECK_TOLERANCE  # rows mixed up
    poisoned = hidden.clone()
    poisoned[3, 5] = float("nan")
    assert not relative_error(poisoned, hidden) <= CHECK_TOLERANCE
