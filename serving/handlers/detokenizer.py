"""Incremental detokenization and stop strings, shared by every text-producing endpoint.

`IncrementalDetokenizer(tokenizer, *, skip_special_tokens=True, prompt_token_ids=())`
    `push(token_ids) -> str` returns the text those tokens complete, never a broken UTF-8
    character: bytes of a character split over tokens are held until it is whole.
    `flush() -> str` returns what is still held (an incomplete character becomes U+FFFD).
    The concatenation of every push and the flush equals `tokenizer.decode(all_ids)`.
    `prompt_token_ids` (optional) gives the decoder its left context, so tokenizers that
    strip a leading space at the start of a decode (SentencePiece) keep it. The algorithm
    is vLLM's: decode a short window `[prefix_offset:]` and emit what grew past
    `[prefix_offset:read_offset]`, unless it ends in U+FFFD.

`StopChecker(stop)`
    `push(text) -> str` returns the text that can be shown, holding back any tail that may
    be the start of a stop string, so a stop string split across tokens (or pushes) is
    still found. Once a stop string appears, `stopped` is True, `matched` names it and the
    text is cut exactly before it; later pushes return "". `flush() -> str` releases the
    held-back tail when generation ends for another reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens kept as left context for the first decode (as vLLM does).
NUM_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = True,
                 prompt_token_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._token_ids: list[int] = list(prompt_token_ids[-NUM_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._token_ids)

    def push(self, token_ids: Sequence[int]) -> str:
        self._token_ids.extend(token_ids)
        return self._advance(is_final=False)

    def flush(self) -> str:
        return self._advance(is_final=True)

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens,
                                      clean_up_tokenization_spaces=False)

    def _advance(self, *, is_final: bool) -> str:
        if self._read_offset == len(self._token_ids):
            return ""
        prefix_text = self._decode(self._token_ids[self._prefix_offset:self._read_offset])
        full_text = self._decode(self._token_ids[self._prefix_offset:])
        if len(full_text) <= len(prefix_text):
            # Special tokens skipped, or bytes that do not make a character yet.
            if is_final:
                self._mark_read()
            return ""
        if full_text.endswith(REPLACEMENT_CHAR) and not is_final:
            return ""
        self._mark_read()
        return full_text[len(prefix_text):]

    def _mark_read(self) -> None:
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._token_ids)


class StopChecker:
    def __init__(self, stop: Sequence[str]) -> None:
        self._stop = [s for s in stop if s]
        self._pending = ""
        self.stopped = False
        self.matched: str | None = None

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        buffer = self._pending + text
        found = self._earliest_match(buffer)
        if found is not None:
            index, self.matched = found
            self.stopped = True
            self._pending = ""
            return buffer[:index]
        hold = self._longest_partial_match(buffer)
        self._pending = buffer[len(buffer) - hold:] if hold else ""
        return buffer[:len(buffer) - hold]

    def flush(self) -> str:
        text, self._pending = self._pending, ""
        return "" if self.stopped else text

    def _earliest_match(self, buffer: str) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for stop in self._stop:
            index = buffer.find(stop)
            if index >= 0 and (best is None or index < best[0]):
                best = (index, stop)
        return best

    def _longest_partial_match(self, buffer: str) -> int:
        """Length of the longest tail of `buffer` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stop:
            for length in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:length]):
                    longest = length
                    break
        return longest
