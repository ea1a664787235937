"""KServe v2 `infer` inputs and outputs, and request parameters, as Python values.

- `parse_parameters(raw)`: request `parameters` (and scalar input tensors / top-level
  generate keys of the same names) -> `GenerationParameters`; Triton's reserved ones are
  skipped; a BadRequestError names an unknown or invalid one.
- `read_inputs(inputs, binary_data)`: the prompts of the BYTES `text_input` tensor and the
  other (scalar) inputs as parameters, from JSON data or binary tensor data.
- `build_outputs(request, params, shape, values)`: the requested output tensors, as JSON
  data or as binary data appended after the JSON.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from serving.errors import BadRequestError
from serving.protocol.kserve import (
    RESERVED_PARAMETER_PREFIX,
    RESERVED_PARAMETERS,
    GenerationParameters,
    InferInputTensor,
    InferOutputTensor,
    InferRequest,
    encode_tensor,
    tensor_values,
)

TEXT_INPUT = "text_input"
# JSON-encoded parameters as one BYTES input (Triton's vLLM backend takes this too).
SAMPLING_PARAMETERS_INPUT = "sampling_parameters"
OUTPUT_DATATYPES = {"text_output": "BYTES", "finish_reason": "BYTES",
                    "num_input_tokens": "UINT32", "num_output_tokens": "UINT32"}


@dataclass(frozen=True)
class InputTensors:
    """The prompts of `text_input` (of `shape`); the other (scalar) inputs as parameters."""

    prompts: list[str]
    shape: list[int]
    parameters: dict[str, Any]


def parse_parameters(raw: Mapping[str, Any]) -> GenerationParameters:
    """Request parameters -> `GenerationParameters`; Triton's reserved ones are skipped."""
    values = {key: value for key, value in raw.items()
              if key not in RESERVED_PARAMETERS
              and not key.startswith(RESERVED_PARAMETER_PREFIX)}
    try:
        return GenerationParameters.model_validate(values)
    except ValidationError as exc:
        error = exc.errors()[0]
        name = ".".join(str(part) for part in error["loc"]) or "parameters"
        if error["type"] == "extra_forbidden":
            known = ", ".join(GenerationParameters.model_fields)
            raise BadRequestError(f"unknown parameter `{name}`; this model takes: {known}",
                                  param=name) from None
        raise BadRequestError(f"invalid parameter `{name}`: {error['msg']} "
                              f"(got {_shown(error.get('input'))})", param=name) from None


def read_inputs(inputs: list[InferInputTensor], binary_data: bytes) -> InputTensors:
    """Tensors (JSON data, or slices of `binary_data` in input order) -> prompts and
    parameters; a BadRequestError names the bad tensor."""
    values: dict[str, list[Any]] = {}
    offset = 0
    for tensor in inputs:
        raw = None
        size = tensor.binary_data_size
        if size is not None:
            if offset + size > len(binary_data):
                raise BadRequestError(f"input `{tensor.name}` declares {size} bytes of binary "
                                      "data that the request body does not have",
                                      param=tensor.name)
            raw, offset = binary_data[offset:offset + size], offset + size
        if tensor.name in values:
            raise BadRequestError(f"input `{tensor.name}` is given twice", param=tensor.name)
        try:
            values[tensor.name] = tensor_values(tensor, raw)
        except ValueError as exc:
            raise BadRequestError(str(exc), param=tensor.name) from None
    text_tensor = next((t for t in inputs if t.name == TEXT_INPUT), None)
    if text_tensor is None:
        raise BadRequestError(f"the request has no `{TEXT_INPUT}` input (a BYTES tensor of "
                              "prompts)", param=TEXT_INPUT)
    if text_tensor.datatype != "BYTES":
        raise BadRequestError(f"input `{TEXT_INPUT}` must have datatype BYTES, got "
                              f"{text_tensor.datatype}", param=TEXT_INPUT)
    prompts = [_as_text(value) for value in values.pop(TEXT_INPUT)]
    if not prompts:
        raise BadRequestError(f"input `{TEXT_INPUT}` is empty", param=TEXT_INPUT)
    return InputTensors(prompts=prompts, shape=text_tensor.shape,
                        parameters=_scalar_parameters(values))


def _as_text(value: Any) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequestError(f"input `{TEXT_INPUT}` is not valid UTF-8",
                                  param=TEXT_INPUT) from None
    if not isinstance(value, str):
        raise BadRequestError(f"input `{TEXT_INPUT}` elements must be strings, got "
                              f"{value!r}", param=TEXT_INPUT)
    return value


def _scalar_parameters(values: dict[str, list[Any]]) -> dict[str, Any]:
    parameters: dict[str, Any] = {}
    for name, elements in values.items():
        if len(elements) != 1:
            raise BadRequestError(f"input `{name}` must hold one element, got "
                                  f"{len(elements)}", param=name)
        value = elements[0]
        if name == SAMPLING_PARAMETERS_INPUT:
            parameters.update(_json_object(value))
        elif name in GenerationParameters.model_fields:
            parameters[name] = _as_text(value) if isinstance(value, bytes) else value
        else:
            raise BadRequestError(f"unknown input `{name}`; this model takes `{TEXT_INPUT}`, "
                                  f"`{SAMPLING_PARAMETERS_INPUT}` and scalar inputs named "
                                  f"like its parameters", param=name)
    return parameters


def _json_object(value: Any) -> dict[str, Any]:
    try:
        parsed = json.loads(value)
    except (TypeError, ValueError):
        parsed = None
    if not isinstance(parsed, dict):
        raise BadRequestError(f"input `{SAMPLING_PARAMETERS_INPUT}` must be a JSON object",
                              param=SAMPLING_PARAMETERS_INPUT)
    return parsed


def build_outputs(request: InferRequest, params: GenerationParameters, shape: list[int],
                  values: dict[str, list[Any]]) -> tuple[list[InferOutputTensor], bytes]:
    """The requested outputs (by default `text_output` plus those `return_*` asked for),
    each as JSON data or, where asked, as binary data appended after the JSON."""
    requested = {output.name: output for output in request.outputs or []}
    unknown = sorted(set(requested) - set(OUTPUT_DATATYPES))
    if unknown:
        raise BadRequestError(f"unknown output `{unknown[0]}`; this model has "
                              f"{', '.join(OUTPUT_DATATYPES)}", param=unknown[0])
    names = list(requested) or ["text_output"] + [
        name for name in OUTPUT_DATATYPES if getattr(params, f"return_{name}", False)]
    outputs: list[InferOutputTensor] = []
    tail: list[bytes] = []
    for name in names:
        datatype = OUTPUT_DATATYPES[name]
        output = requested.get(name)
        if request.is_binary_output or (output is not None and output.is_binary):
            raw = encode_tensor(datatype, values[name])
            tail.append(raw)
            outputs.append(InferOutputTensor(name=name, shape=shape, datatype=datatype,
                                             parameters={"binary_data_size": len(raw)}))
        else:
            outputs.append(InferOutputTensor(name=name, shape=shape, datatype=datatype,
                                             data=values[name]))
    return outputs, b"".join(tail)


def _shown(value: Any, limit: int = 80) -> str:
    """A rejected value for an error message, cut short: a request's million-element list
    is not echoed back."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
