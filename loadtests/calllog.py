"""The call log: one JSON line per finished call, written by the Locust process (when
`QUIVER_CALL_LOG` names a file) and read back by `quiver loadtest` for what Locust's entries
cannot say: which tenant sent a call, which turn of a conversation it was, and how many of its
prompt tokens the server found in its prefix cache (`usage.prompt_tokens_details`).

Calls still in flight when the run stops are not in it (Locust drops those too).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TextIO

from loadtests.calls import POST, CallOutcome

CALL_LOG_ENV = "QUIVER_CALL_LOG"
OK, FAILED, RATE_LIMITED = "ok", "failed", "rate_limited"


@dataclass(frozen=True)
class CallRecord:
    started_at: float               # wall clock (epoch seconds) when the call was sent
    tenant: str
    kind: str                       # the workload: stream, chat, completion, cached, conversation
    turn: int | None                # 1, 2, ... for a conversation's turns, else None
    status: str                     # ok | failed | rate_limited
    latency_ms: float
    ttft_ms: float | None = None    # streams only
    prompt_tokens: int | None = None
    cached_tokens: int | None = None     # None: the server sent no prompt_tokens_details
    completion_tokens: int | None = None
    error: str | None = None
    reusable_tokens: int | None = None   # follow-ups: the previous turn's prompt + reply

    @classmethod
    def of(cls, outcome: CallOutcome, *, started_at: float, tenant: str, kind: str,
           turn: int | None, reusable_tokens: int | None = None) -> CallRecord:
        call = outcome.call
        status = (RATE_LIMITED if call.request_type != POST
                  else FAILED if call.error is not None else OK)
        usage = outcome.usage
        return cls(started_at=started_at, tenant=tenant, kind=kind, turn=turn, status=status,
                   latency_ms=round(call.response_time_ms, 3), ttft_ms=outcome.ttft_ms,
                   prompt_tokens=usage.prompt_tokens if usage else None,
                   cached_tokens=usage.cached_tokens if usage else None,
                   completion_tokens=usage.completion_tokens if usage else None,
                   error=call.error, reusable_tokens=reusable_tokens)


class CallLog:
    """Appends records to a file, a line each (flushed per line); `path` None: a no-op."""

    def __init__(self, path: Path | None):
        self.file: TextIO | None = None
        if path is not None:
            # long-lived: open for the whole run, closed by close()
            self.file = Path(path).open("a", encoding="utf-8", buffering=1)  # noqa: SIM115

    def write(self, record: CallRecord) -> None:
        if self.file is not None:
            self.file.write(json.dumps(asdict(record), separators=(",", ":")) + "\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


FIELDS = {f.name for f in fields(CallRecord)}


def read_call_log(path: Path) -> list[CallRecord]:
    """Every record in `path` ([] when there is no file); a torn last line is skipped."""
    if not Path(path).is_file():
        return []
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            item = json.loads(line)
            records.append(CallRecord(**{k: v for k, v in item.items() if k in FIELDS}))
        except (ValueError, TypeError):
            continue   # a line cut short when Locust was stopped mid-write
    return records
