"""How much one request may ask for: every list and count bounded before any work.

`RequestLimits` holds the server's limits (`ServerSettings`, flags `--max-n`,
`--max-stop-sequences`, ...). The protocol models carry generous fixed ceilings so a body
never parses into something huge; these are the production limits under them, checked
right after parsing — before tokenizing, templating or admitting anything — with a 400
that names the field, the limit and the flag that raises it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from serving.errors import BadRequestError


@dataclass(frozen=True)
class RequestLimits:
    max_n: int = 16
    max_stop_sequences: int = 16
    max_stop_token_ids: int = 64
    max_prompts: int = 64
    max_logprobs: int = 20
    max_tools: int = 64
    max_logit_bias: int = 300

    @classmethod
    def from_settings(cls, settings: Any) -> RequestLimits:
        return cls(**{name: getattr(settings, name) for name in cls.__dataclass_fields__})

    def check(self, param: str, count: int, limit_name: str) -> None:
        limit = getattr(self, limit_name)
        if count > limit:
            flag = "--" + limit_name.replace("_", "-")
            raise BadRequestError(f"{param}: {count} is more than this server's limit of "
                                  f"{limit} (raise it with {flag})", param=param)

    def check_sampling(self, request: Any) -> None:
        """The fields OpenAI chat, completions and KServe parameters share."""
        stop = request.stop_strings()
        self.check("stop", len(stop), "max_stop_sequences")
        self.check("stop_token_ids", len(request.stop_token_ids or ()), "max_stop_token_ids")
        self.check("n", getattr(request, "n", 1), "max_n")
        self.check("logit_bias", len(getattr(request, "logit_bias", None) or {}),
                   "max_logit_bias")

    def check_chat(self, request: Any) -> None:
        self.check_sampling(request)
        self.check("tools", len(request.tools or ()), "max_tools")
        if request.top_logprobs is not None:
            self.check("top_logprobs", request.top_logprobs, "max_logprobs")

    def check_completion(self, request: Any, num_prompts: int) -> None:
        self.check_sampling(request)
        self.check("prompt", num_prompts, "max_prompts")
        if request.logprobs is not None:
            self.check("logprobs", request.logprobs, "max_logprobs")
        if request.best_of is not None:
            self.check("best_of", request.best_of, "max_n")
