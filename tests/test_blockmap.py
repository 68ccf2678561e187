"""Runtime block maps (masks that read tensors): the map kernel's classification against a brute
force over the dense mask, the compact lists, the kernels' visits (TRACE), results against the
interpreter, reuse of a prebuilt map, and the errors for a map that does not fit the call."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import DEVICE, EXAMPLES, compile_spec

from attngen.codegen import compile_source
from attngen.interpreter import dense_mask
from attngen.verify import Shape, check, make_inputs

MAPPED = ("document", "tree")
LAYOUTS = ("block_sparse",)  # sparse clauses: block maps too (test_cells_decide_tiles_exactly)


def _inputs(kernel, shape: Shape, seed: int):
    """make_inputs, with document ids of uneven lengths (some longer than a block, so that the map
    has full tiles) instead of 4 short documents."""
    q, k, v, inputs = make_inputs(kernel, shape, torch.float32, DEVICE, seed)
    if "doc_id" in inputs:
        g = torch.Generator().manual_seed(seed)
        ends = torch.rand(shape.B, 5, generator=g).mul(shape.Sk).long().sort(-1).values
        pos = torch.arange(shape.Sk)
        inputs["doc_id"] = (pos[None, :, None] >= ends[:, None, :]).sum(-1).to(torch.int32).to(DEVICE)
    return q, k, v, inputs


def _states(kernel, shape: Shape, inputs: dict, bm: int, bn: int) -> torch.Tensor:
    """Brute force: [B, H, row blocks, column blocks], 0 empty / 1 partial / 2 full, from the dense
    mask; positions past q_len / kv_len count as masked."""
    m = dense_mask(kernel, shape.B, shape.Hq, shape.Sq, shape.Sk, {}, {n: t.cpu() for n, t in inputs.items()})
    nr, nc = -(-shape.Sq // bm), -(-shape.Sk // bn)
    pad = torch.zeros(shape.B, shape.Hq, nr * bm, nc * bn, dtype=torch.bool)
    pad[:, :, :shape.Sq, :shape.Sk] = m
    t = pad.view(shape.B, shape.Hq, nr, bm, nc, bn)
    return t.any(5).any(3).int() + t.all(5).all(3).int()


def _map(fn, q, k, v, inputs, config=None):
    bmap = fn.block_map(q, k, v, **inputs, config=config)
    state = bmap.state.cpu()
    B, H = q.shape[0], q.shape[1]
    return bmap, state.expand(B, H, *state.shape[2:])


CASES = [  # (shape, config): lengths not multiples of the block, q_len != kv_len, non-square tiles
    (Shape(2, 2, 1, 77, 77, 16, 16), dict(BLOCK_M=16, BLOCK_N=16)),
    (Shape(1, 2, 2, 40, 97, 16, 16), dict(BLOCK_M=32, BLOCK_N=16)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-M{c[1]['BLOCK_M']}N{c[1]['BLOCK_N']}")
@pytest.mark.parametrize("name", MAPPED)
def test_map_and_lists_match_brute_force(examples, name, case):
    shape, cfg = case
    kernel, fn = examples[name]
    q, k, v, inputs = _inputs(kernel, shape, seed=shape.Sk)
    bmap, state = _map(fn, q, k, v, inputs, cfg)
    assert bmap.fine == (cfg["BLOCK_M"], cfg["BLOCK_N"]) and bmap.state.dtype == torch.int8
    assert bmap.state.shape[:2] == (shape.B, 1), "document and tree read b, not h"
    assert torch.equal(state.int(), _states(kernel, shape, inputs, *bmap.fine))
    # coarser views: a block is empty/full iff all its fine tiles are, checked against the dense mask
    for bm, bn, transposed in ((2 * cfg["BLOCK_M"], cfg["BLOCK_N"], False), (cfg["BLOCK_M"], 2 * cfg["BLOCK_N"], True)):
        want = _states(kernel, shape, inputs, bm, bn)[:, 0]
        if transposed:
            want = want.transpose(1, 2)
        num, idx = (t.cpu() for t in bmap.lists(bm, bn, transposed))
        for b in range(shape.B):
            for r in range(want.shape[1]):
                for kind, slot in ((1, 0), (2, 1)):
                    cols = torch.nonzero(want[b, r] == kind).flatten().tolist()
                    assert num[b, r, slot] == len(cols)
                    assert idx[b, r, slot, :len(cols)].tolist() == cols, f"{name} b{b} row {r} kind {kind}"


PER_KERNEL = {"fwd": dict(BLOCK_M=16, BLOCK_N=16), "dkdv": dict(BLOCK_M=16, BLOCK_N=32),
              "dq": dict(BLOCK_M=32, BLOCK_N=16)}


@pytest.mark.parametrize("cfg", [dict(BLOCK_M=16, BLOCK_N=16), PER_KERNEL], ids=["shared", "per-kernel"])
@pytest.mark.parametrize("name", MAPPED)
def test_kernels_visit_the_map(examples, name, cfg):
    """TRACE: partial blocks once as partial (1), full ones once as full (16), empty ones never;
    forward and dQ by query block, dK/dV by key block; per-kernel tiles read their own lists."""
    kernel, fn = examples[name]
    # tree: full blocks only in the cache (kv_idx < kv_len - q_len), which sympy proves full
    shape = Shape(2, 2, 1, 70, 83, 16, 16) if name == "document" else Shape(2, 2, 1, 40, 97, 16, 16)
    q, k, v, inputs = _inputs(kernel, shape, seed=4)
    want = {}
    for kern in ("fwd", "dq", "dkdv"):
        c = cfg.get(kern, cfg)
        w = _states(kernel, shape, inputs, c["BLOCK_M"], c["BLOCK_N"])
        w = torch.where(w == 2, 16, w).flatten(0, 1)
        want[kern] = (w.transpose(1, 2) if kern == "dkdv" else w).int()
        if kern == "fwd":  # 16 x 16: every kind of block occurs
            assert (w == 16).any() and (w == 1).any() and (w == 0).any()
    trace = {n: torch.zeros_like(t).contiguous().to(DEVICE) for n, t in want.items()}
    q.requires_grad_()
    fn(q, k, v, **inputs, config=cfg, _trace=trace).sum().backward()
    for kern in want:
        assert torch.equal(trace[kern].cpu(), want[kern]), kern


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("name", MAPPED)
def test_map_results_match_interpreter(examples, name, dtype):
    """Outputs, LSE and dq, dk, dv with the map (16x16 blocks: empty, partial and full ones, the
    inputs of test_kernels_visit_the_map) against fp64."""
    kernel, fn = examples[name]
    shape = Shape(2, 2, 1, 70, 83, 16, 16) if name == "document" else Shape(2, 2, 1, 40, 97, 16, 16)
    inputs = _inputs(kernel, shape, seed=6)[3]
    r = check(kernel, fn, shape, dtype, DEVICE, seed=6, config=dict(BLOCK_M=16, BLOCK_N=16), inputs=inputs)
    assert r.ok, f"{name} {r.dtype}: {r.why}"


def test_per_kernel_backward_configs(examples):
    """config sections: top level < "bwd" < "dkdv" / "dq".
    A map built for per-kernel tiles has a fine tile dividing all of them; gradients stay right."""
    kernel, fn = examples["document"]
    mod = __import__("sys").modules[fn.__module__]
    cfg = {"BLOCK_M": 16, "num_warps": 2, "bwd": {"BLOCK_N": 32, "num_stages": 2}, "dkdv": {"BLOCK_N": 64},
           "dq": {"BLOCK_M": 128}}
    c = mod._bwd_config(128, 128, torch.device("cuda"), cfg)
    assert c["dkdv"] == dict(BLOCK_M=16, BLOCK_N=64, num_warps=2, num_stages=2)
    assert c["dq"] == dict(BLOCK_M=128, BLOCK_N=32, num_warps=2, num_stages=2)
    assert set(c) == {"dkdv", "dq"}
    shape = Shape(2, 2, 1, 70, 83, 16, 16)
    inputs = _inputs(kernel, shape, seed=6)[3]
    bmap = _map(fn, *_inputs(kernel, shape, seed=6), PER_KERNEL)[0]
    assert bmap.fine == (16, 16)
    r = check(kernel, fn, shape, torch.float32, DEVICE, seed=6, config=PER_KERNEL, inputs=inputs)
    assert r.ok, r.why


def test_prebuilt_map_is_reused(examples):
    """One map for two calls (two layers): identical results, equal to building it per call and to
    the sympy ranges (BLOCK_MAP off); gradients too."""
    kernel, fn = examples["document"]
    shape = Shape(2, 2, 2, 77, 77, 16, 16)
    q, k, v, inputs = _inputs(kernel, shape, seed=8)
    bmap = fn.block_map(q, k, v, **inputs)
    runs = []
    for kw in (dict(block_map=bmap), dict(block_map=bmap), {}, dict(config={"BLOCK_MAP": False})):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves, **inputs, **kw)
        out.square().sum().backward()
        runs.append([out.detach()] + [t.grad for t in leaves])
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)
    for a, b in zip(runs[0], runs[2]):
        assert torch.equal(a, b)
    for a, b in zip(runs[0], runs[3]):
        assert (a - b).abs().max() < 1e-5


def test_map_that_does_not_fit_raises(examples):
    kernel, fn = examples["document"]
    q, k, v, inputs = _inputs(kernel, Shape(2, 2, 2, 40, 40, 16, 16), seed=9)
    bmap = fn.block_map(q, k, v, **inputs)
    with pytest.raises(ValueError, match=r"block_map sizes \(B differ\)"):
        fn(q[:1], k[:1], v[:1], inputs["doc_id"][:1], block_map=bmap)
    with pytest.raises(ValueError, match=r"block_map sizes \(H, q_len, kv_len differ\)"):
        fn(q[:, :1, :32], k[:, :1, :32], v[:, :1, :32], inputs["doc_id"][:, :32], block_map=bmap)
    with pytest.raises(ValueError, match="not multiples of the map's tile 32x32"):
        fn(q, k, v, **inputs, block_map=bmap, config=dict(BLOCK_M=16, BLOCK_N=32))
    with pytest.raises(ValueError, match="expected a BlockMap from document.block_map"):
        fn(q, k, v, **inputs, block_map=bmap.state)
    tree = examples["tree"][1]
    with pytest.raises(ValueError, match="expected a BlockMap from tree.block_map"):
        tree(q, k, v, torch.zeros(2, 40, 40, dtype=torch.bool, device=DEVICE), block_map=bmap)
    causal = examples["causal"][1]
    assert causal.block_map(q, k, v) is None
    with pytest.raises(ValueError, match="this spec's mask needs no block map"):
        causal(q, k, v, block_map=bmap)


def test_map_reads_h_when_the_mask_does(build_dir):
    src = "attention per_head { input keep: bool[h, kv_len]\n mask keep[h, kv_idx] and q_idx >= kv_idx }"
    kernel, fn = compile_spec(src, build_dir, tag="per_head")["per_head"]
    shape = Shape(2, 3, 1, 40, 40, 16, 16)
    q, k, v, inputs = make_inputs(kernel, shape, torch.float32, DEVICE, seed=10)
    bmap, state = _map(fn, q, k, v, inputs)
    assert bmap.state.shape[:2] == (1, 3), "the mask reads h but not b"
    assert torch.equal(state.int(), _states(kernel, shape, inputs, *bmap.fine))
    r = check(kernel, fn, shape, torch.float32, DEVICE, seed=10)
    assert r.ok, r.why


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_only_tensor_masks_get_a_map(path):
    """Index arithmetic (even `%`, which leaves blocks partial) builds nothing at run time."""
    for name, code in compile_source(path.read_text(), str(path)).items():
        assert ("_blockmap_kernel" in code) == (name in MAPPED + LAYOUTS), name
        assert ("BLOCK_MAP" in code) == (name in MAPPED + LAYOUTS), name
        assert f"{name}.block_map = _block_map" in code


RUNS_SPEC = """
attention two_runs {
    input doc_id: int32[b, kv_len]
    input seg: int32[kv_len]
    mask doc_id[b, q_idx] == doc_id[b, kv_idx] and q_idx >= kv_idx and seg[kv_idx] == seg[q_idx]
}
attention doc_only { input doc_id: int32[b, kv_len]
    mask doc_id[b, kv_idx] == doc_id[b, q_idx] }
