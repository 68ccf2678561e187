"""The sympy stage: simplification is exact, and the derived key-block ranges are proven
against brute-force enumeration of the mask, through the real kernel's visit trace."""

from __future__ import annotations

import itertools
import sys

import pytest
import torch
from conftest import DEVICE, EXAMPLES, compile_spec

from attngen import load_kernels
from attngen.analyze import plan, simplify
from attngen.interpreter import Env, dense_mask, evaluate
from attngen.verify import Shape, make_inputs, params_for

ALL = {name: k for p in EXAMPLES for name, k in load_kernels(str(p)).items()}

EXTRA = """
attention band { mask kv_idx >= q_idx - 3 and kv_idx <= q_idx + 9 }
attention shifted { mask q_idx - 7 >= kv_idx }
attention ahead { mask kv_idx > q_idx + 2 }
attention blockdiag { mask kv_idx // 16 == q_idx // 16 }
attention floor_both { mask (q_idx - kv_idx) // 8 == 0 }
attention rows_only { mask q_idx >= 10 and q_idx < 30 }
attention scaled_k { mask 2 * kv_idx <= q_idx + 1 }
attention param_guard {
    param on: bool = true
    param w: int = 5
    mask on and q_idx - kv_idx < w and kv_idx <= q_idx
}
attention union3 { mask kv_idx < 3 or kv_idx >= kv_len - 2 or q_idx == kv_idx }
"""
# masks whose block ranges must be exact: visited iff some entry is visible,
# and (single conjunct, no residual atoms) full iff every entry is visible
TIGHT_VISITS = {"causal", "sliding_window", "chunked", "prefix_lm", "sink_window", "cross_attention",
                "full", "band", "shifted", "ahead", "blockdiag", "scaled_k", "param_guard", "gqa", "mqa",
                "qk192_v128", "alibi", "softcap", "gemma_local", "gemma_global", "union3", "dilated"}
TIGHT_FULL = {"causal", "sliding_window", "chunked", "cross_attention", "full", "band", "shifted", "ahead",
              "blockdiag", "scaled_k", "param_guard", "gqa", "mqa", "qk192_v128", "alibi", "softcap",
              "gemma_local", "gemma_global", "dilated"}

GRIDS = [  # (q_len, kv_len, BLOCK_M, BLOCK_N): non-multiples, q_len > kv_len (negative offsets), tiny
    (37, 37, 16, 16), (64, 64, 16, 32), (50, 23, 16, 8), (23, 50, 8, 16), (1, 9, 16, 16), (70, 70, 32, 16),
]


def _blocks(m: torch.Tensor, br: int, bc: int):
    """Per (row block, column block) of a dense mask: any entry visible, and every entry visible
    (a column block running past the end is never all-visible: the kernels mask it)."""
    rows, cols = m.shape
    nr, nc = -(-rows // br), -(-cols // bc)
    anyv = torch.zeros(nr, nc, dtype=torch.bool)
    allv = torch.zeros(nr, nc, dtype=torch.bool)
    for i, j in itertools.product(range(nr), range(nc)):
        blk = m[i * br:(i + 1) * br, j * bc:(j + 1) * bc]
        anyv[i, j] = blk.any()
        allv[i, j] = blk.all() and (j + 1) * bc <= cols
    return anyv, allv


def _check_visits(name, visits, anyv, allv):
    assert set(visits.unique().tolist()) <= {0, 1, 16}, f"a block visited twice:\n{visits}"
    assert not (anyv & (visits == 0)).any(), f"a visible block was skipped:\n{visits}\n{anyv.int()}"
    assert not ((visits == 16) & ~allv).any(), f"a block marked full is not:\n{visits}\n{allv.int()}"
    if name in TIGHT_VISITS:
        assert torch.equal(visits > 0, anyv), f"visited blocks are not exactly the visible ones:\n{visits}"
    if name in TIGHT_FULL:
        assert torch.equal(visits == 16, allv), f"full blocks are not exactly the all-visible ones:\n{visits}"


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: "q{}k{}M{}N{}".format(*g))
@pytest.mark.parametrize("name", sorted(ALL) + ["band", "shifted", "ahead", "blockdiag", "floor_both",
                                                 "rows_only", "scaled_k", "param_guard", "union3"])
