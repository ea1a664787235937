"""The task score: what an artifact answers, next to how it scores text.

Perplexity says how surprised a model is; it does not say whether a user gets the same
answers. The task suite (`SUITE`) adds two greedy, deterministic measurements, made by the
runtime that serves the artifact (`optimize.evaluate.run_tasks`):

- **exact match** (`task_score`, points out of 100): the share of question items whose
  greedy answer is exactly the expected word. An answer is the generated text, cut at the
  first special token (EOS), with leading whitespace removed; it is exact when it starts
  with the expected word and the next character (if any) is not a letter, digit or `_`.
  The items are built from local text and fixed seeds, never downloaded:
  - `cloze` (`NUM_CLOZE`): a held-out passage (the evaluation split, `--eval-data` if
    given) up to a word of 4+ letters that already occurred in that context; the answer is
    the word;
  - `arithmetic` (`NUM_ARITHMETIC`): three fixed worked examples, then `a + b =` or
    `a - b =` with one-digit a, b (a >= b for a difference), distinct, drawn with a fixed
    seed; the answer is the result;
  - `sequence` (`NUM_SEQUENCE`): a numbered list (`1. March` ... `4. June`, then `5.`) of
    consecutive months, weekdays (both cyclic), letters or multiples of a number; the
    answer is the fifth member.
- **greedy agreement with the source** (`greedy_agreement`, points out of 100): for each of
  `NUM_AGREEMENT_PROMPTS` held-out prompts (a passage's first `AGREEMENT_PROMPT_TOKENS`
  tokens) both models continue `AGREEMENT_TOKENS` tokens greedily (EOS ignored); a prompt's
  agreement is the number of leading tokens that are identical before the first
  divergence, over `AGREEMENT_TOKENS`; the score is the mean over prompts. After the first
  divergence the two contexts differ, so nothing later is compared. A model against itself
  scores 100.

Items depend on the text only; prompts are tokenized with the source's tokenizer (the
reference's for `quiver optimize eval --reference`), so both sides see the same ids.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

SUITE = "quiver-tasks-1"  # change the name whenever the items or the rules change
NUM_CLOZE = 32
NUM_ARITHMETIC = 16
NUM_SEQUENCE = 16
NUM_AGREEMENT_PROMPTS = 16
AGREEMENT_PROMPT_TOKENS = 48
AGREEMENT_TOKENS = 16
CLOZE_CONTEXT_CHARS = 320   # context before a cloze word: at least this, from a line start
CLOZE_ITEMS_PER_PASSAGE = 2
EXTRA_ANSWER_TOKENS = 2     # generated past the answer's own tokens, to see where it ends
SEED = 19

TaskName = Literal["cloze", "arithmetic", "sequence"]
TASKS: tuple[TaskName, ...] = ("cloze", "arithmetic", "sequence")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
LETTERS = tuple("abcdefghijklmnopqrstuvwxyz")
ARITHMETIC_SHOTS = "3 + 4 = 7\n9 - 5 = 4\n6 + 8 = 14\n"
_WORD = re.compile(r"(?<= )[A-Za-z]{4,}(?![\w-])")


@dataclass(frozen=True)
class TaskItem:
    task: TaskName
    prompt: str
    answer: str


@dataclass(frozen=True)
class TaskSuite:
    """Everything both models are asked, as token ids, and how to read their answers."""

    items: list[TaskItem]
    item_prompt_ids: list[list[int]]
    item_max_tokens: list[int]
    agreement_prompt_ids: list[list[int]]
    tokenizer: Any            # decodes answers; its special ids end an answer
    name: str = SUITE

    def requests(self) -> tuple[list[list[int]], list[int]]:
        """(prompts, tokens to generate for each): the items', then the agreement ones'."""
        prompts = self.item_prompt_ids + self.agreement_prompt_ids
        lengths = self.item_max_tokens + [AGREEMENT_TOKENS] * len(self.agreement_prompt_ids)
        return prompts, lengths


@dataclass(frozen=True)
class TaskResult:
    """One model's run of a suite."""

    score: float                   # exact match over every item, points out of 100
    scores: dict[str, float]       # the same per task
    num_items: int
    continuations: list[list[int]]  # greedy continuations of the agreement prompts