"""


def _ids(kind: str, B: int, S: int, seed: int) -> torch.Tensor:
    """Document ids: sorted runs, runs in shuffled order (grouped, not sorted), or scattered values."""
    g = torch.Generator().manual_seed(seed)
    sorted_ = torch.randint(0, 4, (B, S), generator=g).sort(-1).values
    if kind == "grouped":  # the same runs, ids permuted: spans overlap, pairs still grouped
        sorted_ = torch.randperm(4, generator=g)[sorted_]
    if kind == "scattered":
        sorted_ = torch.randint(0, 3, (B, S), generator=g)
    return sorted_.to(torch.int32).to(DEVICE)


@pytest.mark.parametrize("kind", ["sorted", "grouped", "scattered"])
@pytest.mark.parametrize("shape", [Shape(2, 2, 1, 77, 77, 16, 16), Shape(2, 2, 1, 97, 40, 16, 16),
                                   Shape(1, 2, 2, 40, 97, 16, 16)], ids=str)
def test_runs_decide_tiles_exactly(build_dir, kind, shape):
    """Masks with runs (analyze.Run): the map kernel decides tiles by the ids' spans and evaluates the rest;
    the map must equal the brute force for any ids (sorted, grouped out of order, scattered), with q_len past
    the ids' length (those rows read id 0), and with two runs and a sympy range beside them."""
    for name, (kernel, fn) in compile_spec(RUNS_SPEC, build_dir, tag="runs").items():
        q, k, v, inputs = make_inputs(kernel, shape, torch.float32, DEVICE, seed=11)
        inputs["doc_id"] = _ids(kind, shape.B, shape.Sk, seed=shape.Sq)
        if "seg" in inputs:
            inputs["seg"] = _ids("sorted", 1, shape.Sk, seed=3)[0] // 2
        bmap, state = _map(fn, q, k, v, inputs, dict(BLOCK_M=16, BLOCK_N=16))
        want = _states(kernel, shape, inputs, *bmap.fine)
        assert torch.equal(state.int(), want), f"{name} {kind}"
        if kind == "sorted" and name == "doc_only" and shape.Sk > 64:
            assert (want == 2).any() and (want == 1).any() and (want == 0).any(), "every kind of tile occurs"
    r = check(kernel, fn, shape, torch.float32, DEVICE, seed=12, inputs=inputs, config=dict(BLOCK_M=16, BLOCK_N=16))
    assert r.ok, r.why


