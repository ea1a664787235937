"""Runs a compiled decoder block's code without dynamo's guard checks on every call.

Dynamo guards each compiled graph with ~700 checks (every parameter's dtype and shape, the
KV caches' strides, the step's sizes, torch's global state) and evaluates them on every call
before it runs the graph's code: with the code that gathers the inputs, ~200-300 us a call,
ten calls a SmolLM2 step (2-core Zen 2: 2-3 ms of a 16 ms batch-1 forward pass).

Within one engine everything those guards check stays put from step to step except the
number of tokens: the same blocks with the same parameters, the same caches, the same
metadata type, always under inference mode. So `GraphDispatch` checks the guards once per
(block, token count) — with that call's own inputs, against every graph dynamo compiled for
the block's code, as dynamo would — and from then on runs the code of the graph that passed
directly. A token count no graph takes raises `NoCompiledGraph` (dynamo would compile
there; the caller runs the step eagerly instead).

What this assumes, and the caller guarantees: calls come under inference mode (grad mode
is part of the guards checked once), and the model's modules are not swapped or repacked
after the first call (`serving.models.compiled` builds a new dispatch with every warm-up).
The cache entries come from a debugging hook of dynamo's (`available()` is False where this
torch lacks it; the caller then leaves guarding to dynamo).
"""

from __future__ import annotations

import inspect
import logging
import types
from collections.abc import Callable
from typing import Any

import torch

try:
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
except ImportError:  # a torch without the hook: dynamo keeps guarding every call
    _debug_get_cache_entry_list = None

logger = logging.getLogger(__name__)


class NoCompiledGraph(RuntimeError):
    """No graph compiled so far takes this call (dynamo would compile a new one)."""


def available() -> bool:
    return _debug_get_cache_entry_list is not None


class GraphDispatch:
    """Calls `forward`'s compiled code for a module, its guards checked once per (module,
    token count); the token count is the first tensor argument's first dimension."""

    def __init__(self, forward: Callable[..., Any]) -> None:
        if not available():
            raise RuntimeError("this torch cannot list dynamo's compiled graphs")
        self._code = forward.__code__
        self._globals = forward.__globals__
        self._parameter_names = list(inspect.signature(forward).parameters)
        self._functions: dict[tuple[int, int], Callable[..., Any]] = {}

    def __call__(self, module: torch.nn.Module, tokens: torch.Tensor, *args: Any) -> Any:
        key = (id(module), tokens.shape[0])
        function = self._functions.get(key)
        if function is None:
            function = self._functions[key] = self._resolve(module, tokens, *args)
        return function(module, tokens, *args)

    def _resolve(self, *args: Any) -> Callable[..., Any]:
        """The code of the first compiled graph whose guards pass on this call's inputs, in
        dynamo's own order, as a function of the forward's arguments."""
        frame_locals = dict(zip(self._parameter_names, args, strict=True))
        assert _debug_get_cache_entry_list is not None
        for entry in _debug_get_cache_entry_list(self._code):
            if entry.guard_manager.check(frame_locals):
                logger.debug("%d-token calls run compiled graph %s", args[1].shape[0],
                             entry.compile_id)
                return types.FunctionType(entry.code, self._globals)
        raise NoCompiledGraph(f"no compiled graph takes a {args[1].shape[0]}-token call")
