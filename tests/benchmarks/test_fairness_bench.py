"""The fairness benchmark's replicas start as asked (e.g. both on one GPU)."""

from __future__ import annotations

from pathlib import Path

from benchmarks import fairness


class Started:
    def __init__(self, argv: list[str]) -> None:
        self.argv = argv

    def wait_ready(self, path: str, timeout_s: float) -> None:
        assert path == "/ready"


def test_replica_args_reach_quiver_serve(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(fairness, "launch", lambda name, argv, workdir, port: Started(argv))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # restored after the test
    plain = fairness.start_replica(Path("m"), tmp_path, 0, 1)
    gpu = fairness.start_replica(Path("m"), tmp_path, 1, 1,
                                 "--device cuda --kv-cache-memory 8")
    assert plain.argv[plain.argv.index("serve") + 1:][-2:] == ["--served-model-name", "chat"]
    assert gpu.argv[-4:] == ["--device", "cuda", "--kv-cache-memory", "8"]
