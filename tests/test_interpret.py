"""The interpreter is the oracle: check it against plain dense attention and check its gradients."""

from __future__ import annotations

import math

import torch
from conftest import EXAMPLES

from attngen import load_kernels
from attngen.interpreter import interpret
from attngen.lower import lower
from attngen.parse import parse

ALL = {name: k for p in EXAMPLES for name, k in load_kernels(str(p)).items()}


def _dense(q, k, v, bias, mask):
    """An independent reference: softmax(q k^T / sqrt(d) + bias) v with a boolean mask."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
    s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v


def test_alibi_matches_an_independent_reference():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 8, generator=g, dtype=torch.float64) for _ in range(3))
    slopes = torch.rand(3, generator=g, dtype=torch.float64)
    i = torch.arange(17)
    bias = slopes.view(3, 1, 1) * (i.view(1, 1, 17) - i.view(1, 17, 1))
    ref = _dense(q, k, v, bias, i.view(17, 1) >= i.view(1, 17))
    torch.testing.assert_close(interpret(ALL["alibi"], q, k, v, slopes=slopes), ref)


def test_gradients_flow_to_qkv_and_learnable_inputs():
    """torch.autograd.gradcheck through the interpreter, with a bias table and fully masked rows."""
    spec = """attention x {
        input bias: float64[h, 9]
        score score + bias[h, clamp(q_idx - kv_idx, -4, 4) + 4]
        mask q_idx % 4 != 0 and kv_idx <= q_idx + 1
    }"""
    kern = lower(parse(spec))[0]
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 7, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.randn(2, 9, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v, b: interpret(kern, q, k, v, bias=b), (q, k, v, bias))
    out, lse = interpret(kern, q, k, v, bias=bias, return_lse=True)
    (out.sum() + lse[torch.isfinite(lse)].sum()).backward()
    for t in (q, k, v, bias):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(out[:, :, ::4], torch.zeros_like(out[:, :, ::4]))
    assert torch.isneginf(lse[:, :, ::4]).all()


def test_out_of_range_reads_give_zero():
    kern = lower(parse("attention x { input t: float32[kv_len]\n score score + t[kv_idx - 2] }"))[0]
    q = torch.zeros(1, 1, 1, 4, dtype=torch.float64)
    v = torch.eye(4, dtype=torch.float64).view(1, 1, 4, 4)
    t = torch.tensor([0.0, 1.0, 2.0, 3.0])
    out = interpret(kern, q, q.expand(1, 1, 4, 4), v, t=t)
    w = torch.softmax(torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64), 0)  # t[-2], t[-1] read 0
    torch.testing.assert_close(out[0, 0, 0], w)
