"""KServe v2 (Open Inference Protocol) and Triton's generate extension, as pydantic models.

- KServe v2 HTTP/REST: server and model metadata, and `infer` requests and responses with
  tensors given as JSON data or, with Triton's binary tensor data extension, as raw bytes
  after the JSON header (`Inference-Header-Content-Length` says where the JSON ends and
  each tensor's `parameters.binary_data_size` how many bytes it takes, in order).
- Triton's generate extension: `{"text_input": ..., "parameters": {...}}` plus any other
  top-level keys (inputs such as `stream` or `return_finish_reason`, as Triton's vLLM
  backend declares them); responses `{"model_name", "model_version", "text_output"}`.
- Errors: `{"error": "<message>"}`.

Pure wire formats: no torch, no engine imports (the gateway may import these).
"""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterable, AsyncIterator
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

HEADER_LENGTH = "inference-header-content-length"
# Request parameters that tritonclient and Triton reserve for themselves.
RESERVED_PARAMETERS = frozenset({"sequence_id", "sequence_start", "sequence_end", "priority",
                                 "timeout", "headers", "binary_data_output"})
RESERVED_PARAMETER_PREFIX = "triton_"

ParameterValue = bool | int | float | str | list[str] | list[int]
Parameters = dict[str, ParameterValue]


class ErrorResponse(BaseModel):
    error: str


class MetadataTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ServerMetadataResponse(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadataResponse(BaseModel):
    name: str
    versions: list[str] = Field(default_factory=list)
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]


