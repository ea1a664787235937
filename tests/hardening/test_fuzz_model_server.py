"""The model server's own endpoints under the same generated traffic as the gateway's
(`test_fuzz.py`): OpenAI, KServe v2 and Triton generate paths with odd methods, headers and
bodies from valid calls to deep, huge, mistyped or non-JSON ones. The tiny-model server
answers each within the timeout, never with a 5xx, always in an API's error shape (KServe's
`{"error": str}` from its handlers, OpenAI's elsewhere), and
`/health` keeps answering from another client throughout."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.hardening.test_fuzz import METHODS, HealthWatch, bodies

OPENAI_PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
KSERVE_PATHS = ["/v2/models/tiny/infer", "/v2/models/tiny/generate",
                "/v2/models/tiny/generate_stream", "/v2/models/absent/infer"]
OTHER_PATHS = ["/v1/models", "/v1/models/tiny", "/health", "/ready", "/metrics",
               "/v2/health/ready", "/v2/health/live", "/v2/models/tiny", "/v2/models/tiny/ready",
               "/v2", "/", "/v1/chat/completions/", "/%00", "/v1/../metrics"]

calls = st.one_of(
    st.tuples(st.sampled_from(["POST"] * 8 + METHODS), st.sampled_from(OPENAI_PATHS)),
    st.tuples(st.sampled_from(["POST"] * 4 + METHODS), st.sampled_from(KSERVE_PATHS)),
    st.tuples(st.sampled_from(METHODS), st.sampled_from(OTHER_PATHS)))


@pytest.fixture(scope="module")
def health_watch(tiny_server):
    watch = HealthWatch(tiny_server.url)
    watch.start()
    yield watch
    watch.stopped.set()
    watch.join(10)
    assert watch.num_checks > 0 and watch.misses == []


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(call=calls, body=bodies,
       content_type=st.sampled_from(["application/json", "text/plain", "", "multipart/x"]))
def test_no_request_gets_a_5xx_or_hangs(tiny_server, health_watch, call, body, content_type):
    method, path = call
    response = httpx.request(method, f"{tiny_server.url}{path}", timeout=30,
                             headers={"content-type": content_type},
                             content=body if method not in ("GET", "HEAD") else None)
    assert response.status_code < 500, (method, path, response.status_code,
                                         response.text[:500])
    if method == "HEAD" or response.status_code < 400 or path == "/metrics":
        return
    error = response.json()["error"]
    if path.startswith("/v2") and isinstance(error, str):  # KServe's shape, from its handlers
        assert error
    else:  # OpenAI's, from the OpenAI handlers and routing (404, 405) everywhere
        assert set(error) == {"message", "type", "param", "code"}, error
