"""`quiver optimize distill`: student selection, the KD loss, budgets, checkpoints and
exact resume on the tiny model; SmolLM2 figures (speed, KD
vs CE alone) come from benchmarks/optimize.py."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common.errors import QuiverError
from optimize.distill_train import (
    CheckpointStore,
    StopTraining,
    TrainSettings,
    batch_indices,
    distill_loss,
    pack_tokens,
    train,
)
from optimize.methods.distill import make_student, parse_layer_map, prepare_store

SETTINGS = TrainSettings(seq_len=32, batch_size=2, lr=3e-3, warmup_steps=2, max_steps=6,
                         checkpoint_every=100)


@pytest.fixture(scope="module")
def teacher(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def sequences(tiny_model_dir: Path) -> torch.Tensor:
    from optimize.data import load_texts
    from optimize.methods.distill import calibration_ids

    texts = load_texts(None, "calibration", limit=8).texts
    token_lists, separator = calibration_ids(tiny_model_dir, texts)
    return pack_tokens(token_lists, SETTINGS.seq_len, separator)


def run(teacher, sequences, store_dir: Path, settings: TrainSettings = SETTINGS, **kwargs):
    student = make_student(teacher, [1])
    result = train(teacher, student, sequences, settings, CheckpointStore(store_dir), **kwargs)
    return student, result


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6, msg=name)


# --------------------------------------------------------------------------- student


def test_default_layer_map_is_every_other_layer():
    assert parse_layer_map(None, 30, None) == list(range(0, 30, 2))
    assert parse_layer_map(None, 2, None) == [0]
    assert parse_layer_map(None, 5, None) == [0, 2, 4]
    assert parse_layer_map(None, 12, 4) == [0, 3, 6, 9]
    assert parse_layer_map("1, 5,9", 10, 3) == [1, 5, 9]


@pytest.mark.parametrize("text,layers", [("0,30", None), ("2,1", None), ("a,b", None),
                                         ("0,1", 3), ("0,0", None)])
def test_bad_layer_map_is_refused(text: str, layers: int | None):
    with pytest.raises(QuiverError, match="--layer-map"):
        parse_layer_map(text, 30, layers)


def test_student_copies_the_mapped_teacher_layers(teacher):
    student = make_student(teacher, [1])
    assert student.config.num_hidden_layers == 1 and len(student.model.layers) == 1
    teacher_state = teacher.state_dict()
    for name, tensor in student.state_dict().items():
        source = name.replace("model.layers.0.", "model.layers.1.")
        assert torch.equal(tensor, teacher_state[source]), name
    # A copy, not a view: training the student leaves the teacher alone.
    with torch.no_grad():
        student.model.layers[0].mlp.down_proj.weight.add_(1.0)
    assert not torch.equal(student.model.layers[0].mlp.down_proj.weight,
                           teacher.model.layers[1].mlp.down_proj.weight)


# --------------------------------------------------------------------------- loss, data


def test_loss_is_ce_at_kd_weight_zero_and_kl_at_one():
    torch.manual_seed(0)
    logits, ids = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(distill_loss(logits, logits + 3.0, ids, 0.0, 2.0), ce)
    # Same distribution (a shift does not change a softmax): no KL.
    assert distill_loss(logits, logits + 3.0, ids, 1.0, 2.0).abs().item() < 1e-5
    other = torch.randn(2, 5, 11)
    p, q = (torch.log_softmax(x / 2.0, -1) for x in (other, logits))
    kl = (p.exp() * (p - q)).sum(-1).mean() * 4.0
    torch.testing.assert_close(distill_loss(logits, other, ids, 1.0, 2.0), kl)


def test_packing_and_batches_cover_every_sequence_once_per_epoch():
    packed = pack_tokens([[1, 2, 3], [4, 5]], 3, separator_id=0)
    assert packed.tolist() == [[1, 2, 3], [0, 4, 5]]
    epoch = [row for step in range(5) for row in batch_indices(step, 2, 10, seed=1)]
    assert sorted(epoch) == list(range(10))
    assert batch_indices(7, 2, 10, seed=1) == batch_indices(7, 2, 10, seed=1)
    assert epoch != [row for step in range(5) for row in batch_indices(step, 2, 10, seed=2)]
    with pytest.raises(QuiverError, match="--seq-len"):
        pack_tokens([[1, 2]], 8, separator_id=0)


# --------------------------------------------------------------------------- training


def test_training_lowers_the_loss(teacher, sequences, tmp_path):
    def loss_of(student) -> float:
        with torch.no_grad():
            batch = sequences[:8]
            return distill_loss(student(input_ids=batch).logits, teacher(input_ids=batch).logits,
                                batch, 0.5, 2.0).item()

    before = loss_of(make_student(teacher, [1]))
    student, result = run(teacher, sequences, tmp_path, TrainSettings(
        seq_len=32, batch_size=4, lr=3e-3, warmup_steps=2, max_steps=20))
    assert result.steps == 20 and result.stopped_by == "max_steps"
    assert result.tokens_seen == 20 * 4 * 32
    assert loss_of(student) < 0.9 * before


def test_resume_continues_exactly(teacher, sequences, tmp_path):
    straight, full = run(teacher, sequences, tmp_path / "a")

    def stop_at_3(step: int, loss: float) -> None:
        if step == 3:
            raise StopTraining

    _, first = run(teacher, sequences, tmp_path / "b", on_step=stop_at_3)
    assert first.steps == 3 and first.stopped_by == "stopped"
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["step-000003.pt"]
    resumed, second = run(teacher, sequences, tmp_path / "b", resume=True)
    assert second.steps == 6 and second.tokens_seen == full.tokens_seen
    assert second.final_loss == pytest.approx(full.final_loss, abs=1e-6)
    assert_same_weights(straight, resumed)


@pytest.mark.parametrize("how", ["exception", "signal"])
def test_ctrl_c_checkpoints_then_resume_continues_exactly(teacher, sequences, tmp_path, how):
    straight, _ = run(teacher, sequences, tmp_path / "a")

    def interrupt_after_4(step: int, loss: float) -> None:
        if step == 4:
            if how == "signal":      # a real SIGINT: held until the step ends
                os.kill(os.getpid(), signal.SIGINT)
            else:
                raise KeyboardInterrupt

    before = signal.getsignal(signal.SIGINT)  # SIG_IGN under nohup or CI runners
    with pytest.raises(KeyboardInterrupt):
        run(teacher, sequences, tmp_path / "b", on_step=interrupt_after_4)
    assert CheckpointStore(tmp_path / "b").latest().name == "step-000004.pt"
    assert signal.getsignal(signal.SIGINT) is before          # the trainer put it back
    resumed, result = run(teacher, sequences, tmp_path / "b", resume=True)
    assert result.steps == 6
    assert_same_weights(straight, resumed)


def test_minutes_and_max_steps_budgets_stop_training(teacher, sequences, tmp_path):
    _, by_steps = run(teacher, sequences, tmp_path / "a",
                      TrainSettings(seq_len=32, batch_size=2, max_steps=2))
    assert (by_steps.steps, by_steps.stopped_by) == (2, "max_steps")
    started = time.monotonic()
    _, by_time = run(teacher, sequences, tmp_path / "b",
                     TrainSettings(seq_len=32, batch_size=2, max_steps=10_000, minutes=0.002))
    assert by_time.stopped_by == "minutes" and 1 <= by_time.steps < 10_000
    assert time.monotonic() - started < 30
    assert CheckpointStore(tmp_path / "b").latest().name == f"step-{by_time.steps:06d}.pt"


def test_checkpoints_every_n_steps_keep_only_the_newest(teacher, sequences, tmp_path):
    seen: list[list[str]] = []

    def listing(step: int, loss: float) -> None:
        seen.append(sorted(p.name for p in tmp_path.iterdir()))

    run(teacher, sequences, tmp_path, TrainSettings(seq_len=32, batch_size=2, max_steps=5,
                                                    checkpoint_every=2), on_step=listing)
    # The hook runs before the step's checkpoint: step 3 sees step 2's, step 5 step 4's.
    assert seen == [[], [], ["step-000002.pt"], ["step-000002.pt"], ["step-000004.pt"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000005.pt"]


def test_resume_refuses_a_checkpoint_of_another_run(teacher, sequences, tmp_path):
    run(teacher, sequences, tmp_path, TrainSettings(seq_len=32, batch_size=2, max_steps=1))
    with pytest.raises(QuiverError, match="batch_size 2 -> 3"):
        run(teacher, sequences, tmp_path, TrainSettings(seq_len=32, batch_size=3, max_steps=2),
            resume=True)
    with pytest.raises(QuiverError, match="no checkpoint"):
        run(teacher, sequences, tmp_path / "empty", resume=True)
    with pytest.raises(QuiverError, match="--resume"):
        prepare_store(tmp_path, resume=False, overwrite=False)
    assert prepare_store(tmp_path, resume=False, overwrite=True).latest() is None


# --------------------------------------------------------------------------- end to end


def optimize_distill(model: Path, out: Path, *extra: str) -> dict:
    command = [sys.executable, "-m", "quiver", "optimize", "distill", "--model", str(model),
               "--out", str(out), *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "manifest.json").read_text())


def test_cli_writes_a_servable_student_and_resumes(tiny_model_dir, tmp_path):
    from serving.models.loader import load_model

    out = tmp_path / "student"
    common = ("--eval-samples", "5", "--decode-tokens", "8", "--calib-samples", "16")
    manifest = optimize_distill(tiny_model_dir, out, "--max-steps", "5", *common)
    assert manifest["format"] == "safetensors" and manifest["method"] == "distill"
    params, metrics = manifest["params"], manifest["metrics"]
    assert params["student_layers"] == 1 and params["layer_map"] == [0]
    assert params["steps"] == 5 and params["tokens_seen"] == 5 * 4 * 256
    assert math.isfinite(params["final_loss"]) and params["train_seconds"] > 0
    for key in ("perplexity", "baseline_perplexity", "decode_tokens_per_s",
                "baseline_decode_tokens_per_s"):
        assert metrics[key] > 0, key
    assert load_model(out).arch.num_hidden_layers == 1
    assert (out / "tokenizer.json").read_bytes() == (tiny_model_dir / "tokenizer.json").read_bytes()
    assert (tmp_path / "student.ckpt" / "step-000005.pt").is_file()

    resumed = optimize_distill(tiny_model_dir, out, "--max-steps", "7", "--resume",
                               "--overwrite", *common)
    assert resumed["params"]["steps"] == 7


# --------------------------------------------------------------------------- SmolLM2


def best_decode_ratio(student: Path, teacher: Path, rounds: int = 2) -> float:
    """Student vs teacher decode tokens/s, interleaved, best of each: steadier on a busy CPU."""
    from optimize.evaluate import native_decode_rate

    rates = {student: 0.0, teacher: 0.0}
    for _ in range(rounds):
        for model in rates:
            rates[model] = max(rates[model], native_decode_rate(model, 64))
    return rates[student] / rates[teacher]
