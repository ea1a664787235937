"""How far a canary's answer agrees with stable's, and the window of agreements that judges it.

**Answers.** An `Answer` is what one call generated: the text of its first choice (a chat
message's `content`, or a completion's `text`) followed by each tool call written as
`name(arguments)`, plus its `finish_reason` and completion tokens. It is read from a unary
JSON body or from a stream's SSE events alike.

**Token agreement.** The gateway has no tokenizer of the model (it never loads one), so
answers are compared in *text tokens*: maximal runs of word characters (`\\w+`), single
other non-space characters, and runs of whitespace, in order (`text_tokens`). The agreement
of a canary's answer `c` with stable's `s` is the share of `s`'s leading text tokens that
`c` reproduces before their first difference:

    agreement = common_prefix(s, c) / len(s)          (1.0 when both are empty;
                                                       0.0 when only s is empty)

A replay's `max_tokens` is capped (`rollback.quality.max_tokens`). When that cap cut the
canary short of stable's length, only the span the canary could reach is compared: the
first `len(c) - 1` of stable's tokens (the canary's last text token may end mid-word), and a
cut canary with fewer than two text tokens gives no sample at all (`None`).

For greedy decoding an identical model reproduces stable's answer token for token
(agreement 1.0); a changed model drifts at some point and scores the share before it.

**Validity.** Where the request asked for JSON (`response_format` `json_object` or
`json_schema`) a canary answer whose text does not parse as JSON agrees 0.0; where it
offered `tools`, so does one whose tool-call arguments do not parse as JSON objects. Both
checks apply only when stable's own answer passes them and the canary was not cut short.

**The window.** `QualityMonitor` keeps each canary's agreements of the last
`window_seconds` and rolls it back (reason `quality`) once it holds `min_samples` and
their mean is below `min_agreement`.
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.routing.rollback import RollbackVerdict
from gateway.settings import QualitySettings

TEXT_TOKEN = re.compile(r"\w+|[^\w\s]|\s+")
MAX_SAMPLES_PER_WINDOW = 10_000


def text_tokens(text: str) -> list[str]:
    return TEXT_TOKEN.findall(text)


@dataclass(frozen=True)
class Answer:
    text: str                          # content or text, then tool calls as name(arguments)
    content: str = ""                  # the content or text alone (checked for JSON)
    tool_arguments: tuple[str, ...] = ()
    finish_reason: str | None = None
    completion_tokens: int | None = None


def _tool_text(calls: list[tuple[str, str]]) -> str:
    return "".join(f"{name}({arguments})" for name, arguments in calls)


def answer_from_json(payload: dict[str, Any]) -> Answer | None:
    """The first choice of a unary chat or completion answer; None when it has none."""
    choices = payload.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    choice = choices[0]
    message = choice.get("message")
    if isinstance(message, dict):
        content = message.get("content") or ""
        calls = [(str(call.get("function", {}).get("name", "")),
                  str(call.get("function", {}).get("arguments", "")))
                 for call in message.get("tool_calls") or [] if isinstance(call, dict)]
    else:
        content, calls = choice.get("text") or "", []
    return Answer(text=str(content) + _tool_text(calls), content=str(content),
                  tool_arguments=tuple(arguments for _, arguments in calls),
                  finish_reason=choice.get("finish_reason"),
                  completion_tokens=_completion_tokens(payload))


def _completion_tokens(payload: dict[str, Any]) -> int | None:
    usage = payload.get("usage")
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return tokens if isinstance(tokens, int) else None


def answer_from_events(stream: bytes) -> Answer | None:
    """The first choice of a streamed answer, put together from its `data:` events."""
    content: list[str] = []
    calls: dict[int, list[str]] = {}
    finish_reason, tokens, has_choice = None, None, False
    for line in stream.splitlines():
        data = line.removeprefix(b"data:").strip()
        if not data.startswith(b"{"):
            continue
        try:
            event = json.loads(data)
        except ValueError:
            continue
        tokens = _completion_tokens(event) or tokens
        for choice in event.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            has_choice = True
            delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
            content.append(str(delta.get("content") or choice.get("text") or ""))
            for call in delta.get("tool_calls") or []:
                function = call.get("function") or {}
                parts = calls.setdefault(int(call.get("index", 0)), ["", ""])
                parts[0] += function.get("name") or ""
                parts[1] += function.get("arguments") or ""
            finish_reason = choice.get("finish_reason") or finish_reason
    if not has_choice:
        return None
    ordered = [(name, arguments) for _, (name, arguments) in sorted(calls.items())]
    text = "".join(content)
    return Answer(text=text + _tool_text(ordered), content=text,
                  tool_arguments=tuple(arguments for _, arguments in ordered),
                  finish_reason=finish_reason, completion_tokens=tokens)


def token_agreement(stable: str, canary: str, *, is_cut: bool = False) -> float | None:
    """Share of `stable`'s leading text tokens that `canary` reproduces (module docstring);
    `is_cut`: the replay's token cap stopped the canary before stable's length."""
    s, c = text_tokens(stable), text_tokens(canary)
    span = min(len(s), len(c) - 1) if is_cut else len(s)
    if is_cut and span < 1:
        return None
    if span == 0:
        return 1.0 if not c else 0.0
    common = 0
    for mine, theirs in zip(s[:span], c, strict=False):
        if mine != theirs:
            break
        common += 1
    return common / span


def _is_json(text: str, *, want_object: bool = False) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) or not want_object


def is_valid(answer: Answer, request: dict[str, Any]) -> bool:
    """The answer keeps the form the request asked for: JSON text, and tool-call arguments
    that are JSON objects."""
    response_format = request.get("response_format")
    wants_json = (isinstance(response_format, dict)
                  and response_format.get("type") in ("json_object", "json_schema"))
    if wants_json and not answer.tool_arguments and not _is_json(answer.content):
        return False
    return all(_is_json(arguments, want_object=True) for arguments in answer.tool_arguments)


def compare(stable: Answer, canary: Answer, request: dict[str, Any], *,
            is_cut: bool) -> tuple[float | None, bool]:
    """(agreement, is_invalid): an invalid canary answer agrees 0.0."""
    if not is_cut and is_valid(stable, request) and not is_valid(canary, request):
        return 0.0, True
    return token_agreement(stable.text, canary.text, is_cut=is_cut), False


@dataclass(frozen=True)
class AgreementStats:
    num_samples: int
    mean: float | None   # None without samples


class AgreementWindow:
    """Agreements of the last `window_seconds`, at most `max_samples`."""

    def __init__(self, window_seconds: float, max_samples: int = MAX_SAMPLES_PER_WINDOW) -> None:
        self.window_seconds = window_seconds
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)
        self._total = 0.0

    def add(self, now: float, agreement: float) -> None:
        self.expire(now)
        if len(self._samples) == self._samples.maxlen:
            self._total -= self._samples[0][1]
        self._samples.append((now, agreement))
        self._total += agreement

    def expire(self, now: float) -> None:
        cutoff = now - self.window_seconds
        while self._samples and self._samples[0][0] <= cutoff:
            self._total -= self._samples.popleft()[1]

    def stats(self, now: float) -> AgreementStats:
        self.expire(now)
        num = len(self._samples)
        return AgreementStats(num, max(0.0, min(1.0, self._total / num)) if num else None)


class QualityMonitor:
    """Agreement windows per (model, variant) and the `quality` verdict; `Router` applies it."""

    def __init__(self, settings: QualitySettings, window_seconds: float, *,
                 clock: Callable[[], float]) -> None:
        self.settings = settings
        self.window_seconds = window_seconds
        self._clock = clock
        self._windows: dict[tuple[str, str], AgreementWindow] = {}

    def record(self, model: str, variant: str, agreement: float, *,
               at: float | None = None) -> AgreementStats:
        key = (model, variant)
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = AgreementWindow(self.window_seconds)
        window.add(self._clock() if at is None else at, agreement)
        return window.stats(self._clock())

    def stats(self, model: str, variant: str) -> AgreementStats:
        window = self._windows.get((model, variant))
        return window.stats(self._clock()) if window else AgreementStats(0, None)

    def forget(self, model: str, variant: str) -> None:
        self._windows.pop((model, variant), None)

    def judge(self, model: str, variant: str) -> RollbackVerdict | None:
        stats = self.stats(model, variant)
        if (not self.settings.enabled or stats.mean is None
                or stats.num_samples < self.settings.min_samples
                or stats.mean >= self.settings.min_agreement):
            return None
        detail = (f"mean token agreement with stable {stats.mean:.3f} over "
                  f"{stats.num_samples} replays < {self.settings.min_agreement:g}")
        return RollbackVerdict(model, variant, "quality", detail)