CELLS_SPEC = """
attention cells_only { sparse layout: bool[h] block 32 }
attention cells_causal {
    const rows: int = 48
    sparse layout: int8[b, h] block rows, 16
    mask q_idx >= kv_idx
}
attention cells_fine {
    input doc_id: int32[b, kv_len]
    sparse layout: uint8[] block 8, 24
    mask doc_id[b, q_idx] == doc_id[b, kv_idx]
}
"""


@pytest.mark.parametrize("shape", [Shape(2, 2, 1, 77, 77, 16, 16), Shape(1, 2, 2, 40, 97, 16, 16),
                                   Shape(1, 3, 3, 97, 40, 16, 16)], ids=str)
def test_cells_decide_tiles_exactly(build_dir, monkeypatch, shape):
    """Sparse layouts (analyze.Cells): a fine tile inside one cell is decided by that cell (zero: empty; else the
    rest of the mask's ranges), a tile across cells by the mask. The map must equal the brute force for cells
    larger than the 16 x 16 tile (48 x 16, 32 x 32), smaller (8 x 24, beside a document run), lengths that no cell
    divides, q_len != kv_len and nonzero integer cells other than 1, with 8 column tiles a map program (one program
    a row here) and with 3; then the kernels against the interpreter."""
    for name, (kernel, fn) in compile_spec(CELLS_SPEC, build_dir, tag="cells").items():
        q, k, v, inputs = make_inputs(kernel, shape, torch.float32, DEVICE, seed=13)
        g = torch.Generator().manual_seed(shape.Sq)
        lay = inputs["layout"]
        inputs["layout"] = ((torch.rand(lay.shape, generator=g) < 0.5) * (1 if lay.dtype == torch.bool else 3)
                            ).to(lay.dtype).to(DEVICE)
        if "doc_id" in inputs:
            inputs["doc_id"] = _ids("sorted", shape.B, shape.Sk, seed=5)
        bmap, state = _map(fn, q, k, v, inputs, dict(BLOCK_M=16, BLOCK_N=16))
        want = _states(kernel, shape, inputs, *bmap.fine)
        assert torch.equal(state.int(), want), name
        mod = sys.modules[fn.__module__]  # 3 column tiles a map program: several programs a row, the last one short
        monkeypatch.setattr(mod, "_MAP_TILES", 3)
        assert torch.equal(_map(fn, q, k, v, inputs, dict(BLOCK_M=16, BLOCK_N=16))[1].int(), want), f"{name} by 3"
        monkeypatch.undo()
        if name == "cells_only":  # 32 x 32 cells: tiles inside both lengths are empty or full
            assert set(want[..., :shape.Sq // 16, :shape.Sk // 16].unique().tolist()) == {0, 2}, name
        r = check(kernel, fn, shape, torch.float32, DEVICE, seed=14, inputs=inputs,
                  config=dict(BLOCK_M=16, BLOCK_N=16))
        assert r.ok, f"{name}: {r.why}"
