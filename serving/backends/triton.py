"""The `triton` engine: generation forwarded to a Triton Inference Server, or to anything
that speaks Triton's generate extension (another Quiver server, for one).

- Health and metadata through `tritonclient.http.aio` (`is_server_ready`, `is_model_ready`,
  `get_model_metadata`). tritonclient 2.73 has no generate client, so generation is a POST
  to `/v2/models/{model}/generate_stream` over aiohttp (a tritonclient[http] dependency).
- Inputs the model declares (`stream`, `exclude_input_in_output`, `return_finish_reason`,
  `return_num_output_tokens` as Triton's vLLM backend and Quiver do; `max_tokens` as
  TensorRT-LLM's ensemble does) are sent top-level, other settings under `parameters`.
- Token ids: the prompt ids are decoded with the local tokenizer (`--model`) into
  `text_input`; each text delta is encoded back into `new_token_ids`. Caveat: these are a
  re-tokenization, not the ids the remote model sampled. They decode to the same text for
  byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, SmolLM); SentencePiece ones may add a
  space at delta boundaries; usage counts them, so it can differ slightly from the
  remote's. Logprobs, n > 1 and structured output are refused (400).
- Errors: unreachable or an unexpected status -> `EngineDeadError` (503); upstream 400/413/
  422 -> `InvalidRequestError` (400); 429/503 -> `UpstreamBusyError` (503 + Retry-After).
- `is_ready` is the last probe's answer; reading it starts a new probe when that one is
  older than `PROBE_INTERVAL_S`, so readiness polls follow Triton.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from prometheus_client import CollectorRegistry

from serving.backends.base import GenerationRequest, ModelInfo
from serving.engine.errors import (
    EngineDeadError,
    EngineError,
    InvalidRequestError,
    QueueFullError,
)
from serving.engine.outputs import CompletionDelta, RequestOutput
from serving.engine.request import FinishReason
from serving.protocol.kserve import sse_json_events

try:
    import aiohttp
    import tritonclient.http.aio as triton_http
    from tritonclient.utils import InferenceServerException
except ImportError as exc:  # the factory turns this into "install tritonclient[http]"
    raise ImportError(f"the triton engine needs tritonclient[http] ({exc.name} is missing): "
                      "pip install 'tritonclient[http]'", name=exc.name) from exc

logger = logging.getLogger(__name__)

PROBE_INTERVAL_S = 1.0
METADATA_TIMEOUT_S = 10.0
DEFAULT_MAX_MODEL_LEN = 4096
# Inputs asked for when the model declares them (Triton's vLLM backend names).
FLAG_INPUTS = {"stream": True, "exclude_input_in_output": True, "return_finish_reason": True,
               "return_num_output_tokens": True}
_FINISH_REASONS = frozenset(reason.value for reason in FinishReason)
_CONNECTION_ERRORS = (aiohttp.ClientError, OSError, asyncio.TimeoutError)


class UpstreamBusyError(QueueFullError):
    """Triton answered 429 or 503: retry later (served as 503 + Retry-After)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        EngineError.__init__(self, message)  # QueueFullError's message is about our queue
        self.queue_size = 0
        self.retry_after_s = retry_after_s


class TritonStreamError(EngineError):
    """Triton reported an error after the stream had started."""


@dataclass(frozen=True)
class TritonTarget:
    """Where generation goes: `url` as tritonclient takes it (`host:port`)."""

    url: str
    model: str
    ssl: bool = False

    @classmethod
    def parse(cls, url: str, model: str) -> TritonTarget:
        ssl = url.startswith("https://")
        return cls(url=url.removeprefix("https://").removeprefix("http://").rstrip("/"),
                   model=model, ssl=ssl)

    @property
    def generate_stream_url(self) -> str:
        scheme = "https" if self.ssl else "http"
        return f"{scheme}://{self.url}/v2/models/{quote(self.model, safe='')}/generate_stream"


class _TritonHttpClient(triton_http.InferenceServerClient):
    """tritonclient's aio client, reading every GET's body (its health calls do not)."""

    async def _get(self, request_uri: str, headers: Any, query_params: Any) -> Any:
        response = await super()._get(request_uri, headers, query_params)
        await response.read()
        return response


