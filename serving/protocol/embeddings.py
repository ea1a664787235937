"""OpenAI wire format of `/v1/embeddings`.

`input` is a string, a list of strings, a list of token ids or a list of such lists (at
most `MAX_INPUTS` per call); `encoding_format` `float` (default) or `base64` (the float32
little-endian bytes, as OpenAI encodes them); `dimensions` is refused unless the model
supports shortening (ours do not: they are not trained for it). Usage counts the input
tokens.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_INPUTS = 2048
MAX_INPUT_CHARS = 1_000_000

TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
Text = Annotated[str, Field(min_length=1, max_length=MAX_INPUT_CHARS)]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")

    model: str
    input: (Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_INPUTS)]
            | TokenIds | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_INPUTS)])
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
