"""`UpstreamStream`: an upstream answer whose body is read as it arrives.

Chunks are yielded exactly as the socket delivers them (no line buffering), with the idle
timeout between chunks and the request's total deadline enforced. `aclose()` must always be
called (or use `async with`): it returns a fully read connection to the pool and *closes*
one that is not, so the model server sees the disconnect and stops generating.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

import aiohttp

from gateway.upstream.replica import Lease, Outcome, status_outcome

HOP_BY_HOP_HEADERS = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "trailers", "transfer-encoding", "upgrade",
    # the body we hand on is whole and decoded, so its own framing no longer applies
    "content-length", "content-encoding",
})


def response_headers(response: aiohttp.ClientResponse) -> dict[str, str]:
    """The upstream's headers, names lower-cased, hop-by-hop and framing dropped."""
    return {name.lower(): value for name, value in response.headers.items()
            if name.lower() not in HOP_BY_HOP_HEADERS}


class UpstreamStreamError(Exception):
    """The upstream failed after its answer began (dropped, stalled, or malformed)."""


class UpstreamStream:
    def __init__(self, response: aiohttp.ClientResponse, lease: Lease, *, description: str,
                 attempts: int, idle_seconds: float, deadline: float) -> None:
        self.status = response.status
        self.headers = response_headers(response)
        self.replica = lease.replica.url
        self.attempts = attempts
        self._response = response
        self._lease = lease
        self._description = description  # "model/variant", for messages
        self._idle_seconds = idle_seconds
        self._deadline = deadline  # loop time
        self._is_done = False

    @property
    def is_done(self) -> bool:
        return self._is_done

    async def read(self) -> bytes:
        """The whole remaining body (for error answers), within the total deadline."""
        try:
            async with asyncio.timeout_at(self._deadline):
                body = await self._response.read()
        except TimeoutError as exc:
            raise self._fail("timeout", "did not finish its answer in time") from exc
        except (aiohttp.ClientError, OSError) as exc:
            what = f"broke off its answer ({describe_transport_error(exc)})"
            raise self._fail("protocol_error", what) from exc
        self._complete()
        return body

    def __aiter__(self) -> UpstreamStream:
        return self

    async def __anext__(self) -> bytes:
        if self._is_done:
            raise StopAsyncIteration
        loop = asyncio.get_running_loop()
        timeout = min(self._idle_seconds, self._deadline - loop.time())
        try:
            async with asyncio.timeout(max(0.0, timeout)):
                chunk = await self._response.content.readany()
        except TimeoutError as exc:
            raise self._fail("timeout", f"sent nothing for {timeout:.3g} s") from exc
        except (aiohttp.ClientError, OSError) as exc:
            what = f"broke off its stream ({describe_transport_error(exc)})"
            raise self._fail("protocol_error", what) from exc
        if not chunk:
            self._complete()
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        """Release the connection: reused if the body was read to its end, else closed."""
        if self._is_done:
            return
        self._is_done = True
        self._response.close()  # not at EOF: drop the connection, the upstream sees it
        self._lease.finish(status_outcome(self.status))

    async def __aenter__(self) -> UpstreamStream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    def _complete(self) -> None:
        self._is_done = True
        self._response.release()
        self._lease.finish(status_outcome(self.status))

    def _fail(self, outcome: Outcome, what: str) -> UpstreamStreamError:
        self._is_done = True
        self._response.close()
        self._lease.report(is_failure=True)
        self._lease.finish(outcome)
        return UpstreamStreamError(f"upstream {self._description} {what}")


def describe_transport_error(exc: BaseException) -> str:
    """A short description of a transport error, without URLs or hosts."""
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "incomplete body"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "server disconnected"
    if isinstance(exc, aiohttp.ClientResponseError):
        return "malformed HTTP"
    return type(exc).__name__