@dataclass(frozen=True)
class TaskComparison:
    """A model's task score next to its source's (the manifest's `metrics` fields)."""

    suite: str
    num_items: int
    score: float
    scores: dict[str, float]
    baseline_score: float | None = None
    baseline_scores: dict[str, float] | None = None
    greedy_agreement: float | None = None

    @classmethod
    def of(cls, suite: TaskSuite, candidate: TaskResult,
           reference: TaskResult | None = None) -> TaskComparison:
        if reference is None:
            return cls(suite.name, candidate.num_items, candidate.score, candidate.scores)
        return cls(suite.name, candidate.num_items, candidate.score, candidate.scores,
                   reference.score, reference.scores, greedy_agreement(reference, candidate))

    def metrics(self) -> dict[str, Any]:
        """The names `manifest.json` and `quiver optimize eval` use (a contract)."""
        return {"task_suite": self.suite, "task_items": self.num_items,
                "task_score": self.score, "baseline_task_score": self.baseline_score,
                "task_scores": self.scores, "baseline_task_scores": self.baseline_scores,
                "greedy_agreement": self.greedy_agreement}

    def describe(self) -> str:
        """One log phrase: `task score 58.4 (source 60.9: -2.5 points), greedy agreement
        87.5 %`."""
        text = f"task score {self.score:.1f}"
        if self.baseline_score is not None:
            text += (f" (source {self.baseline_score:.1f}: "
                     f"{self.score - self.baseline_score:+.1f} points)")
        if self.greedy_agreement is not None:
            text += f", greedy agreement {self.greedy_agreement:.1f} %"
        return text


def build_items(texts: Sequence[str]) -> list[TaskItem]:
    """Every exact-match item, in a fixed order: cloze, arithmetic, sequence."""
    return [*cloze_items(texts), *arithmetic_items(), *sequence_items()]


def cloze_items(texts: Sequence[str], count: int = NUM_CLOZE) -> list[TaskItem]:
    """Up to `count` items, taking passages round-robin (their first cloze first)."""
    per_passage = [_passage_cloze(text) for text in texts]
    items = [found[rank] for rank in range(CLOZE_ITEMS_PER_PASSAGE)
             for found in per_passage if rank < len(found)]
    return items[:count]


def _passage_cloze(text: str) -> list[TaskItem]:
    """A passage's cloze items: past `CLOZE_CONTEXT_CHARS`, the first word of 4+ letters
    after a space that its context (from the line `CLOZE_CONTEXT_CHARS` back) already
    holds; the next item's word lies at least as far past that one."""
    items: list[TaskItem] = []
    position = CLOZE_CONTEXT_CHARS
    while len(items) < CLOZE_ITEMS_PER_PASSAGE:
        item = None
        for match in _WORD.finditer(text, position):
            line_start = text.rfind("\n", 0, match.start() - CLOZE_CONTEXT_CHARS) + 1
            context = text[line_start:match.start() - 1]
            if re.search(rf"\b{match.group()}\b", context):
                item = TaskItem("cloze", context, match.group())
                break
        if item is None:
            return items
        items.append(item)
        position = match.end() + CLOZE_CONTEXT_CHARS
    return items


def arithmetic_items(count: int = NUM_ARITHMETIC) -> list[TaskItem]:
    """Distinct one-digit sums and differences (never negative) after three worked ones."""
    questions = [(a, op, b) for a in range(1, 10) for b in range(1, 10) for op in "+-"
                 if op == "+" or a >= b]
    shown = {(3, "+", 4), (9, "-", 5), (6, "+", 8)}
    chosen = random.Random(SEED).sample([q for q in questions if q not in shown], count)
    return [TaskItem("arithmetic", f"{ARITHMETIC_SHOTS}{a} {op} {b} =",
                     str(a + b if op == "+" else a - b)) for a, op, b in chosen]