class InferInputTensor(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    # dims of the whole (batched) tensor: known sizes (-1 is for metadata, never for data)
    shape: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=8)]
    datatype: str
    parameters: Parameters | None = None
    # Absent when the tensor's bytes follow the JSON header (binary tensor data extension).
    data: list[Any] | None = None

    @property
    def binary_data_size(self) -> int | None:
        size = (self.parameters or {}).get("binary_data_size")
        return size if isinstance(size, int) and not isinstance(size, bool) else None

    @property
    def num_elements(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count


class InferRequestedOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    parameters: Parameters | None = None

    @property
    def is_binary(self) -> bool:
        return bool((self.parameters or {}).get("binary_data", False))


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    parameters: Parameters | None = None
    inputs: list[InferInputTensor] = Field(min_length=1)
    outputs: list[InferRequestedOutput] | None = None

    @property
    def is_binary_output(self) -> bool:
        """Triton's request-level switch: every output as binary data (tritonclient sets it
        when no outputs are named)."""
        return bool((self.parameters or {}).get("binary_data_output", False))


class InferOutputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: list[Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: Parameters | None = None
    outputs: list[InferOutputTensor]


class TritonGenerateRequest(BaseModel):
    """Other top-level keys are inputs of the model (`stream`, `exclude_input_in_output`,
    `return_finish_reason`, ...): kept in `model_extra`."""

    model_config = ConfigDict(extra="allow")

    text_input: str
    parameters: Parameters = Field(default_factory=dict)

    @property
    def all_parameters(self) -> dict[str, Any]:
        """`parameters`, and the top-level inputs over them."""
        return {**self.parameters, **(self.model_extra or {})}


class GenerationParameters(BaseModel):
    """What Quiver's model reads from request `parameters` (and from scalar input tensors
    or top-level generate keys of the same names). Names and defaults follow Triton's vLLM
    backend; values are coerced leniently (`"16"` -> 16) as that backend does."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | Annotated[list[str], Field(max_length=256)] | None = None
    stop_token_ids: Annotated[list[int], Field(max_length=4096)] = Field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    # Inputs of Triton's vLLM backend, accepted here too.
    stream: bool | None = None
    exclude_input_in_output: bool | None = None
    return_finish_reason: bool = False
    return_num_input_tokens: bool = False
    return_num_output_tokens: bool = False

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class TritonGenerateResponse(BaseModel):
    """One response (or one SSE event of `generate_stream`); the optional outputs are set,
    and sent (`exclude_unset`), only when the request asked for them with `return_*`."""

    model_name: str
    model_version: str
    text_output: str
    finish_reason: str | None = None
    num_input_tokens: int | None = None
    num_output_tokens: int | None = None


# -- tensor data: JSON arrays, or raw little-endian bytes (binary tensor data extension) ----

# struct formats of the fixed-size datatypes (FP16 / BF16 have no portable Python form).
BINARY_FORMATS = {"BOOL": "?", "INT8": "b", "UINT8": "B", "INT16": "h", "UINT16": "H",
                  "INT32": "i", "UINT32": "I", "INT64": "q", "UINT64": "Q", "FP32": "f",
                  "FP64": "d"}


def decode_bytes_tensor(raw: bytes) -> list[bytes]:
    """Split a binary BYTES tensor (each element a 4-byte little-endian length, then its
    bytes) into its elements; ValueError if it is malformed."""
    elements: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise ValueError("truncated BYTES element length")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise ValueError("a BYTES element is longer than the data sent")
        elements.append(raw[offset:offset + length])
        offset += length
    return elements


def encode_tensor(datatype: str, values: list[Any]) -> bytes:
    """Values -> the binary form of a `datatype` tensor (str elements as UTF-8)."""
    if datatype == "BYTES":
        elements = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in values]
        return b"".join(struct.pack("<I", len(element)) + element for element in elements)
    return struct.pack(f"<{len(values)}{BINARY_FORMATS[datatype]}", *values)


def tensor_values(tensor: InferInputTensor, raw: bytes | None) -> list[Any]:
    """The elements of an input tensor, flattened in row-major order, from its JSON `data`
    or from `raw` (its binary data). ValueError, naming the tensor, if they do not match
    its datatype or shape."""
    if raw is not None:
        values = _decode_binary(tensor, raw)
    elif tensor.data is None:
        raise ValueError(f"input `{tensor.name}` has neither `data` nor binary data")
    else:
        values = _flatten(tensor.data)
    if len(values) != tensor.num_elements:
        raise ValueError(f"input `{tensor.name}` has {len(values)} elements but its shape "
                         f"{tensor.shape} needs {tensor.num_elements}")
    return values


def _decode_binary(tensor: InferInputTensor, raw: bytes) -> list[Any]:
    if tensor.datatype == "BYTES":
        return list(decode_bytes_tensor(raw))
    fmt = BINARY_FORMATS.get(tensor.datatype)
    if fmt is None:
        raise ValueError(f"input `{tensor.name}`: binary {tensor.datatype} data is not "
                         "supported")
    size = struct.calcsize(fmt)
    if len(raw) % size:
        raise ValueError(f"input `{tensor.name}`: {len(raw)} bytes is not a whole number of "
                         f"{tensor.datatype} elements")
    return list(struct.unpack(f"<{len(raw) // size}{fmt}", raw))


def _flatten(data: list[Any]) -> list[Any]:
    flat: list[Any] = []
    for item in data:
        if isinstance(item, list):
            flat.extend(_flatten(item))
        else:
            flat.append(item)
    return flat


async def sse_json_events(lines: AsyncIterable[bytes]) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects in the `data:` fields of a `generate_stream` response, one per
    event; ValueError for an event that is not a JSON object (Triton's error events are
    objects too: `{"error": ...}`)."""
    data: list[str] = []
    async for raw_line in lines:
        line = raw_line.decode("utf-8").rstrip("\r\n")
        if line.startswith("data:"):
            data.append(line.removeprefix("data:").removeprefix(" "))
        elif not line and data:
            yield _json_object("\n".join(data))
            data = []
    if data:
        yield _json_object("\n".join(data))


def _json_object(data: str) -> dict[str, Any]:
    try:
        event = json.loads(data)
    except ValueError:
        event = None
    if not isinstance(event, dict):
        raise ValueError(f"an SSE event that is not a JSON object: {data[:200]!r}")
    return event