class TritonEngineClient:
    def __init__(self, target: TritonTarget, tokenizer: Any, info: ModelInfo) -> None:
        self._target = target
        self._tokenizer = tokenizer
        self._info = info
        # Created on first use, inside the event loop that serves requests.
        self._client: _TritonHttpClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: aiohttp.ClientSession | None = None
        self._model_inputs: frozenset[str] | None = None
        self._is_ready = False
        self._last_probe = float("-inf")
        self._probe_task: asyncio.Task[bool] | None = None
        self._responses: dict[str, aiohttp.ClientResponse] = {}
        self._aborted: set[str] = set()
        bos = getattr(tokenizer, "bos_token_id", None)
        self._adds_bos = bos is not None and tokenizer.encode("a")[:1] == [bos]

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def is_ready(self) -> bool:
        self._maybe_probe()
        return self._is_ready

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._responses)

    async def check_ready(self) -> bool:
        """Ask Triton now whether server and model are ready; learn the model's inputs."""
        try:
            client = self._triton()
            is_ready = (await client.is_server_ready()
                        and await client.is_model_ready(self._target.model))
            if is_ready and self._model_inputs is None:
                self._model_inputs = await self._fetch_model_inputs()
        except (InferenceServerException, *_CONNECTION_ERRORS) as exc:
            logger.debug("Triton at %s is not reachable: %s", self._target.url, exc)
            is_ready = False
        if is_ready != self._is_ready:
            logger.info("Triton model %s at %s is %s", self._target.model, self._target.url,
                        "ready" if is_ready else "not ready")
        self._is_ready = is_ready
        return is_ready

    def _maybe_probe(self) -> None:
        if self._probe_task is not None and not self._probe_task.done():
            return
        if time.monotonic() - self._last_probe < PROBE_INTERVAL_S:
            return
        try:
            self._probe_task = asyncio.get_running_loop().create_task(self.check_ready())
        except RuntimeError:  # no event loop here: nothing to probe with
            return
        self._last_probe = time.monotonic()

    async def _fetch_model_inputs(self) -> frozenset[str]:
        metadata = await self._triton().get_model_metadata(self._target.model)
        return frozenset(tensor["name"] for tensor in metadata.get("inputs", []))

    def _triton(self) -> _TritonHttpClient:
        if self._client is None:
            self._loop = asyncio.get_running_loop()
            self._client = _TritonHttpClient(
                self._target.url, ssl=self._target.ssl, conn_timeout=METADATA_TIMEOUT_S)
        return self._client

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._loop = asyncio.get_running_loop()
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=METADATA_TIMEOUT_S)
            self._session = aiohttp.ClientSession(timeout=timeout)
        return self._session

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        _check_supported(request)
        body = await self._request_body(request)
        response = await self._open_stream(request.request_id, body)
        self._responses[request.request_id] = response
        try:
            async for output in self._outputs(request, response):
                yield output
        finally:
            self._responses.pop(request.request_id, None)
            self._aborted.discard(request.request_id)
            response.close()  # an early exit drops the connection: Triton cancels

    async def abort(self, request_id: str) -> None:
        response = self._responses.get(request_id)
        if response is not None:
            self._aborted.add(request_id)
            response.close()

    async def abort_choice(self, request_id: str, index: int) -> None:
        """A request has one choice here (n > 1 is refused): ending it ends the request."""
        if index == 0:
            await self.abort(request_id)

    async def shutdown(self) -> None:
        """Close the connections, in the (still running) event loop that opened them."""
        loop, current = self._loop, asyncio.get_running_loop()
        if loop is None or loop is current:
            await self._close()
        elif loop.is_running():
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._close(), loop))
        else:
            logger.warning("the event loop of the Triton connections has stopped: dropping "
                           "them unclosed")
            self._session = self._client = self._loop = None

    async def _close(self) -> None:
        if self._probe_task is not None and not self._probe_task.done():
            self._probe_task.cancel()
            await asyncio.gather(self._probe_task, return_exceptions=True)
        for response in list(self._responses.values()):
            response.close()
        if self._session is not None:
            await self._session.close()
        if self._client is not None:
            await self._client.close()
        self._session = self._client = self._loop = None

    def metrics_text(self) -> bytes:
        return b""

    async def _request_body(self, request: GenerationRequest) -> dict[str, Any]:
        if self._model_inputs is None:
            try:
                self._model_inputs = await self._fetch_model_inputs()
            except (InferenceServerException, *_CONNECTION_ERRORS) as exc:
                raise _unreachable(self._target, exc) from exc
        prompt_token_ids = request.prompt_token_ids
        if self._adds_bos and prompt_token_ids[:1] == [self._tokenizer.bos_token_id]:
            prompt_token_ids = prompt_token_ids[1:]  # the remote tokenizer adds it again
        text = self._tokenizer.decode(prompt_token_ids, skip_special_tokens=False,
                                      clean_up_tokenization_spaces=False)
        body: dict[str, Any] = {"text_input": text, "parameters": {}}
        values = _sampling_values(request, self._info.max_model_len)
        for name, value in values.items():
            (body if name in self._model_inputs else body["parameters"])[name] = value
        body.update({name: value for name, value in FLAG_INPUTS.items()
                     if name in self._model_inputs})
        return body

    async def _open_stream(self, request_id: str, body: dict[str, Any]
                           ) -> aiohttp.ClientResponse:
        headers = {"accept": "text/event-stream", "x-request-id": request_id}
        try:
            response = await self._http().post(self._target.generate_stream_url, json=body,
                                               headers=headers)
        except _CONNECTION_ERRORS as exc:
            self._is_ready = False
            raise _unreachable(self._target, exc) from exc
        if response.status != 200:
            try:
                raise await _upstream_error(response)
            finally:
                response.close()
        return response

    async def _outputs(self, request: GenerationRequest,
                       response: aiohttp.ClientResponse) -> AsyncIterator[RequestOutput]:
        num_prompt_tokens = len(request.prompt_token_ids)
        num_output_tokens = 0
        try:
            async for event in sse_json_events(response.content):
                if "error" in event:
                    raise TritonStreamError(f"Triton failed mid-stream: {event['error']}")
                token_ids = self._encode(event.get("text_output", ""))
                num_output_tokens += event.get("num_output_tokens", len(token_ids))
                finish_reason = _finish_reason(event.get("finish_reason"))
                for output in _outputs_of(request.request_id, token_ids, finish_reason,
                                          num_prompt_tokens):
                    yield output
                if finish_reason is not None:
                    return
        except ValueError as exc:
            raise TritonStreamError(f"Triton sent a bad event: {exc}") from exc
        except _CONNECTION_ERRORS as exc:
            if request.request_id not in self._aborted:
                raise EngineDeadError(f"lost the stream from Triton at {self._target.url}: "
                                      f"{exc}") from exc
            yield _output(request.request_id, [], FinishReason.ABORT, num_prompt_tokens)
            return
        # The model did not say why it stopped (no `return_finish_reason`): infer it.
        is_length = num_output_tokens >= _max_tokens(request, self._info.max_model_len)
        yield _output(request.request_id, [],
                      FinishReason.LENGTH if is_length else FinishReason.STOP,
                      num_prompt_tokens)

    def _encode(self, text: Any) -> list[int]:
        if not isinstance(text, str) or not text:
            return []
        return list(self._tokenizer.encode(text, add_special_tokens=False))


