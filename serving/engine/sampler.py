"""Batched token sampling for the native engine, with vLLM's semantics.

Per row of the `[B, V]` logits batch, in order:

1. NaN logits become -inf.
2. Penalties on the raw logits: repetition over prompt + output tokens (positive logits
   divided, the others multiplied), frequency (`count * penalty`) and presence over the
   output tokens only.
2b. `logit_bias` added; for rows with a `guide`, every token its grammar does not allow
   next set to -inf (`serving.structured.GuidedDecoding`), so constrained and free rows
   share one batch. After sampling, each guided row's grammar advances by its token.
3. Greedy rows (`SamplingParams.is_greedy`) take the argmax and use no randomness.
4. Random rows: temperature, top-k, top-p, min-p, then one draw from the row's generator.

`min_tokens` is not applied here: the sampler does not know the EOS token, so the
scheduler enforces it by not stopping a request before `min_tokens` outputs.

Logprobs, as in vLLM by default, are those of the raw model output (`log_softmax` of the
unprocessed logits, NaN read as -inf), computed only for the rows that ask for them.

Sampling is inverse-CDF: one uniform number per row and step, drawn from the request's own
`torch.Generator` when it has a seed (created on first use, kept across preemption,
forgotten by `drop()`), else from the sampler's shared generator. Every per-row step
depends only on that row, so a seeded request yields the same tokens whatever else is in
the batch and wherever its row sits. Top-k and top-p cut by value (ties at the cut are
kept), and top-p sorts only as many candidates as it needs.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from serving.engine.outputs import Logprobs
from serving.engine.sampling_params import SamplingParams
from serving.kernels.ops import row_argmax
from serving.structured.guided import GuidedDecoding

# Top-p first looks for its cut among this many most likely tokens, then sorts the
# whole vocabulary only for the rows whose nucleus is larger.
TOP_P_CANDIDATES = (256, 4096)
# Caps temperature so that dividing an infinite logit by it never gives NaN.
MAX_TEMPERATURE = 1e30
_SEED_MODULUS = 2**64
_NEG_INF = float("-inf")


@dataclass(frozen=True)
class SamplingRow:
    """One row of the logits batch: whose it is, how to sample, and its tokens so far."""

    request_id: str
    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]


@dataclass(frozen=True)
class SamplerOutput:
    """One sampled token per row; logprobs per row (None where the row asked for none)."""

    token_ids: list[int]
    logprobs: list[Logprobs | None]


class Sampler:
    """Samples one token per row; holds the generators of seeded requests."""

    def __init__(self, device: torch.device | str = "cpu", *,
                 guided: GuidedDecoding | None = None) -> None:
        self.device = torch.device(device)
        self.guided = guided
        self._generator = torch.Generator(device=self.device)
        self._generator.seed()
        self._seeded_generators: dict[str, torch.Generator] = {}

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        assert logits.dim() == 2 and logits.shape[0] == len(rows), "one logits row per row"
        logits = logits.float()
        logprob_rows = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
        raw_logprobs = None
        if logprob_rows:
            raw_logprobs = _sanitise(logits[logprob_rows]).log_softmax(-1)
        processed = apply_penalties(logits, rows)
        guided_rows: list[int] = []
        if any(row.params.logit_bias or row.params.guide for row in rows):
            if processed is logits:
                processed = logits.clone()
            apply_logit_bias_(processed, rows)
            guided_rows = self._mask_guided(processed, rows)
        token_ids, is_dead = self._sample(processed, rows, is_owned=processed is not logits)
        if bool(is_dead.any()):
            # nothing left to sample: the raw argmax, or a guided row's best allowed token
            fallback = logits.clone()
            fallback[guided_rows] = processed[guided_rows]
            token_ids[is_dead] = _sanitise(fallback[is_dead]).argmax(-1)
        if guided_rows:
            assert self.guided is not None
            self.guided.accept([row.request_id for row in rows], token_ids.tolist(),
                               guided_rows)
        logprobs: list[Logprobs | None] = [None] * len(rows)
        if raw_logprobs is not None:
            gathered = _gather_logprobs(raw_logprobs, token_ids[logprob_rows], rows, logprob_rows)
            for i, row_logprobs in zip(logprob_rows, gathered, strict=True):
                logprobs[i] = row_logprobs
        return SamplerOutput(token_ids=token_ids.tolist(), logprobs=logprobs)

    def drop(self, request_ids: Iterable[str]) -> None:
        """Forget the generators and grammars of finished requests (a preempted one keeps
        its own)."""
        request_ids = list(request_ids)
        for request_id in request_ids:
            self._seeded_generators.pop(request_id, None)
        if self.guided is not None:
            self.guided.drop(request_ids)

    def _mask_guided(self, logits: torch.Tensor, rows: list[SamplingRow]) -> list[int]:
        guides = [row.params.guide for row in rows]
        if not any(guides):
            return []
        if self.guided is None:  # admission refuses guides without a compiler
            raise RuntimeError("a guided request reached a sampler without guided decoding")
        return self.guided.mask(logits, [row.request_id for row in rows], guides)

    def _sample(
        self, logits: torch.Tensor, rows: list[SamplingRow], is_owned: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token per row, and which rows had no finite logit left (to fall back on raw).

        `is_owned`: whether `logits` may be changed in place (else it is the caller's).
        """
        greedy_rows = [i for i, row in enumerate(rows) if row.params.is_greedy]
        if len(greedy_rows) == len(rows):
            return _greedy(logits)
        random_rows = [i for i, row in enumerate(rows) if not row.params.is_greedy]
        if not greedy_rows:
            return self._sample_random(logits, rows, is_owned)
        token_ids = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        is_dead = torch.empty(len(rows), dtype=torch.bool, device=logits.device)
        token_ids[greedy_rows], is_dead[greedy_rows] = _greedy(logits[greedy_rows])
        token_ids[random_rows], is_dead[random_rows] = self._sample_random(
            logits[random_rows], [rows[i] for i in random_rows], is_owned=True
        )
        return token_ids, is_dead

    def _sample_random(
        self, logits: torch.Tensor, rows: list[SamplingRow], is_owned: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Temperature, top-k, top-p, min-p and one inverse-CDF draw per row."""
        params = [row.params for row in rows]
        temperatures = [min(p.temperature, MAX_TEMPERATURE) for p in params]
        if any(t != 1.0 for t in temperatures):
            logits = logits / _tensor(temperatures, logits)[:, None]
        elif not is_owned:
            logits = logits.clone()
        logits, is_dead = _resolve_infinities(logits)
        logits = apply_top_k(logits, [p.top_k for p in params])
        probs = logits.softmax(-1)
        probs = apply_top_p(probs, [p.top_p for p in params])
        probs = apply_min_p(probs, [p.min_p for p in params])
        return sample_inverse_cdf(probs, self._draw_uniforms(rows)), is_dead

    def _draw_uniforms(self, rows: list[SamplingRow]) -> torch.Tensor:
        """One uniform in [0, 1) per row: seeded rows from their own generator."""
        uniforms = torch.empty(len(rows), device=self.device)
        unseeded = [i for i, row in enumerate(rows) if row.params.seed is None]
        if unseeded:
            uniforms[unseeded] = torch.rand(
                len(unseeded), generator=self._generator, device=self.device
            )
        for i, row in enumerate(rows):
            if row.params.seed is not None:
                generator = self._generator_for(row.request_id, row.params.seed)
                uniforms[i : i + 1] = torch.rand(1, generator=generator, device=self.device)
        return uniforms

    def _generator_for(self, request_id: str, seed: int) -> torch.Generator:
        generator = self._seeded_generators.get(request_id)
        if generator is None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed % _SEED_MODULUS)
            self._seeded_generators[request_id] = generator
        return generator


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Repetition (prompt + output), frequency and presence (output) penalties.

    Returns a new tensor when some row has penalties, else `logits` itself. Only the
    logits of tokens that occurred are touched: no `[B, V]` count tensors are built.
    """
    repetition = [row.params.repetition_penalty for row in rows]
    frequency = [row.params.frequency_penalty for row in rows]
    presence = [row.params.presence_penalty for row in rows]
    repeat_rows = [i for i, r in enumerate(repetition) if r != 1.0]
    count_rows = [i for i, row in enumerate(rows) if frequency[i] != 0.0 or presence[i] != 0.0]
    if not repeat_rows and not count_rows:
        return logits
    flat = logits.clone(memory_format=torch.contiguous_format).view(-1)
    vocab_size = logits.shape[1]
    if repeat_rows:
        seqs = [rows[i].prompt_token_ids for i in repeat_rows]
        seqs += [rows[i].output_token_ids for i in repeat_rows]
        flat_ids, _ = flat_token_ids(seqs, repeat_rows * 2, vocab_size, logits.device)
        factors = _tensor(repetition, logits)[flat_ids // vocab_size]
        values = flat[flat_ids]
        flat[flat_ids] = torch.where(values > 0, values / factors, values * factors)
    if count_rows:
        seqs = [rows[i].output_token_ids for i in count_rows]
        flat_ids, counts = flat_token_ids(seqs, count_rows, vocab_size, logits.device)
        row_ids = flat_ids // vocab_size
        values = flat[flat_ids] - _tensor(frequency, logits)[row_ids] * counts.to(logits.dtype)
        flat[flat_ids] = values - _tensor(presence, logits)[row_ids]
    return flat.view(logits.shape)


def apply_logit_bias_(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """In place: each row's `logit_bias` added to its logits (ids past the vocabulary are
    ignored: the server refuses them before they get here)."""
    vocab_size = logits.shape[1]
    flat_ids, biases = [], []
    for i, row in enumerate(rows):
        for token_id, bias in row.params.logit_bias:
            if token_id < vocab_size:
                flat_ids.append(i * vocab_size + token_id)
                biases.append(bias)
    if flat_ids:
        logits.view(-1).index_add_(0, torch.tensor(flat_ids, device=logits.device),
                                   _tensor(biases, logits))


def flat_token_ids(
    seqs: Sequence[Sequence[int]], row_ids: list[int], vocab_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct `row * vocab_size + token` of the tokens in `seqs[j]` (for row `row_ids[j]`),
    with how often each occurs; ids outside the vocabulary are ignored."""
    lengths = torch.tensor([len(ids) for ids in seqs], device=device)
    token_ids = torch.tensor(
        list(itertools.chain.from_iterable(seqs)), dtype=torch.long, device=device
    )
    rows = torch.repeat_interleave(torch.tensor(row_ids, device=device), lengths)
    in_vocab = (token_ids >= 0) & (token_ids < vocab_size)
    flat_ids = rows[in_vocab] * vocab_size + token_ids[in_vocab]
    return torch.unique(flat_ids, return_counts=True)


def apply_top_k(logits: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    """Mask (in place) logits below each row's k-th largest; k of 0 or -1 is off."""
    vocab_size = logits.shape[1]
    rows = [i for i, k in enumerate(top_k) if 0 < k < vocab_size]
    if not rows:
        return logits
    k = torch.tensor([top_k[i] for i in rows], device=logits.device)

    def cut(sub: torch.Tensor) -> torch.Tensor:
        values = sub.topk(int(k.max()), dim=-1).values
        threshold = values.gather(1, (k - 1)[:, None])
        return sub.masked_fill_(sub < threshold, _NEG_INF)

    return _update_rows(logits, rows, cut)


def apply_top_p(probs: torch.Tensor, top_p: list[float]) -> torch.Tensor:
    """Zero (in place) the tokens outside each row's nucleus; top_p of 1 is off.

    The nucleus is the most likely tokens whose mass, without the last one, is below
    `top_p` (vLLM's cut), so the most likely token is always kept.
    """
    rows = [i for i, p in enumerate(top_p) if p < 1.0]
    if not rows:
        return probs
    p = _tensor([top_p[i] for i in rows], probs)
    return _update_rows(probs, rows, lambda sub: sub.masked_fill_(sub < _nucleus_floor(sub, p), 0))


def _nucleus_floor(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """`[R, 1]` smallest probability inside each row's nucleus."""
    num_rows, vocab_size = probs.shape
    floor = torch.empty(num_rows, 1, dtype=probs.dtype, device=probs.device)
    pending = torch.arange(num_rows, device=probs.device)
    for num_candidates in (*TOP_P_CANDIDATES, vocab_size):
        candidates = probs if len(pending) == num_rows else probs[pending]
        if num_candidates >= vocab_size:
            values = candidates.sort(dim=-1, descending=True).values
        else:
            values = candidates.topk(num_candidates, dim=-1).values
        p = top_p[pending, None]
        cumsum = values.cumsum(-1)
        num_kept = 1 + (cumsum[:, :-1] < p).sum(-1, keepdim=True)
        # The cut is known once the candidates hold mass >= top_p or every nonzero token.
        is_known = (cumsum[:, -1:] >= p) | (values[:, -1:] == 0) | (num_candidates >= vocab_size)
        is_known = is_known.squeeze(1)
        floor[pending[is_known]] = values.gather(1, num_kept - 1)[is_known]
        pending = pending[~is_known]
        if pending.numel() == 0:
            break
    return floor


def apply_min_p(probs: torch.Tensor, min_p: list[float]) -> torch.Tensor:
    """Zero (in place) tokens less likely than `min_p` times the row's most likely one."""
    rows = [i for i, m in enumerate(min_p) if m > 0.0]
    if not rows:
        return probs
    m = _tensor([min_p[i] for i in rows], probs)[:, None]

    def cut(sub: torch.Tensor) -> torch.Tensor:
        return sub.masked_fill_(sub < m * sub.amax(-1, keepdim=True), 0)

    return _update_rows(probs, rows, cut)


def sample_inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Per row, the first token whose cumulative (unnormalised) mass exceeds `u * total`.

    Zero-probability tokens add nothing to the cumulative mass, so are never chosen.
    """
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    target = torch.minimum(
        uniforms[:, None] * total, torch.nextafter(total, torch.zeros_like(total))
    )
    token_ids = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return token_ids.clamp_(max=probs.shape[1] - 1)


def _greedy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    token_ids = row_argmax(logits)
    best = logits.gather(1, token_ids[:, None]).squeeze(1)
    has_nan = best.isnan()  # argmax reads NaN as the largest value
    if bool(has_nan.any()):
        token_ids[has_nan] = _sanitise(logits[has_nan]).argmax(-1)
        best[has_nan] = logits[has_nan].gather(1, token_ids[has_nan, None]).squeeze(1)
    return token_ids, best == _NEG_INF


def _resolve_infinities(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: NaN becomes -inf; rows with +inf keep only their +inf tokens (equally
    likely); rows with no finite logit are flagged and made uniform (softmax stays finite)."""
    row_max = logits.amax(-1)
    has_nan = row_max.isnan()
    if bool(has_nan.any()):
        logits[has_nan] = _sanitise(logits[has_nan])
        row_max[has_nan] = logits[has_nan].amax(-1)
    has_pos_inf = row_max == float("inf")
    if bool(has_pos_inf.any()):
        sub = logits[has_pos_inf]
        logits[has_pos_inf] = torch.where(sub == float("inf"), 0.0, _NEG_INF)
    is_dead = row_max == _NEG_INF
    if bool(is_dead.any()):
        logits[is_dead] = 0.0
    return logits, is_dead


def _sanitise(logits: torch.Tensor) -> torch.Tensor:
    """A copy with NaN read as -inf (infinities kept)."""
    return torch.nan_to_num(logits, nan=_NEG_INF, posinf=float("inf"), neginf=_NEG_INF)


def _gather_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, rows: list[SamplingRow], indices: list[int]
) -> list[Logprobs]:
    """Logprobs of the sampled tokens and of each row's top `params.logprobs` tokens."""
    sampled = logprobs.gather(1, token_ids[:, None]).squeeze(1).tolist()
    vocab_size = logprobs.shape[1]
    num_top = [min(rows[i].params.logprobs or 0, vocab_size) for i in indices]
    top_values: list[list[float]] = [[] for _ in indices]
    top_ids: list[list[int]] = [[] for _ in indices]
    if max(num_top) > 0:
        top = logprobs.topk(max(num_top), dim=-1)
        top_values, top_ids = top.values.tolist(), top.indices.tolist()
    return [
        Logprobs(sampled_logprob=s, top_logprobs=list(zip(ids[:n], values[:n], strict=True)))
        for s, n, ids, values in zip(sampled, num_top, top_ids, top_values, strict=True)
    ]


def _update_rows(
    x: torch.Tensor, rows: list[int], fn: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Apply `fn` to the given rows of `x` (all of them without a copy)."""
    if len(rows) == x.shape[0]:
        return fn(x)
    x[rows] = fn(x[rows])
    return x


def _tensor(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)