def test_block_ranges_against_brute_force(build_dir, examples, name, grid):
    """Forward and dQ: key blocks per query block. dK/dV: query blocks per key block, derived from
    the same mask with the roles swapped. All three from the kernels' own visit traces."""
    sq, sk, bm, bn = grid
    extra = compile_spec(EXTRA, build_dir, tag="extra")
    kernel, fn = extra[name] if name in extra else examples[name]
    shape = Shape(1, kernel.heads_q or 1, kernel.heads_kv or 1, sq, sk, 16, 16)
    q, k, v, inputs = make_inputs(kernel, shape, torch.float32, DEVICE, seed=sq * 7 + sk)
    params = params_for(kernel, Shape(1, 1, 1, sq, 4 * 13, 16, 16))  # windows ~13 wide
    bh = shape.B * shape.Hq
    d = sys.modules[fn.__module__].DILATION  # > 1: strided sub-problems r, each with its own trace

    def buffers(sq, sk):
        nm, nn = -(-sq // bm), -(-sk // bn)
        return {"fwd": torch.zeros(bh, nm, nn, dtype=torch.int32, device=DEVICE),
                "dq": torch.zeros(bh, nm, nn, dtype=torch.int32, device=DEVICE),
                "dkdv": torch.zeros(bh, nn, nm, dtype=torch.int32, device=DEVICE)}
    subs = [buffers(len(range(r, sq, d)), len(range(r, sk, d))) for r in range(d)]
    trace = subs[0] if d == 1 else {n: [t[n] for t in subs] for n in subs[0]}
    q.requires_grad_()
    cfg = dict(BLOCK_M=bm, BLOCK_N=bn)
    out = fn(q, k, v, **inputs, **params, config=cfg, _trace=trace)
    out.sum().backward()
    full = dense_mask(kernel, 1, 1, sq, sk, params, {n: t[:1].cpu() for n, t in inputs.items()})[0, 0]
    if d > 1:  # the rewrite is exact only if no pair across residues is visible
        assert not (full & (torch.arange(sq).view(-1, 1) % d != torch.arange(sk).view(1, -1) % d)).any()
    for r, tr in enumerate(subs):
        m = full[r::d, r::d]
        anyv, allv = _blocks(m, bm, bn)
        _check_visits(name, tr["fwd"][0].cpu(), anyv, allv)
        assert torch.equal(tr["dq"], tr["fwd"]), "dQ visits differ from the forward's"
        # transposed: for each key block, which query blocks it sees
        any_t, all_t = _blocks(m.T, bn, bm)
        _check_visits(name, tr["dkdv"][0].cpu(), any_t, all_t)


@pytest.mark.parametrize("name", sorted(ALL))
def test_simplification_is_exact(name):
    """The interpreter on the sympy-simplified IR gives the same mask and scores."""
    k = ALL[name]
    s = simplify(k)
    shape = Shape(2, k.heads_q or 2, k.heads_kv or 2, 29, 41, 8, 8)
    _, _, _, inputs = make_inputs(k, shape, torch.float64, torch.device("cpu"), seed=1)
    params = params_for(k, shape)
    B, H, Sq, Sk = shape.B, shape.Hq, shape.Sq, shape.Sk
    assert torch.equal(dense_mask(k, B, H, Sq, Sk, params, inputs), dense_mask(s, B, H, Sq, Sk, params, inputs))
    if k.score is not None:
        score = torch.randn(B, H, Sq, Sk, dtype=torch.float64) * 3
        vals = []
        for kk in (k, s):
            pos = dict(b=torch.arange(B).view(B, 1, 1, 1), h=torch.arange(H).view(1, H, 1, 1),
                       q_idx=torch.arange(Sq).view(1, 1, Sq, 1), kv_idx=torch.arange(Sk).view(1, 1, 1, Sk),
                       q_len=Sq, kv_len=Sk, score=score)
            vals.append(evaluate(kk.score, Env(pos, params, inputs, torch.float64, None)))
        torch.testing.assert_close(vals[0], vals[1], rtol=1e-12, atol=1e-12)


def test_plan_details():
    p = plan(ALL["document"])
    assert p.sparse and len(p.segments) == 1 and p.segments[0].residual
    assert any("doc_id" in n for n in p.notes)
    p = plan(ALL["sink_window"])
    assert len(p.segments) == 2 and not any(s.residual for s in p.segments)
    p = plan(ALL["causal"], sparse=False)
    assert not p.sparse and p.segments[0].residual
    # the scale is folded into the exp2 base: one multiply of qk by a per-program scalar
    assert repr(plan(ALL["causal"]).logit) == "mul(mul(1.4426950408889634, sm_scale), qk)"
    # plain scores expose that scale (the forward's full blocks then skip forming s); others do not
    assert repr(plan(ALL["causal"]).logit_scale) == "mul(1.4426950408889634, sm_scale)"
    for name in ("softcap", "alibi", "temperature", "relative_bias"):
        assert plan(ALL[name]).logit_scale is None, name
    # dead conditions drop: q_idx >= 0 always holds
    from attngen.lower import lower
    from attngen.parse import parse

    k = lower(parse("attention x { mask q_idx >= kv_idx and q_idx >= 0 and 0 <= q_idx - kv_idx }"))[0]
    assert repr(simplify(k).mask) == "ge(q_idx, kv_idx)"


@pytest.mark.parametrize("score, splits", [
    ("score + slopes[h] * (kv_idx - q_idx)", True),                       # ALiBi
    ("score * 0.75 + 0.0005 * kv_idx * kv_idx - 0.02 * q_idx + 0.125", True),  # polynomial in each position
    ("score + log(kv_idx + 1.0)", False),                                 # not a polynomial: may be infinite
    ("score + (-inf if kv_idx >= 20 else 0.0)", False),                   # -inf - (-inf) would be NaN
    ("score + kb[kv_idx]", False),                                        # a read at a position: may hold -inf
    ("score / slopes[h] - q_idx * 0.5", True),                           # a query term alone; c reads a tensor
    ("score", False),                                                     # nothing to split: no positions
    ("score + slopes[h] * kv_idx * q_idx", False),                        # a term reads both positions
    ("score * (1.0 + 0.001 * kv_idx)", False),                            # c reads a position
    ("30.0 * tanh(score / 30.0) + 0.1 * kv_idx", False),                 # not linear in qk
])
def test_logit_split(score, splits):
    """Plan.split: c * qk + key - shift is the logit exactly, key vanishes at its origin kv0 (so it stays small
    over a program's keys), and it is found only where every term reads one position at most."""
    import sympy as sp

    from attngen.analyze import Symbols, to_sympy
    from attngen.lower import lower
    from attngen.parse import parse

    k = lower(parse(f"attention x {{ input slopes: float32[h]\n input kb: float32[kv_len]\n score {score} }}"))[0]
    p = plan(k)
    assert (p.split is not None) is splits
    if splits:
        syms = Symbols.for_kernel(k)
        qk, key, shift, logit = (to_sympy(n, syms) for n in (p.split.qk, p.split.key, p.split.shift, p.logit))
        assert sp.simplify(qk * syms["qk"] + key - shift - logit).is_zero
        assert sp.simplify(key.subs(syms["kv_idx"], syms["kv0"])).is_zero
        assert syms["q_idx"] not in key.free_symbols and syms["kv_idx"] not in shift.free_symbols


@pytest.mark.parametrize("mask, d", [("(q_idx - kv_idx) % 2 == 0 and q_idx >= kv_idx", 2),
                                     ("q_idx >= kv_idx and 0 == (kv_idx - q_idx) % 3", 3),
                                     ("(q_idx - kv_idx) % 2 == 1", 1),          # other residues: no rewrite
                                     ("(q_idx - kv_idx) % 2 == 0 or kv_idx < 4", 1),  # not in every conjunct
                                     ("(q_idx - 2 * kv_idx) % 2 == 0", 1),
                                     ("(q_idx - kv_idx) % 2 == 0 and (q_idx - kv_idx) % 3 == 0", 1)])
def test_dilation_rewrite_fires_only_when_exact(mask, d):
    from attngen.lower import lower
    from attngen.parse import parse
    from attngen.rewrite import rewrite

    (k,) = lower(parse(f"attention t {{ mask {mask} }}", "t.attn"))
    rw = rewrite(k)
    assert rw.dilation == d
    if d > 1:  # sympy folds the congruence away: no residual atom, so blocks can be full
        p = plan(rw.kernel)
        assert p.segments and not any(s.residual for s in p.segments)


@pytest.mark.parametrize("mask, runs", [
    ("doc[b, q_idx] == doc[b, kv_idx] and q_idx >= kv_idx", ["doc[b, q_idx] == doc[b, kv_idx]"]),
    ("doc[b, kv_idx] == doc[b, q_idx]", ["doc[b, q_idx] == doc[b, kv_idx]"]),
    ("q_idx >= kv_idx and doc[b, q_idx] == doc[b, kv_idx] and doc[0, q_idx] == doc[0, kv_idx]",
     ["doc[b, q_idx] == doc[b, kv_idx]", "doc[0, q_idx] == doc[0, kv_idx]"]),
    ("doc[b, q_idx] == doc[0, kv_idx]", []),                      # different rows of the ids
    ("doc[b, q_idx] + 1 == doc[b, kv_idx]", []),                  # not an equality of two reads
    ("doc[b, q_idx] == doc[b, kv_idx] or q_idx >= kv_idx", []),    # not a top-level conjunct
    ("doc[b, q_idx] != doc[b, kv_idx]", []),
    ("doc[q_idx, kv_idx] == doc[q_idx, q_idx]", []),              # the prefix reads a position
])
def test_runs_are_found(mask, runs, tmp_path):
    from attngen.printer import PythonPrinter

    path = tmp_path / "t.attn"
    path.write_text(f"attention t {{ input doc: int32[b, kv_len]\n mask {mask} }}")
    pl = plan(load_kernels(str(path))["t"])
    py = PythonPrinter()
    assert [f"{py(r.q)} == {py(r.kv)}" for r in pl.runs] == runs
    if runs:  # what is left keeps its ranges: the causal bound where the mask has one
        assert bool(pl.rest) and not any(s.residual for s in pl.rest)
        assert any(s.hi for s in pl.rest) == ("q_idx >= kv_idx" in mask)


@pytest.mark.parametrize("body, cells", [
    ("sparse lay: bool[h] block 64\n mask q_idx >= kv_idx", [(64, 64)]),
    ("sparse lay: int8[b, h] block 128, 32", [(128, 32)]),
    ("input lay: int32[4, 4]\n mask lay[q_idx // 64, kv_idx // 16] != 0", [(64, 16)]),
    ("input lay: bool[4, 4]\n mask lay[q_idx // 64, kv_idx // 64] and lay[q_idx // 8, kv_idx // 8]",
     [(64, 64), (8, 8)]),
    ("input lay: int32[4, 4]\n mask lay[q_idx // 64, kv_idx // 16] == 0", []),    # zero cells show
    ("input lay: bool[4, 4]\n mask lay[kv_idx // 64, q_idx // 64]", []),          # transposed
    ("input lay: bool[4, 4]\n mask lay[q_idx // 64, kv_idx]", []),                # not a cell of keys
    ("input lay: bool[4, 4, 4]\n mask lay[q_idx, q_idx // 4, kv_idx // 4]", []),  # the prefix reads a position
    ("input lay: bool[4, 4]\n mask lay[q_idx // 64, kv_idx // 64] or q_idx >= kv_idx", []),  # not a conjunct
])
def test_cells_are_found(body, cells, tmp_path):
    """Block layouts (analyze.Cells): the conjuncts T[.., q_idx // R, kv_idx // C] a map decides per cell; what is
    left keeps its ranges."""
    path = tmp_path / "t.attn"
    path.write_text(f"attention t {{ {body} }}")
    pl = plan(load_kernels(str(path))["t"])
    assert [(c.rows, c.cols) for c in pl.cells] == cells
    if cells:
        assert bool(pl.rest) and not any(s.residual for s in pl.rest)
        assert any(s.hi for s in pl.rest) == ("q_idx >= kv_idx" in body)
