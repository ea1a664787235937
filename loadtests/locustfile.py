"""Locust scenarios for Quiver or any OpenAI-compatible endpoint.

    QUIVER_API_KEY=qk-... QUIVER_MODEL=tiny-llama \
        locust -f loadtests/locustfile.py --host http://127.0.0.1:8000

opens Locust's web UI with the weighted mix of all closed-loop users (streamed chat, chat,
completions, cache-friendly chat, multi-turn conversations); name classes to run only those
(`... StreamingChatUser ConversationUser`). `QUIVER_LOAD_SHAPE=ramp|step|spike|soak` drives
the user count with a load shape whose peak is `--users`, over `--run-time` (see
loadtests/shapes.py). `QUIVER_RATE=R` (arrivals/s) binds the open-loop generator instead of
the users: `QUIVER_RATE=5 QUIVER_WORKLOAD=conversation locust -f ... --users 1`. Streams
record TTFT, ITL and TOKENS/s entries besides the request itself; rate-limited calls go to a
`429` entry.
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

from loadtests import scenarios  # noqa: E402  (after the path fix-up above)

RATE_ENV = "QUIVER_RATE"
SHAPE_ENV = "QUIVER_LOAD_SHAPE"

# Locust runs every User class it finds here (or those named on its command line).
if os.environ.get(RATE_ENV, "").strip():
    # The open loop: one Poisson generator, no closed-loop users beside it.
    OpenLoopUser = scenarios.OpenLoopUser
else:
    StreamingChatUser = scenarios.StreamingChatUser
    ChatUser = scenarios.ChatUser
    CompletionUser = scenarios.CompletionUser
    CachedPromptUser = scenarios.CachedPromptUser
    ConversationUser = scenarios.ConversationUser

if _shape_name := os.environ.get(SHAPE_ENV, "").strip().lower():
    # Locust runs the first shape class it finds here: bind only the selected one.
    LoadShape = scenarios.concrete_shape(_shape_name)
