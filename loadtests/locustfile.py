"""Locust scenarios for Quiver or any OpenAI-compatible endpoint.

    QUIVER_API_KEY=qk-... QUIVER_MODEL=tiny-llama \
        locust -f loadtests/locustfile.py --host http://127.0.0.1:8000

opens Locust's web UI with the weighted mix of all users (streamed chat, chat, completions,
cache-friendly chat); name classes to run only those (`... StreamingChatUser ChatUser`).
`QUIVER_LOAD_SHAPE=ramp|step|spike|soak` drives the user count with a load shape whose peak
is `--users`, over `--run-time` (see loadtests/shapes.py). Streams record TTFT, ITL and
TOKENS/s entries besides the request itself; rate-limited calls go to a `429` entry.
`quiver loadtest` runs this headless and writes a report; see loadtests/scenarios.py for the
other environment variables.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

try:
    import loadtests  # noqa: F401  (installed, or run from the repository root)
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests.scenarios import (  # noqa: E402  (after the path fix-up above)
    CachedPromptUser,
    ChatUser,
    CompletionUser,
    StreamingChatUser,
    concrete_shape,
)

__all__ = ["CachedPromptUser", "ChatUser", "CompletionUser", "StreamingChatUser"]

SHAPE_ENV = "QUIVER_LOAD_SHAPE"

if _shape_name := os.environ.get(SHAPE_ENV, "").strip().lower():
    # Locust runs the first shape class it finds here: bind only the selected one.
    LoadShape = concrete_shape(_shape_name)
