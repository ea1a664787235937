"""The output side: one engine request's `RequestOutput`s -> per-choice `ChoiceDelta`s.

`TextOutputProcessor` is the processor every endpoint uses: incremental text (never broken
UTF-8), stop strings cut exactly, logprobs with token strings, token counts for usage. Its
`ChoiceState` holds the one stop-token rule of every endpoint (`num_shown_tokens`): an
engine stop — EOS or a stop token id — ends with that token, which counts as generated
(usage, `num_output_tokens`) but is not shown. vLLM behaves the same.

A choice that ends here — its text hit a stop string — while the engine still generates it
comes out with `ended_before_engine`, and the run aborts it in the engine at once.

`OutputProcessor` is the seam for what a choice's tokens become: a tool-call parser or a
JSON validator wraps a `TextOutputProcessor` and rewrites or ends its deltas.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from serving.backends.base import GenerationRequest
from serving.engine.outputs import CompletionDelta, Logprobs, RequestOutput
from serving.engine.request import FinishReason
from serving.handlers.context import HandlerContext
from serving.handlers.detokenizer import IncrementalDetokenizer, StopChecker
from serving.handlers.sampling import OutputOptions
from serving.tools import ToolCallDelta


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    bytes: list[int]
    top: list[tuple[str, float, list[int]]]
    text_offset: int


@dataclass
class ChoiceDelta:
    """What one choice became in one engine step. `index` is the choice's index in the
    response (`first_index` + its index in its engine request)."""

    index: int
    text: str
    num_new_tokens: int
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    # Ended here (a stop string) while the engine still generates it: abort it there.
    ended_before_engine: bool = False
    # Tool-call fragments parsed out of the text (chat with tools only).
    tool_calls: list[ToolCallDelta] | None = None


def num_shown_tokens(delta: CompletionDelta) -> int:
    """How many of an engine delta's tokens become text: all but an engine stop token."""
    num_tokens = len(delta.new_token_ids)
    return num_tokens - 1 if delta.finish_reason == FinishReason.STOP and num_tokens else num_tokens


class OutputProcessor(Protocol):
    """Turns one engine request's outputs into its choices' deltas, and counts tokens."""

    @property
    def request_id(self) -> str: ...
    @property
    def first_index(self) -> int: ...
    @property
    def num_choices(self) -> int: ...
    @property
    def is_finished(self) -> bool: ...
    @property
    def num_prompt_tokens(self) -> int: ...
    @property
    def num_cached_tokens(self) -> int: ...
    @property
    def num_completion_tokens(self) -> int: ...

    def process(self, output: RequestOutput) -> list[ChoiceDelta]: ...

    def finish(self) -> list[ChoiceDelta]:
        """The engine's stream ended: end every choice still open (finish reason abort)."""
        ...


@dataclass
class ChoiceState:
    """Detokenizer, stop checker and counters of one choice."""

    index: int
    detokenizer: IncrementalDetokenizer
    stop: StopChecker
    want_logprobs: bool
    num_chars: int = 0
    num_tokens: int = 0
    finish_reason: str | None = None

    def update(self, delta: CompletionDelta, context: HandlerContext) -> ChoiceDelta | None:
        if self.finish_reason is not None:
            return None  # ended on a stop string; the engine has not caught up yet
        out = ChoiceDelta(self.index, "", 0, [] if self.want_logprobs else None)
        num_shown = num_shown_tokens(delta)
        for position, token_id in enumerate(delta.new_token_ids):
            out.num_new_tokens += 1
            if position >= num_shown:
                break
            if out.logprobs is not None and delta.logprobs:
                out.logprobs.append(self._logprob(token_id, delta.logprobs[position], context))
            self._append(out, self.stop.push(self.detokenizer.push([token_id])))
            if self.stop.stopped:
                self.finish_reason = "stop"
                out.ended_before_engine = delta.finish_reason is None
                break
        if self.finish_reason is None and delta.finish_reason is not None:
            self._end(out, str(delta.finish_reason))
        self.num_tokens += out.num_new_tokens
        out.finish_reason = self.finish_reason
        return out

    def close(self) -> ChoiceDelta:
        """End the choice without an engine finish reason: what is held back is released."""
        out = ChoiceDelta(self.index, "", 0, [] if self.want_logprobs else None)
        self._end(out, str(FinishReason.ABORT))
        out.finish_reason = self.finish_reason
        return out

    def _end(self, out: ChoiceDelta, reason: str) -> None:
        self._append(out, self.stop.push(self.detokenizer.flush()))
        self._append(out, self.stop.flush())
        self.finish_reason = "stop" if self.stop.stopped else reason

    def _append(self, out: ChoiceDelta, text: str) -> None:
        out.text += text
        self.num_chars += len(text)

    def _logprob(self, token_id: int, logprobs: Logprobs,
                 context: HandlerContext) -> TokenLogprob:
        def entry(tid: int, value: float) -> tuple[str, float, list[int]]:
            text, raw = context.token_text(tid)
            return text, value, raw

        token, value, raw = entry(token_id, logprobs.sampled_logprob)
        top = [entry(tid, lp) for tid, lp in logprobs.top_logprobs]
        return TokenLogprob(token, value, raw, top, self.num_chars)


@dataclass
class TextOutputProcessor:
    """All choices of one engine request (one prompt): `first_index` is choice 0's index."""

    context: HandlerContext
    request: GenerationRequest
    first_index: int
    options: OutputOptions
    choices: list[ChoiceState] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0

    def __post_init__(self) -> None:
        self.choices = [self._choice(self.first_index + i) for i in range(self.num_choices)]
        self.num_prompt_tokens = len(self.request.prompt_token_ids)

    def _choice(self, index: int) -> ChoiceState:
        detokenizer = IncrementalDetokenizer(
            self.context.tokenizer, skip_special_tokens=self.options.skip_special_tokens,
            prompt_token_ids=self.request.prompt_token_ids)
        return ChoiceState(index, detokenizer, StopChecker(self.options.stop),
                           self.options.want_logprobs)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_choices(self) -> int:
        return self.request.params.n

    @property
    def is_finished(self) -> bool:
        return all(choice.finish_reason is not None for choice in self.choices)

    @property
    def num_completion_tokens(self) -> int:
        return sum(choice.num_tokens for choice in self.choices)

    def process(self, output: RequestOutput) -> list[ChoiceDelta]:
        self.num_prompt_tokens = output.num_prompt_tokens
        self.num_cached_tokens = output.num_cached_tokens
        updates = (self.choices[delta.index].update(delta, self.context)
                   for delta in output.deltas)
        return [update for update in updates if update is not None]

    def finish(self) -> list[ChoiceDelta]:
        return [choice.close() for choice in self.choices if choice.finish_reason is None]
