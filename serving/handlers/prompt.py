"""Chat messages into prompt token ids, with the content tokenized as text.

The chat template writes the turns' markers (`<|im_start|>user`, `<|eot_id|>` ...) as
special tokens; what a client writes in a message must never become one, or a user could
close their turn and open a system turn of their own (OpenAI tokenizes content as text).
So the template is rendered with a placeholder per message, and the pieces are encoded
apart: the template's own text with its special tokens, each message's content with
`split_special_tokens` (markers in it are spelled out as ordinary tokens).

Templates that trim content (`| trim`, as Llama 3's) get it trimmed here too.
"""

from __future__ import annotations

import re
import secrets
from typing import Any


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], **template_kwargs: Any
                ) -> list[int]:
    """Prompt token ids of `messages` through the tokenizer's chat template."""
    nonce = secrets.token_hex(6)
    trims = "trim" in (getattr(tokenizer, "chat_template", None) or "")
    contents: list[str] = []
    marked = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str) and content:
            contents.append(content.strip() if trims else content)
            message = {**message, "content": f"\ue000{nonce}:{len(contents) - 1}\ue001"}
        marked.append(message)
    text = tokenizer.apply_chat_template(marked, tokenize=False, add_generation_prompt=True,
                                         **template_kwargs)
    ids: list[int] = []
    position = 0
    for match in re.finditer(f"\ue000{nonce}:(\\d+)\ue001", text):
        ids += _encode(tokenizer, text[position:match.start()], as_text=False)
        ids += _encode(tokenizer, contents[int(match.group(1))], as_text=True)
        position = match.end()
    return ids + _encode(tokenizer, text[position:], as_text=False)


def _encode(tokenizer: Any, text: str, *, as_text: bool) -> list[int]:
    if not text:
        return []
    return tokenizer(text, add_special_tokens=False, split_special_tokens=as_text)["input_ids"]
