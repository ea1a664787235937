"""`quiver::row_argmax`: greedy sampling's argmax gives torch's answer on every kind of row."""

from __future__ import annotations

import pytest
import torch

from serving.kernels.ops import row_argmax

pytestmark = pytest.mark.isa  # vectorised with AVX-512, scalar elsewhere: run under lower ISAs

INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("vocab", [1, 15, 16, 17, 100, 49152])
def test_row_argmax_is_torchs_on_random_rows(cpp_kernels, vocab) -> None:
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(37, vocab, generator=generator)
    assert torch.equal(torch.ops.quiver.row_argmax(logits), logits.argmax(-1))
    assert torch.equal(row_argmax(logits), logits.argmax(-1))


def test_row_argmax_keeps_torchs_ties_infinities_and_nans(cpp_kernels) -> None:
    """Ties go to the first maximum (also across the lanes — 16 with AVX-512, 8 with AVX2 —
    and the tail); +inf
    wins, an all -inf row answers 0, and a row with NaN answers a NaN's index (the sampler
    then looks for a finite token)."""
    vocab = 53  # three full vectors and a tail of 5
    logits = torch.randn(8, vocab, generator=torch.Generator().manual_seed(1))
    logits[0, [7, 23, 40]] = 9.0  # tie in different lanes: the first
    logits[1, [50, 18]] = 9.0  # tie between the tail and a full vector
    logits[2, 33] = INF
    logits[3] = -INF
    logits[4, 11] = NAN
    logits[5, [2, 51]] = NAN
    logits[6, 52] = 9.0  # the maximum in the last slot of the tail
    output = torch.ops.quiver.row_argmax(logits)
    assert output.tolist()[:4] == [7, 18, 33, 0]
    assert logits[4, output[4]].isnan() and logits[5, output[5]].isnan()
    assert output[6] == 52
    assert torch.equal(output, logits.argmax(-1))


def test_row_argmax_takes_only_what_its_kernel_reads(cpp_kernels) -> None:
    """The op refuses other dtypes and layouts; the helper sends those to torch instead."""
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(2))
    with pytest.raises(RuntimeError, match="contiguous float32"):
        torch.ops.quiver.row_argmax(logits.bfloat16())
    with pytest.raises(RuntimeError, match="contiguous float32"):
        torch.ops.quiver.row_argmax(logits.t())
    for other in (logits.bfloat16(), logits.t(), logits.double()):
        assert torch.equal(row_argmax(other), other.argmax(-1))
