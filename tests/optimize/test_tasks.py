"""The task score (`optimize.tasks`): deterministic items, exact-match reading, greedy
agreement, and both measured on the tiny model by the native engine."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from common.corpus import documents
from optimize.evaluate import run_tasks
from optimize.tasks import (
    AGREEMENT_TOKENS,
    NUM_AGREEMENT_PROMPTS,
    NUM_ARITHMETIC,
    NUM_CLOZE,
    NUM_SEQUENCE,
    TaskComparison,
    TaskResult,
    build_items,
    build_suite,
    greedy_agreement,
    is_exact,
    score,
)


@pytest.fixture(scope="module")
def held_out() -> list[str]:
    return list(documents("evaluation"))


@pytest.fixture(scope="module")
def suite(tiny_model_dir: Path, held_out: list[str]):
    return build_suite(tiny_model_dir, held_out)


def test_items_are_the_same_every_time_and_answerable(held_out: list[str]) -> None:
    items = build_items(held_out)
    assert items == build_items(list(documents("evaluation")))
    counts = {task: sum(item.task == task for item in items)
              for task in ("cloze", "arithmetic", "sequence")}
    assert counts == {"cloze": NUM_CLOZE, "arithmetic": NUM_ARITHMETIC,
                      "sequence": NUM_SEQUENCE}
    assert len({item.prompt for item in items}) == len(items)           # no duplicates
    for item in items:
        if item.task == "cloze":   # the word is in its context, and the context in the text
            assert re.search(rf"\b{item.answer}\b", item.prompt), item
            assert any(item.prompt + " " + item.answer in text for text in held_out), item
        elif item.task == "arithmetic":
            a, op, b = item.prompt.splitlines()[-1].removesuffix(" =").split()
            assert int(item.answer) == (int(a) + int(b) if op == "+" else int(a) - int(b))
        else:
            assert item.prompt.endswith("\n5.") and item.prompt.startswith("1. ")


def test_fewer_passages_give_fewer_cloze_items(held_out: list[str]) -> None:
    items = build_items(held_out[:3])
    assert sum(item.task == "cloze" for item in items) <= 6
    assert sum(item.task != "cloze" for item in items) == NUM_ARITHMETIC + NUM_SEQUENCE


@pytest.mark.parametrize(("answer", "generated", "exact"), [
    ("side", " side are equal", True),
    ("side", " sides", False),
    ("side", " side_effect", False),
    ("value", " value)\n\n", True),
    ("6", " 6\n1", True),
    ("6", " 61", False),
    ("May", "May", True),
    ("May", " and May.", False),
    ("z", "\nz", True),
])
def test_an_answer_is_exact_when_the_word_ends_where_expected(answer, generated, exact):
    assert is_exact(answer, generated) is exact


def test_scores_count_exact_answers_per_task_and_stop_at_eos(suite) -> None:
    tokenizer = suite.tokenizer
    agreement = [[5] * AGREEMENT_TOKENS for _ in suite.agreement_prompt_ids]

    def answer(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    right = [answer(f" {item.answer}\n") for item in suite.items]
    perfect = score(suite, right + agreement)
    assert perfect.score == 100.0 and perfect.num_items == len(suite.items) == 64
    assert perfect.scores == {"cloze": 100.0, "arithmetic": 100.0, "sequence": 100.0}
    assert perfect.continuations == agreement
    eos = tokenizer.eos_token_id
    # Every other arithmetic answer is wrong; a right answer after EOS does not count.
    mixed = [ids if item.task != "arithmetic" or index % 2 else [eos, *ids]
             for index, (item, ids) in enumerate(zip(suite.items, right, strict=True))]
    result = score(suite, mixed + agreement)
    assert result.scores["arithmetic"] == 50.0 and result.scores["cloze"] == 100.0
    assert result.score == pytest.approx(100 * (64 - NUM_ARITHMETIC / 2) / 64, abs=0.01)
    with pytest.raises(ValueError, match="outputs for a suite of"):
        score(suite, right)


def test_agreement_counts_tokens_up_to_the_first_divergence() -> None:
    def result(*continuations: list[int]) -> TaskResult:
        return TaskResult(0.0, {}, 0, list(continuations))

    source = result([1, 2, 3, 4], [1, 2, 3, 4])
    assert greedy_agreement(source, source) == 100.0
    # first prompt parts at token 2 (later agreement does not count), second never
    assert greedy_agreement(source, result([1, 9, 3, 4], [1, 2, 3, 4])) == 62.5
    assert greedy_agreement(source, result([7, 2, 3, 4], [1, 2, 3, 0])) == 37.5


def test_comparison_reads_as_points(suite) -> None:
    source = TaskResult(60.94, {"cloze": 50.0}, 64, [[1, 2], [3, 4]])
    artifact = TaskResult(57.81, {"cloze": 43.75}, 64, [[1, 2], [3, 5]])
    compared = TaskComparison.of(suite, artifact, source)
    assert compared.metrics() == {
        "task_suite": "quiver-tasks-1", "task_items": 64, "task_score": 57.81,
        "baseline_task_score": 60.94, "task_scores": {"cloze": 43.75},
        "baseline_task_scores": {"cloze": 50.0}, "greedy_agreement": 75.0}
    assert compared.describe() == ("task score 57.8 (source 60.9: -3.1 points), "
                                   "greedy agreement 75.0 %")
    alone = TaskComparison.of(suite, artifact)
    assert alone.greedy_agreement is None and alone.baseline_score is None
    assert alone.describe() == "task score 57.8"


def add_noise(weights_file: Path, noise: float) -> None:
    """Add seeded Gaussian noise to every matrix of a safetensors file, in place."""
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(weights_file)
    generator = torch.Generator().manual_seed(0)
    for tensor in weights.values():
        if tensor.is_floating_point() and tensor.dim() == 2:
            tensor += noise * torch.randn(tensor.shape, generator=generator)
    save_file(weights, weights_file, metadata={"format": "pt"})


def noisy_copy(source: Path, out: Path, noise: float) -> Path:
    """`source` with seeded Gaussian noise added to every matrix."""
    shutil.copytree(source, out)
    add_noise(out / "model.safetensors", noise)
    return out


def test_the_tiny_model_agrees_with_itself_and_less_with_a_noisy_copy(
        tiny_model_dir: Path, suite, tmp_path: Path) -> None:
    source = run_tasks(tiny_model_dir, suite)
    again = run_tasks(tiny_model_dir, suite)
    assert again == source                                     # greedy: nothing varies
    assert len(source.continuations) == NUM_AGREEMENT_PROMPTS
    assert all(len(ids) == AGREEMENT_TOKENS for ids in source.continuations)
    assert greedy_agreement(source, again) == 100.0
    noisy = run_tasks(noisy_copy(tiny_model_dir, tmp_path / "noisy", 0.01), suite)
    assert greedy_agreement(source, noisy) < 90.0
    assert noisy.num_items == source.num_items == 64
