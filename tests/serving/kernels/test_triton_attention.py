"""Quiver's Triton kernels for CUDA (`serving.kernels.triton_attention`) against the
reference op: the mixed-step kernel (`quiver::paged_attention`) on decodes and prefill
chunks with and without cached context, the decode kernel on block tables wider than the
requests' with NaN blocks past their ends (a read past a request's length would spread NaN
into its output).

Here they run through Triton's interpreter on CPU tensors (in a subprocess: the interpreter
is chosen when the module is imported); on a GPU, natively. The interpreter computes
`tl.dot` on bfloat16 from its raw bits, so the mixed-step kernel is checked there in float32
and float16 only (bfloat16 on GPUs).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest
import torch

from serving.kernels import PURE_TORCH, REFERENCE_ATTENTION, select_kernels
from tests.serving.kernels.test_decode_attention import TOLERANCE, decode_step
from tests.serving.kernels.test_paged_attention import MIXED, SHAPES, make_step

triton_attention = pytest.importorskip(
    "serving.kernels.triton_attention", reason="Triton is not installed (it comes with torch)")


def check_kernels(device: str, dtypes: tuple[torch.dtype, ...],
                  mixed_dtypes: tuple[torch.dtype, ...]) -> None:
    """Both kernels against the reference op for every shape (raises on a mismatch)."""
    for shape in SHAPES:
        num_heads, num_kv_heads, head_dim, block_size = shape
        for dtype in mixed_dtypes:
            step = make_step(**MIXED, num_heads=num_heads, num_kv_heads=num_kv_heads,
                             head_dim=head_dim, block_size=block_size, dtype=dtype, seed=4)
            cache = step.kv_cache.to(device)
            output = triton_attention.paged_attention(
                step.query.to(device), step.key.to(device), step.value.to(device), cache,
                step.metadata.to(device), block_size, step.scale)
            expected, expected_cache = step.run(REFERENCE_ATTENTION)
            assert torch.equal(cache.cpu(), expected_cache), (shape, dtype)
            torch.testing.assert_close(output.float().cpu(), expected.float(),
                                       atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype],
                                       msg=lambda m, s=shape, d=dtype: f"mixed {s} {d}: {m}")
        for dtype in dtypes:
            wide = decode_step(shape, dtype, extra_blocks=3, seed=1)
            cache = wide.kv_cache.to(device)
            output = triton_attention.paged_attention_decode(
                wide.query.to(device), wide.key.to(device), wide.value.to(device), cache,
                wide.metadata.to(device), wide.block_size, wide.scale)
            expected, expected_cache = decode_step(shape, dtype, extra_blocks=0,
                                                   seed=1).run(REFERENCE_ATTENTION)
            assert torch.equal(cache[:, :expected_cache.shape[1]].cpu(), expected_cache)
            torch.testing.assert_close(output.float().cpu(), expected.float(),
                                       atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype],
                                       msg=lambda m, s=shape, d=dtype: f"decode {s} {d}: {m}")


INTERPRETED = textwrap.dedent("""
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from serving.kernels import triton_attention
    from tests.serving.kernels.test_triton_attention import check_kernels

    check_kernels("cpu", dtypes=(torch.float32, torch.bfloat16, torch.float16),
                  mixed_dtypes=(torch.float32, torch.float16))
    for group, head_dim in ((3, 64), (1, 16), (8, 128)):
        for op_name in triton_attention.KERNELS:
            triton_attention.check(op_name, torch.device("cpu"), num_queries_per_kv=group,
                                   head_dim=head_dim, dtypes=(torch.float32, torch.float16))
    print("ok")
""")


def test_kernels_match_the_reference_in_the_interpreter(repo_root) -> None:
    """Every shape; the start-up check passes for GQA 3, no GQA and GQA 8."""
    result = subprocess.run([sys.executable, "-c", INTERPRETED], cwd=repo_root,
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"


def test_a_kernel_failing_its_check_leaves_its_op_to_the_other_kernel(monkeypatch,
                                                                      caplog) -> None:
    """The step kernel failing its check: the reference op serves steps, while the decode
    kernel (which passed) still becomes the decode op's CUDA kernel."""
    def check(op_name, *args, **kwargs):
        if op_name == "paged_attention":
            raise RuntimeError("Triton paged_attention is off by 3 on a mixed step")

    registered = []
    monkeypatch.setattr(triton_attention, "check", check)
    monkeypatch.setattr(triton_attention, "register", registered.append)
    with caplog.at_level(logging.WARNING, logger="serving.kernels"):
        kernels = select_kernels(torch.device("cuda"), use_cpp=True, cache_dir=None,
                                 head_dim=64, num_queries_per_kv=3)
    assert kernels == PURE_TORCH
    assert registered == ["paged_attention_decode"]
    assert "quiver::paged_attention on CUDA without its Triton kernel" in caplog.text
    assert "off by 3 on a mixed step" in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernels_on_cuda_match_the_reference() -> None:
    for op_name in triton_attention.KERNELS:
        triton_attention.check(op_name, torch.device("cuda"), num_queries_per_kv=3,
                               head_dim=64, dtypes=(torch.float32, torch.bfloat16,
                                                    torch.float16))
    every = (torch.float32, torch.bfloat16, torch.float16)
    check_kernels("cuda", dtypes=every, mixed_dtypes=every)
    kernels = select_kernels(torch.device("cuda"), use_cpp=True, cache_dir=None, head_dim=64,
                             num_queries_per_kv=3)
    assert kernels.attention.name == "triton"
