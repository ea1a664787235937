"""Runs a compiled decoder block's code without dynamo's guard checks on every call.

Dynamo guards each compiled graph with ~700 checks (every parameter's dtype and shape, the
KV caches' strides, the step's sizes, torch's global state) and evaluates them on every call
before it runs the graph's code: with the code that gathers the inputs, ~200-300 us a call,
ten calls a SmolLM2 step (2-core Zen 2: 2-3 ms of a 16 ms batch-1 forward pass). torch's own
`set_stance(skip_guard_eval_unsafe=True)` still pays dynamo's per-call frame handling: it
saved ~0.4 ms of those.

Within one engine what those guards check stays put from step to step except the sizes of
the step: the same blocks with the same parameters, the same caches, the same metadata type;
the token count picks the graph (one token has its own; quantized kernels split the dynamic
one at a size), and every other size that varies (the step index's length) is a dynamic
size the graphs take whatever it is. So `GraphDispatch` checks the guards once per (block,
token count, grad and inference mode) — with that call's own inputs, against every graph
dynamo compiled for the block's code, in the order dynamo tries them — and from then on
runs the code of the first graph that passed directly. A call no graph takes raises
`NoCompiledGraph` (dynamo would compile there; the caller runs the step eagerly instead),
and so do later calls like it, without checking again.

What this assumes, and the caller guarantees: every block was compiled with the same backend
and options (dynamo's own lookup also matches an entry's backend; this one does not), and
the model's modules are not swapped, regrouped or repacked after the first call
(`serving.models.compiled` builds a new dispatch with every warm-up). Steps served this way
ignore `torch.compiler.set_stance` (eager runs call the blocks themselves). The cache
entries come from a debugging hook of dynamo's: where this torch lacks it, or its entries
look different, building a `GraphDispatch` raises RuntimeError and the caller leaves
guarding to dynamo.
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
    """Whether this torch lists dynamo's compiled graphs (the hook the dispatch reads)."""
    return _debug_get_cache_entry_list is not None


class GraphDispatch:
    """Calls `forward`'s compiled code for a module, its guards checked once per (module,
    token count, grad and inference mode); the token count is the first tensor argument's
    first dimension."""

    def __init__(self, forward: Callable[..., Any]) -> None:
        """Raises RuntimeError where nothing is compiled for `forward` yet or this torch's
        cache entries do not look as expected (a debugging hook may change with torch)."""
        if _debug_get_cache_entry_list is None:
            raise RuntimeError("this torch cannot list dynamo's compiled graphs")
        entries = _debug_get_cache_entry_list(forward.__code__)
        if not entries:
            raise RuntimeError(f"nothing compiled for {forward.__qualname__} yet")
        if not all(isinstance(getattr(entry, "code", None), types.CodeType)
                   and callable(getattr(getattr(entry, "guard_manager", None), "check", None))
                   for entry in entries):
            raise RuntimeError("this torch's compiled-graph entries have no code or guard "
                               "check")
        self._forward = forward
        self._parameter_names = list(inspect.signature(forward).parameters)
        # (id(module), tokens, grad, inference) -> (module, its graph's code or why none)
        self._chosen: dict[tuple[int, int, bool, bool],
                           tuple[torch.nn.Module, Callable[..., Any] | str]] = {}
        self._by_code: dict[types.CodeType, Callable[..., Any]] = {}  # one function a graph

    def __call__(self, module: torch.nn.Module, hidden_states: torch.Tensor, *args: Any) -> Any:
        key = (id(module), hidden_states.shape[0], torch.is_grad_enabled(),
               torch.is_inference_mode_enabled())
        chosen = self._chosen.get(key)
        if chosen is None or chosen[0] is not module:
            chosen = self._chosen[key] = (module, self._resolve(module, hidden_states, *args))
        if isinstance(chosen[1], str):
            raise NoCompiledGraph(chosen[1])
        return chosen[1](module, hidden_states, *args)

    def _resolve(self, *args: Any) -> Callable[..., Any] | str:
        """The code of the first compiled graph whose guards pass on this call's inputs, in
        dynamo's own order, as a function of the forward's arguments; or why there is none."""
        frame_locals = dict(zip(self._parameter_names, args, strict=True))
        num_tokens = args[1].shape[0]
        assert _debug_get_cache_entry_list is not None
        for entry in _debug_get_cache_entry_list(self._forward.__code__):
            if entry.guard_manager.check(frame_locals):
                logger.debug("%d-token calls run compiled graph %s", num_tokens,
                             entry.compile_id)
                if entry.code not in self._by_code:
                    self._by_code[entry.code] = types.FunctionType(
                        entry.code, self._forward.__globals__, closure=self._forward.__closure__)
                return self._by_code[entry.code]
        return f"no compiled graph takes a {num_tokens}-token call"
