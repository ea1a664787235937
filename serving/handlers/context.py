"""`HandlerContext`: what every handler needs — the engine, the served model's tokenizer,
name and vocabulary — and the checks on a request every endpoint shares (the model it
names, the token ids it sends)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from serving.backends.base import EngineClient
from serving.errors import BadRequestError, ModelNotFoundError
from serving.handlers.limits import RequestLimits
from serving.tools import ToolCallFormat, detect_format, format_named, template_supports_tools


@dataclass
class HandlerContext:
    """What every handler needs: the engine, the served model's tokenizer and name."""

    engine: EngineClient
    tokenizer: Any
    model_name: str
    vocab_size: int
    tool_call_parser: str = "auto"
    limits: RequestLimits = field(default_factory=RequestLimits)
    _token_texts: dict[int, tuple[str, list[int]]] = field(default_factory=dict, repr=False)

    @property
    def tool_format(self) -> ToolCallFormat:
        """The model's tool-call format: `--tool-call-parser`, else the chat template's."""
        if self.tool_call_parser != "auto":
            return format_named(self.tool_call_parser)
        return detect_format(getattr(self.tokenizer, "chat_template", None))

    @property
    def template_supports_tools(self) -> bool:
        return template_supports_tools(getattr(self.tokenizer, "chat_template", None))

    def check_model(self, model: str) -> None:
        """The one model check of every endpoint (OpenAI's `model`, KServe's `{name}`)."""
        if model != self.model_name:
            raise ModelNotFoundError(model, self.model_name)

    def check_token_ids(self, token_ids: list[int], *, param: str) -> None:
        bad = [token_id for token_id in token_ids if token_id >= self.vocab_size]
        if bad:
            raise BadRequestError(f"token id {bad[0]} is out of range: the vocabulary has "
                                  f"{self.vocab_size} tokens", param=param)

    def token_text(self, token_id: int) -> tuple[str, list[int]]:
        """One token as text and as its UTF-8 bytes, for logprobs (special tokens included).
        A token holding part of a character shows as U+FFFD but keeps its real bytes."""
        cached = self._token_texts.get(token_id)
        if cached is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False,
                                         clean_up_tokenization_spaces=False)
            raw = token_bytes(self.tokenizer.convert_ids_to_tokens(token_id))
            cached = (text, raw if raw is not None else list(text.encode("utf-8")))
            self._token_texts[token_id] = cached
        return cached


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: printable stand-in character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


_BYTE_LEVEL = _byte_level_alphabet()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(token: str | None) -> list[int] | None:
    """The raw bytes of a vocabulary entry: byte-level BPE (`Ġhé`) or SentencePiece byte
    fallback (`<0xE4>`); None for anything else (the caller encodes the text)."""
    if not token:
        return None
    match = _BYTE_FALLBACK.fullmatch(token)
    if match:
        return [int(match.group(1), 16)]
    if all(char in _BYTE_LEVEL for char in token):
        return [_BYTE_LEVEL[char] for char in token]
    return None