def _check_supported(request: GenerationRequest) -> None:
    params = request.params
    unsupported = {"n": params.n != 1, "logprobs": params.logprobs is not None,
                   "logit_bias": bool(params.logit_bias)}
    if params.guide is not None:
        unsupported[params.guide.param] = True
    for param, is_set in unsupported.items():
        if is_set:
            raise InvalidRequestError(f"the triton engine generates one unconstrained "
                                      f"plain-text choice per request, without logprobs or "
                                      f"logit bias: drop `{param}`", param=param)


def _max_tokens(request: GenerationRequest, max_model_len: int) -> int:
    if request.params.max_tokens is not None:
        return request.params.max_tokens
    return max(1, max_model_len - len(request.prompt_token_ids))


def _sampling_values(request: GenerationRequest, max_model_len: int) -> dict[str, Any]:
    """Sampling settings by Triton's vLLM-backend names; defaults are left out."""
    params = request.params
    values: dict[str, Any] = {"max_tokens": _max_tokens(request, max_model_len),
                              "temperature": params.temperature}
    optional = {"top_p": (params.top_p, 1.0), "top_k": (max(params.top_k, 0), 0),
                "min_p": (params.min_p, 0.0), "seed": (params.seed, None),
                "presence_penalty": (params.presence_penalty, 0.0),
                "frequency_penalty": (params.frequency_penalty, 0.0),
                "repetition_penalty": (params.repetition_penalty, 1.0),
                "ignore_eos": (params.ignore_eos, False), "min_tokens": (params.min_tokens, 0),
                "stop_token_ids": (list(params.stop_token_ids), [])}
    values.update({name: value for name, (value, default) in optional.items()
                   if value != default})
    return values


