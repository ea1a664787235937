"""What both model-server routers (OpenAI, KServe) send for work that ends with its client.

Work that answers once runs under `common.asgi.disconnect.until_disconnect`; a client gone
before the answer gets `CLIENT_CLOSED_REQUEST`. A stream is `event_stream(frames)`: SSE,
never buffered by proxies, and a `DisconnectAwareStreamingResponse`, so a client that goes
mid-stream cancels the frames' iterator, which aborts its engine requests.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

# What a response to a client that has already gone is counted as (nginx's convention).
CLIENT_CLOSED_REQUEST = 499
STREAM_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class DisconnectAwareStreamingResponse(StreamingResponse):
    """Always watches for the client going away (Starlette only does below ASGI 2.4) and
    then cancels the body iterator; the iterator is closed however the response ends."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def stream() -> None:
            with contextlib.suppress(OSError):
                await self.stream_response(send)

        streamer = asyncio.ensure_future(stream())
        watcher = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait({streamer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (streamer, watcher):
                task.cancel()
            await asyncio.gather(streamer, watcher, return_exceptions=True)
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
        if streamer.done() and not streamer.cancelled() and streamer.exception():
            raise streamer.exception()  # type: ignore[misc]


def event_stream(frames: AsyncIterator[str]) -> DisconnectAwareStreamingResponse:
    return DisconnectAwareStreamingResponse(frames, media_type="text/event-stream",
                                            headers=STREAM_HEADERS)
