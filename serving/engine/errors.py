"""Errors the native engine raises to its callers.

The API layer maps them once to HTTP codes and the OpenAI error body:
`InvalidRequestError` -> 400, `QueueFullError` -> 503 (with Retry-After),
`EngineDeadError` -> 503. Running out of KV blocks is not an error: the scheduler preempts.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the native engine raises on purpose."""


class QueueFullError(EngineError):
    """The waiting queue is at its limit; the client should retry later."""

    def __init__(self, queue_size: int, retry_after_s: float) -> None:
        super().__init__(
            f"the waiting queue is full ({queue_size} requests waiting); "
            f"retry after {retry_after_s:g} s"
        )
        self.queue_size = queue_size
        self.retry_after_s = retry_after_s


class InvalidRequestError(EngineError):
    """A request the engine cannot serve as given: bad sampling parameters or prompt."""

    def __init__(self, message: str, *, param: str) -> None:
        super().__init__(message)
        self.param = param


class PromptTooLongError(InvalidRequestError):
    """Prompt plus requested completion do not fit in the model's context."""

    def __init__(
        self,
        num_prompt_tokens: int,
        max_tokens: int | None,
        max_model_len: int,
        *,
        param: str = "prompt",
    ) -> None:
        if max_tokens is None:
            detail = (
                f"your prompt has {num_prompt_tokens} tokens, "
                "which leaves no room for completion tokens"
            )
        else:
            detail = (
                f"you requested {num_prompt_tokens + max_tokens} tokens "
                f"({num_prompt_tokens} in the prompt, {max_tokens} for the completion)"
            )
        super().__init__(
            f"This model's maximum context length is {max_model_len} tokens. However, "
            f"{detail}. Please reduce the length of the prompt or completion.",
            param=param,
        )
        self.num_prompt_tokens = num_prompt_tokens
        self.max_tokens = max_tokens
        self.max_model_len = max_model_len


class EngineDeadError(EngineError):
    """The engine loop has stopped; no request can make progress until a restart."""

    def __init__(self, message: str = "the engine loop has died; restart the server") -> None:
        super().__init__(message)