def _finish_reason(value: Any) -> FinishReason | None:
    if isinstance(value, list):  # a one-element tensor rendered as an array
        value = value[0] if value else None
    if value in (None, "", "None", "null"):
        return None
    return FinishReason(value) if value in _FINISH_REASONS else FinishReason.STOP


def _outputs_of(request_id: str, token_ids: list[int], finish_reason: FinishReason | None,
                num_prompt_tokens: int) -> list[RequestOutput]:
    """One event's outputs. A stop ends the serving layer's text with the stop token, which
    it does not show; the remote has left that token out of its text already, so what it
    did send comes first, in an output of its own."""
    if finish_reason == FinishReason.STOP and token_ids:
        return [_output(request_id, token_ids, None, num_prompt_tokens),
                _output(request_id, [], finish_reason, num_prompt_tokens)]
    if token_ids or finish_reason is not None:
        return [_output(request_id, token_ids, finish_reason, num_prompt_tokens)]
    return []


def _output(request_id: str, token_ids: list[int], finish_reason: FinishReason | None,
            num_prompt_tokens: int) -> RequestOutput:
    delta = CompletionDelta(index=0, new_token_ids=token_ids, finish_reason=finish_reason)
    return RequestOutput(request_id=request_id, deltas=[delta],
                         num_prompt_tokens=num_prompt_tokens, num_cached_tokens=0,
                         finished=finish_reason is not None)


async def _upstream_error(response: aiohttp.ClientResponse) -> EngineError:
    text = await response.text()
    try:
        message = json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        message = text[:500] or response.reason
    detail = f"Triton answered {response.status}: {message}"
    if response.status in (400, 413, 422):
        return InvalidRequestError(detail, param=None)
    if response.status in (429, 503):
        retry_after = response.headers.get("retry-after", "1")
        return UpstreamBusyError(detail, float(retry_after) if retry_after.isdigit() else 1.0)
    return EngineDeadError(detail)


def _unreachable(target: TritonTarget, exc: BaseException) -> EngineDeadError:
    return EngineDeadError(f"the Triton server at {target.url} cannot serve model "
                           f"{target.model}: {exc}")


def _max_model_len(settings: Any) -> int:
    if settings.max_model_len is not None:
        return settings.max_model_len
    config = Path(settings.model) / "config.json"
    value = (json.loads(config.read_text(encoding="utf-8")).get("max_position_embeddings")
             if config.is_file() else None)
    if isinstance(value, int):
        return value
    logger.warning("no context length known for %s: assuming %d (set --max-model-len)",
                   settings.model, DEFAULT_MAX_MODEL_LEN)
    return DEFAULT_MAX_MODEL_LEN


def create(settings: Any, registry: CollectorRegistry) -> TritonEngineClient:
    """`ServerSettings` -> a client of `settings.triton_url`. Nothing is sent until the
    first readiness probe or request; the model is `--triton-model`, else the served name."""
    del registry  # Triton exports its own metrics
    if not Path(settings.model).is_dir():
        raise ValueError(f"model {settings.model} is not a directory: the triton engine "
                         "needs the model's tokenizer there, to decode and encode text")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(settings.model)
    info = ModelInfo(served_model_name=settings.name, model_dir=Path(settings.model),
                     max_model_len=_max_model_len(settings), engine="triton")
    target = TritonTarget.parse(settings.triton_url, settings.triton_model or settings.name)
    return TritonEngineClient(target, tokenizer, info)