def sequence_items(count: int = NUM_SEQUENCE) -> list[TaskItem]:
    """Four consecutive members of a series as a numbered list; the answer is the fifth.
    Months and weekdays (cyclic), letters, multiples of 2..12: as many of each kind,
    distinct, drawn with a fixed seed."""
    runs: list[list[tuple[str, ...]]] = [
        [tuple(MONTHS[(s + i) % len(MONTHS)] for i in range(5)) for s in range(len(MONTHS))],
        [tuple(WEEKDAYS[(s + i) % len(WEEKDAYS)] for i in range(5))
         for s in range(len(WEEKDAYS))],
        [LETTERS[s:s + 5] for s in range(len(LETTERS) - 4)],
        [tuple(str(step * n) for n in range(1, 6)) for step in range(2, 13)],
    ]
    rng = random.Random(SEED)
    per_kind = [rng.sample(kind, count // len(runs)) for kind in runs]
    return [TaskItem("sequence", "".join(f"{n}. {m}\n" for n, m in enumerate(members[:4], 1))
                     + "5.", members[4]) for chosen in per_kind for members in chosen]


def agreement_texts(texts: Sequence[str], count: int = NUM_AGREEMENT_PROMPTS) -> list[str]:
    """`count` passages spread evenly over `texts` (all of them when there are fewer)."""
    if len(texts) <= count:
        return list(texts)
    return [texts[index * len(texts) // count] for index in range(count)]


def build_suite(tokenizer_dir: Path, texts: Sequence[str]) -> TaskSuite:
    """The suite over held-out `texts`, tokenized by `tokenizer_dir`'s tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    items = build_items(texts)
    prompt_ids = [tokenizer(item.prompt)["input_ids"] for item in items]
    budgets = [len(tokenizer(" " + item.answer, add_special_tokens=False)["input_ids"])
               + EXTRA_ANSWER_TOKENS for item in items]
    agreement = [tokenizer(text)["input_ids"][:AGREEMENT_PROMPT_TOKENS]
                 for text in agreement_texts(texts)]
    return TaskSuite(items, prompt_ids, budgets, [ids for ids in agreement if ids], tokenizer)


def is_exact(answer: str, generated: str) -> bool:
    text = generated.lstrip()
    if not text.startswith(answer):
        return False
    rest = text[len(answer):]
    return not rest or not (rest[0].isalnum() or rest[0] == "_")


def score(suite: TaskSuite, outputs: Sequence[Sequence[int]]) -> TaskResult:
    """Score a model's outputs for `suite.requests()`, in the same order."""
    num_items = len(suite.items)
    if len(outputs) != num_items + len(suite.agreement_prompt_ids):
        raise ValueError(f"{len(outputs)} outputs for a suite of "
                         f"{num_items + len(suite.agreement_prompt_ids)} requests")
    special = set(suite.tokenizer.all_special_ids)
    correct = {task: 0 for task in TASKS}
    totals = {task: 0 for task in TASKS}
    for item, ids in zip(suite.items, outputs[:num_items], strict=True):
        end = next((i for i, token_id in enumerate(ids) if token_id in special), len(ids))
        totals[item.task] += 1
        correct[item.task] += is_exact(item.answer, suite.tokenizer.decode(ids[:end]))
    scores = {task: _points(correct[task], totals[task]) for task in TASKS if totals[task]}
    return TaskResult(score=_points(sum(correct.values()), num_items), scores=scores,
                      num_items=num_items,
                      continuations=[list(ids) for ids in outputs[num_items:]])


def greedy_agreement(reference: TaskResult, candidate: TaskResult) -> float:
    """Mean share of the reference's greedy tokens matched before the first divergence,
    points out of 100."""
    pairs = list(zip(reference.continuations, candidate.continuations, strict=True))
    if not pairs:
        raise ValueError("no agreement prompts to compare")
    shares = []
    for want, got in pairs:
        matched = next((i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b),
                       min(len(want), len(got)))
        shares.append(matched / max(len(want), 1))
    return round(100.0 * sum(shares) / len(shares), 2)


def _points(correct: int, total: int) -> float:
    return round(100.0 * correct / total, 2) if total else 0.0
