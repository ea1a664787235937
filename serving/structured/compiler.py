"""`GuideSpec` -> xgrammar `CompiledGrammar`, once per distinct spec (cached).

One `GuideCompiler` per served model: it holds xgrammar's view of the tokenizer (every
token's bytes, the vocabulary size of the model's logits, the stop tokens) and a bounded
cache. Compiling takes milliseconds (a JSON schema ~5 ms on SmolLM2's 49k vocabulary) and
is done at admission, in the caller's thread, so a bad schema is a 400 before the request
reaches the engine; the engine's sampler then finds it in the cache.

JSON is generated without free whitespace (`any_whitespace=False`): small models otherwise
fill `max_tokens` with newlines inside a valid-so-far object.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from serving.structured.spec import GuideSpec, GuideSpecError

DEFAULT_CACHE_SIZE = 256


def import_xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError as exc:  # pragma: no cover - a dependency of the serve extra
        raise ImportError("structured outputs need xgrammar: pip install 'quiver[serve]'") \
            from exc
    return xgrammar


class GuideCompiler:
    def __init__(self, tokenizer: Any, *, vocab_size: int, stop_token_ids: Sequence[int],
                 cache_size: int = DEFAULT_CACHE_SIZE, max_threads: int = 2) -> None:
        xgr = import_xgrammar()
        self.vocab_size = vocab_size
        self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids))
        self._compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=max_threads,
                                             cache_enabled=False)
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def compile(self, spec: GuideSpec) -> Any:
        """The compiled grammar; `GuideSpecError` naming `spec.param` if it is invalid."""
        key = (spec.kind, spec.value)
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                return compiled
        compiled = self._compile(spec)
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, spec: GuideSpec) -> Any:
        compiler = self._compiler
        try:
            if spec.kind == "json_object":
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if spec.kind == "json_schema":
                return compiler.compile_json_schema(spec.value, any_whitespace=False)
            if spec.kind == "regex":
                return compiler.compile_regex(spec.value)
            if spec.kind == "choice":
                return compiler.compile_grammar(choice_grammar(json.loads(spec.value)))
            if spec.kind == "grammar":
                return compiler.compile_grammar(spec.value)
            return compiler.compile_structural_tag(spec.value)
        except (RuntimeError, ValueError, TypeError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise GuideSpecError(f"{spec.param}: cannot use this {spec.kind.replace('_', ' ')}"
                                 f": {reason}", param=spec.param) from None


def choice_grammar(choices: list[str]) -> str:
    """EBNF matching exactly one of `choices` (JSON string escapes are EBNF's too)."""
    return "root ::= " + " | ".join(json.dumps(choice) for choice in choices)
