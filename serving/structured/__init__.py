"""Structured outputs: constraints a request puts on its text (JSON, JSON schema, regex,
choice, grammar, tool-call formats), compiled once with xgrammar and enforced in the
batched sampler as token bitmasks."""

from serving.structured.compiler import GuideCompiler
from serving.structured.guided import GuidedDecoding
from serving.structured.spec import GuideSpec, GuideSpecError

__all__ = ["GuideCompiler", "GuideSpec", "GuideSpecError", "GuidedDecoding"]
