"""Serving layouts (paged, ragged): every example compiled for each, decode shapes, split-KV, MLA,
the cache-append kernel, and bad calls. Kernels run under the Triton interpreter without a GPU;
each result is checked against the interpreter with the fp64-calibrated tolerance."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import DEVICE, EXAMPLES, StandInJit

from attngen.verify import ServeShape, check_serving, compiled

# lengths with a page size that divides nothing, an empty sequence, a single cached token,
# and a query longer than its cache (positions before 0 see nothing)
MIXED = ServeShape(4, 2, (3, 1, 0, 2), (37, 1, 0, 1), 32, 32)
DECODE = ServeShape(8, 2, (1, 1, 1), (45, 1, 23), 32, 32)


@pytest.fixture(scope="module")
def serving_examples(tmp_path_factory) -> dict:
    out = {}
    for layout in ("paged", "ragged"):
        d = tmp_path_factory.mktemp(layout)
        for p in EXAMPLES:
            out[(p.stem, layout)] = compiled(p, d, layout=layout)
    return out


@pytest.mark.parametrize("layout", ["paged", "ragged"])
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_on_serving_layouts(serving_examples, path, layout):
    for i, (kernel, fn) in enumerate(serving_examples[(path.stem, layout)]):
        name = kernel.name
        page = (1, 5, 16)[(len(name) + i) % 3]
        shape = ServeShape(MIXED.Hq, MIXED.Hkv, MIXED.q_lens, MIXED.kv_lens, 32, 32, page)
        config = ({"SPLITS": 1}, {"SPLITS": 2}, {"SPLITS": 3}, {"PROGRAMS": 2}, {"PROGRAMS": 6})[(len(name) + i) % 5]
        r = check_serving(kernel, fn, shape, torch.float32, DEVICE, seed=len(name), config=config)
        assert r.ok, f"{name} {layout} page {page}: {r.why} {r.errors}"


SPEC = """
attention sw { layout paged  param window: int = 8  mask q_idx >= kv_idx and q_idx - kv_idx < window }
attention per_head { layout ragged  mask q_idx >= kv_idx and (h % 2 == 0 or kv_idx % 2 == 0) }
attention mla { layout paged  heads kv = 1  scale 0.0721687836  mask q_idx >= kv_idx }
attention mla_packed { layout ragged  heads kv = 1  scale 0.0721687836  mask q_idx >= kv_idx }
attention capped { layout ragged  score 5.0 * tanh(score / 5.0)  mask q_idx >= kv_idx }
"""


@pytest.fixture(scope="module")
def specs(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("serving")
    (d / "s.attn").write_text(SPEC)
    return {k.name: (k, fn) for k, fn in compiled(d / "s.attn", d)}


@pytest.mark.parametrize("split", [{"SPLITS": 1}, {"SPLITS": 3}, {"SPLITS": 12}, {"PROGRAMS": 3}, {"PROGRAMS": 40}],
                         ids=str)
@pytest.mark.parametrize("q_len", [1, 4, 16])
def test_decode_gqa_packed_and_split(specs, split, q_len):
    """q_len 1..16 per sequence, 4 query heads per KV head in one tile, with and without split-KV; up to
    MERGE_MAX splits merge in the tile's last split, more (12, some of them empty) in the combine kernel.
    Stream-K: each column's (kv head's) tiles cut into equal shares of key blocks that cross tiles, merged
    by a tile's last program; 40 programs leave some with no work."""
    mod = __import__(specs["sw"][1].__module__, fromlist=["MERGE_MAX"])
    assert 3 <= mod.MERGE_MAX < 12
    kernel, fn = specs["sw"]
    shape = ServeShape(8, 2, (q_len,) * 3, (45, q_len, 23), 32, 32, page=8)
    r = check_serving(kernel, fn, shape, torch.float32, DEVICE, seed=q_len, config={**split, "BLOCK_N": 16})
    assert r.ok, r.why


@pytest.mark.parametrize("programs", [1, 2, 3, 5, 40])
def test_stream_k_tiles_without_keys(specs, programs):
    """Stream-K: tiles with queries but no keys do no work, yet their rows must be written (0, LSE -inf) by
    exactly one program, also where they sit on a share's boundary: first, last, and between two shares."""
    kernel, fn = specs["sw"]
    shape = ServeShape(8, 2, (2, 1, 3, 1, 2), (0, 30, 0, 17, 0), 32, 32, page=8)
    r = check_serving(kernel, fn, shape, torch.float32, DEVICE, seed=programs,
                      config={"PROGRAMS": 2 * programs, "BLOCK_N": 16})
    assert r.ok, r.why


def _checked(fn, *args, **kw):
    """fn(*args, **kw) as a first call: checked, planned and launched through the JIT, and not remembered."""
    mod = sys.modules[fn.__module__]
    plans, mod._PLANS = mod._PLANS, {}
    try:
        return fn(*args, **kw)
    finally:
        mod._PLANS = plans


def test_checked_calls_are_remembered(specs):
    """A call whose arguments have the metadata of a checked one (shapes, strides, dtypes, devices, params)
    skips the checks and the planning. Its results equal an unremembered call's (_checked) for new values;
    other strides, another param value or another config get their own plan (a config by value); a call that
    must fail still fails."""
    _, fn = specs["sw"]
    mod = sys.modules[fn.__module__]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    B, H, Hkv, D, page, n_pages = 3, 8, 2, 32, 8, 12
    pool = torch.randn(B * n_pages, page, Hkv, 2 * D, device=DEVICE, generator=g)
    kc, vc = pool[..., :D], pool[..., D:]  # views with strides of 2 D
    table = torch.randperm(B * n_pages, device=DEVICE, generator=g).view(B, n_pages).int()
    lens = torch.tensor([5, 90, 33], dtype=torch.int32, device=DEVICE)
    mod._PLANS.clear()
    for _ in range(3):
        q = torch.randn(B, 1, H, D, device=DEVICE, generator=g)
        assert torch.equal(fn(q, kc, vc, table, lens, window=8), _checked(fn, q, kc, vc, table, lens, window=8))
    assert len(mod._PLANS) == 1
    kc2, vc2 = kc.contiguous(), vc.contiguous()
    assert torch.equal(fn(q, kc2, vc2, table, lens, window=8), _checked(fn, q, kc2, vc2, table, lens, window=8))
    assert torch.equal(fn(q, kc, vc, table, lens, window=5), _checked(fn, q, kc, vc, table, lens, window=5))
    assert len(mod._PLANS) == 3
    # Triton specializes pointers on 16-byte alignment: a misaligned view gets its own plan
    qm = torch.randn(q.numel() + 1, device=DEVICE, generator=g)[1:].view(q.shape)
    assert torch.equal(fn(qm, kc, vc, table, lens, window=8), _checked(fn, qm, kc, vc, table, lens, window=8))
    assert len(mod._PLANS) == 4
    # a config is remembered by value: the same dict again takes its plan, the dict changed in place a new one
    cfg = {"SPLITS": 2}
    for _ in range(2):
        assert torch.equal(fn(q, kc, vc, table, lens, window=8, config=cfg),
                           _checked(fn, q, kc, vc, table, lens, window=8, config=cfg))
    assert len(mod._PLANS) == 5
    cfg["SPLITS"] = 3
    assert torch.equal(fn(q, kc, vc, table, lens, window=8, config=cfg),
                       _checked(fn, q, kc, vc, table, lens, window=8, config=cfg))
    assert len(mod._PLANS) == 6
    with pytest.raises(ValueError, match=r"config\['SPLITS'\]"):  # a bad config is checked every time
        for _ in range(2):
            fn(q, kc, vc, table, lens, window=8, config={"SPLITS": 0})
    assert len(mod._PLANS) == 6
    with pytest.raises(ValueError, match="inference"):
        fn(q.clone().requires_grad_(), kc, vc, table, lens, window=8)
    with pytest.raises(ValueError, match="kv_lens"):
        fn(q, kc, vc, table, lens[:2], window=8)
    with pytest.raises(ValueError, match="window"):
        fn(q, kc, vc, table, lens, window=8.5)
    # a 0-d tensor for a value (its value is read on the host): never remembered
    for sc in (0.1, 0.3):
        t = torch.tensor(sc)
        assert torch.equal(fn(q, kc, vc, table, lens, window=8, scale=t),
                           _checked(fn, q, kc, vc, table, lens, window=8, scale=sc))
    # ragged: remembered only when the longest lengths are given (else they are read from the device)
    _, rag = specs["capped"]
    plans = sys.modules[rag.__module__]._PLANS
    cu_q = torch.tensor([0, 1, 3], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 40, 47], dtype=torch.int32, device=DEVICE)
    qr = torch.randn(3, 4, 16, device=DEVICE, generator=g)
    kr = torch.randn(47, 4, 16, device=DEVICE, generator=g)
    before = len(plans)
    rag(qr, kr, kr, cu_q, cu_k)
    assert len(plans) == before
    for _ in range(2):
        got = rag(qr, kr, kr, cu_q, cu_k, max_seqlen_q=2, max_seqlen_k=40)
    assert torch.equal(got, _checked(rag, qr, kr, kr, cu_q, cu_k))
    assert len(plans) == before + 1


def test_remembered_calls_launch_the_compiled_variant(specs, monkeypatch):
    """After a remembered plan's first launch (through the JIT), its calls launch the compiled variant
    directly, with the same arguments: results equal a JIT-launched call's (_checked) for new values."""
    _, fn = specs["sw"]
    mod = sys.modules[fn.__module__]
    jit = StandInJit(mod.sw_serve_kernel)
    monkeypatch.setattr(mod, "sw_serve_kernel", jit)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(mod, "_PLANS", {})  # plans holding the stand-ins end with the test
    g = torch.Generator(device=DEVICE).manual_seed(3)
    B, H, Hkv, D, page = 3, 8, 2, 32, 8
    kc, vc = (torch.randn(B * 6, page, Hkv, D, device=DEVICE, generator=g) for _ in range(2))
    table = torch.randperm(B * 6, device=DEVICE, generator=g).view(B, 6).int()
    lens = torch.tensor([7, 41, 20], dtype=torch.int32, device=DEVICE)
    for i in range(3):
        q = torch.randn(B, 2, H, D, device=DEVICE, generator=g)
        got = fn(q, kc, vc, table, lens, window=9)
        assert jit.direct == i
        assert torch.equal(got, _checked(fn, q, kc, vc, table, lens, window=9))
    assert not torch.equal(got, fn(q, kc, vc, table, lens, window=5))  # the params reach the kernel
    # stream-K (a one-dimensional grid) on a ragged batch, as on a GPU with 16 SMs (32 programs)
    _, rag = specs["capped"]
    rmod = sys.modules[rag.__module__]
    jit = StandInJit(rmod.capped_serve_kernel)
    monkeypatch.setattr(rmod, "capped_serve_kernel", jit)
    monkeypatch.setattr(rmod, "_sms", lambda device: 16)
    monkeypatch.setattr(rmod, "_PLANS", {})
    cu_q = torch.tensor([0, 1, 3], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 40, 47], dtype=torch.int32, device=DEVICE)
    kr = torch.randn(47, 4, 16, device=DEVICE, generator=g)
    for i in range(2):
        qr = torch.randn(3, 4, 16, device=DEVICE, generator=g)
        got = rag(qr, kr, kr, cu_q, cu_k, max_seqlen_q=2, max_seqlen_k=40)
        assert jit.direct == i and jit.grids[0] == (32,)  # two programs per SM
        assert torch.equal(got, rag(qr, kr, kr, cu_q, cu_k, config={"PROGRAMS": 32}))


def test_mask_reading_h_gets_one_head_per_tile(specs):
    kernel, fn = specs["per_head"]
    mod = __import__(fn.__module__, fromlist=["PACK_HEADS"])
    assert mod.PACK_HEADS is False
    for config in ({"SPLITS": 2}, {"PROGRAMS": 12}):  # stream-K's columns: one per query head here
        r = check_serving(kernel, fn, ServeShape(4, 2, (5, 2), (9, 30), 16, 16), torch.float32, DEVICE, seed=3,
                          config=config)
        assert r.ok, (config, r.why)


def test_sliding_window_reads_no_page_before_the_window(specs):
    """Pages wholly before the first visited key block are pointed at a page of NaN: still exact."""
    kernel, fn = specs["sw"]
    shape = ServeShape(4, 2, (1, 2), (64, 50), 32, 32, page=4)
    window, bn = 8, 16
    first = tuple((kv - q - window + 1) // bn * bn for q, kv in zip(shape.q_lens, shape.kv_lens))
    r = check_serving(kernel, fn, shape, torch.float32, DEVICE, seed=5, config={"BLOCK_N": bn, "SPLITS": 2},
                      poison_before=first)
    assert r.ok, r.why


def test_mla_decode_values_inside_keys(specs):
    """DeepSeek MLA, absorbed: one latent KV head of 512 + 64 rope dims, values = the first 512."""
    kernel, fn = specs["mla"]
    shape = ServeShape(16, 1, (1, 2), (40, 17), 576, 512, page=16)
    for config in ({"SPLITS": 2}, {"PROGRAMS": 3}):
        r = check_serving(kernel, fn, shape, torch.float16, DEVICE, seed=7, values_in_keys=True, config=config)
        assert r.ok, (config, r.why)


def test_mla_values_inside_packed_keys(specs):
    """Ragged MLA with v = k[..., :512], a view: the kernel reads the values from the key tile (V_IN_K)."""
    kernel, fn = specs["mla_packed"]
    shape = ServeShape(16, 1, (1, 3), (40, 17), 576, 512)
    for config in (None, {"SPLITS": 2}):
        r = check_serving(kernel, fn, shape, torch.float16, DEVICE, seed=8, values_in_keys=True, config=config)
        assert r.ok, (config, r.why)


def test_plans_tell_values_inside_keys_apart(specs):
    """A remembered plan that reads the values from the keys (v a view of k) must not serve a later call
    whose separate values have the same shapes and strides: that call gets the values it passed."""
    from attngen.verify import serving_case

    kernel, fn = specs["mla"]
    shape = ServeShape(16, 1, (1, 1), (33, 20), 576, 512, page=16).fit(kernel)
    (q, kc, vc, table, lens), kw, _ = serving_case(kernel, shape, torch.float16, DEVICE, 9, values_in_keys=True)
    assert vc.data_ptr() == kc.data_ptr()
    kw["max_seqlen_q"] = 1  # a key for the plan: the second call may reuse it
    fn(q, kc, vc, table, lens, **kw)  # remembered, with the values inside the keys
    other = torch.randn(kc.shape, generator=torch.Generator().manual_seed(3)).to(kc)
    v2 = other[..., :512]  # same metadata as vc, other memory
    got = fn(q, kc, v2, table, lens, **kw)
    want = fn(q, kc, v2.contiguous(), table, lens, **kw)  # other strides: a plan of its own
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_fast_tanh_score_on_ragged(specs):
    kernel, fn = specs["capped"]
    r = check_serving(kernel, fn, ServeShape(2, 1, (6, 0, 3), (6, 4, 20), 32, 16), torch.float16, DEVICE, seed=2)
    assert r.ok, r.why


def test_uniform_queries_as_4d(specs):
    """[B, S_q, H, D] queries give the same numbers as the packed form."""
    kernel, fn = specs["sw"]
    from attngen.verify import serving_case

    args, kw, _ = serving_case(kernel, ServeShape(4, 2, (2, 2), (20, 9), 32, 32, 4), torch.float32, DEVICE, 1)
    q, *rest = args
    packed = fn(q, *rest, **kw)
    four = fn(q.view(2, 2, 4, 32), *rest)
    torch.testing.assert_close(four.view_as(packed), packed, rtol=0, atol=0)


def test_append_and_decode_loop(specs):
    """Prefill 2 sequences, then decode 3 tokens one at a time through PagedKVCache: the output of
    every step equals attention over the whole history computed by the interpreter."""
    from attngen import interpret
    from attngen.kvcache import PagedKVCache, append_kv, append_kv_reference

    kernel, fn = specs["sw"]
    g = torch.Generator().manual_seed(11)
    H, Hkv, D = 4, 2, 16
    cache = PagedKVCache(2, 40, Hkv, D, page_size=3, dtype=torch.float32, device=DEVICE)
    hist_k, hist_v = [[], []], [[], []]
    for step, n in enumerate([[7, 12], [1, 1], [1, 1], [1, 1]]):
        k_new = torch.randn(sum(n), Hkv, D, generator=g).to(DEVICE)
        v_new = torch.randn(sum(n), Hkv, D, generator=g).to(DEVICE)
        q = torch.randn(sum(n), H, D, generator=g).to(DEVICE)
        cache.append(k_new, v_new, lengths=n)
        for b, (lo, hi) in enumerate([(0, n[0]), (n[0], sum(n))]):
            hist_k[b].append(k_new[lo:hi])
            hist_v[b].append(v_new[lo:hi])
        cu_q = torch.tensor([0, n[0], sum(n)], dtype=torch.int32, device=DEVICE)
        out = fn(q, cache.k_pages, cache.v_pages, cache.block_table, cache.kv_lens, cu_seqlens_q=cu_q,
                 window=5)
        ks, vs = [torch.cat(h) for h in hist_k], [torch.cat(h) for h in hist_v]
        cu_k = torch.tensor([0, len(ks[0]), len(ks[0]) + len(ks[1])], dtype=torch.int32)
        from attngen.lower import relayout
        ref = interpret(relayout(kernel, "ragged"), q.double(), torch.cat(ks).double(), torch.cat(vs).double(),
                        cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, window=5)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5, msg=f"step {step}")
    # the Triton append kernel against the PyTorch reference, on a fresh pool
    pages = torch.randn(6, 3, Hkv, D, generator=g)
    table = torch.tensor([[4, 1, 0], [2, 5, 3]], dtype=torch.int32)
    lens = torch.tensor([2, 4], dtype=torch.int32)
    new = torch.randn(5, Hkv, D, generator=g)
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    a, b = pages.clone().to(DEVICE), pages.clone()
    append_kv(a, None, table.to(DEVICE), lens.to(DEVICE), new.to(DEVICE), None, cu.to(DEVICE))
    append_kv_reference(b, None, table, lens, new, None, cu)
    assert torch.equal(a.cpu(), b) and not torch.equal(a.cpu(), pages)


def test_interpreter_serving_matches_per_sequence_sdpa(specs):
    """The oracle itself, against an independent reference: SDPA per sequence with a bottom-right
    aligned sliding-window mask built by hand."""
    from attngen import interpret
    from attngen.lower import relayout

    kernel = relayout(specs["sw"][0], "ragged")
    g = torch.Generator().manual_seed(4)
    q_lens, kv_lens, H, Hkv, D, window = [3, 1, 5], [10, 1, 5], 4, 2, 16, 4
    q = torch.randn(sum(q_lens), H, D, generator=g, dtype=torch.float64)
    k = torch.randn(sum(kv_lens), Hkv, D, generator=g, dtype=torch.float64)
    v = torch.randn(sum(kv_lens), Hkv, D, generator=g, dtype=torch.float64)
    cu = lambda n: torch.tensor([0, *n]).cumsum(0).int()  # noqa: E731
    out = interpret(kernel, q, k, v, cu_seqlens_q=cu(q_lens), cu_seqlens_k=cu(kv_lens), window=window)
    rows = []
    for b in range(3):
        qb = q[cu(q_lens)[b]:cu(q_lens)[b + 1]].transpose(0, 1)
        kb, vb = (t[cu(kv_lens)[b]:cu(kv_lens)[b + 1]].transpose(0, 1).repeat_interleave(2, 0) for t in (k, v))
        pos = torch.arange(q_lens[b]).view(-1, 1) + kv_lens[b] - q_lens[b]
        kv = torch.arange(kv_lens[b]).view(1, -1)
        mask = (pos >= kv) & (pos - kv < window)
        rows.append(torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask).transpose(0, 1))
    torch.testing.assert_close(out, torch.cat(rows))


def test_bad_calls_name_the_problem(specs):
    kernel, fn = specs["sw"]
    q = torch.randn(2, 1, 4, 32, device=DEVICE)
    kc = torch.randn(4, 4, 2, 32, device=DEVICE)
    table = torch.zeros(2, 2, dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([3, 4], dtype=torch.int32, device=DEVICE)
    cases = [((q, kc, kc, table.long(), lens), "block_table"),
             ((q, kc, kc, table, lens[:1]), "kv_lens"),
             ((q, kc, kc.half(), table, lens), "v.dtype"),
             ((q.clone().requires_grad_(), kc, kc, table, lens), "inference")]
    for args, what in cases:
        with pytest.raises(ValueError, match=what):
            fn(*args)
    for config, what in (({"SPLIT": 2}, r"config\['SPLIT'\]: expected one of BLOCK_M, .*SPLITS, PROGRAMS, got"),
                         ({"SPLITS": 0}, r"config\['SPLITS'\]: expected an int >= 1, got 0"),
                         ({"PROGRAMS": 0}, r"config\['PROGRAMS'\]: expected an int >= 1, got 0"),
                         ({"PROGRAMS": 4, "SPLITS": 2},
                          r"config: expected SPLITS \(split-KV\) or PROGRAMS \(stream-K\), not both, got SPLITS=2"),
                         ({"HP": 3}, r"config\['HP'\]: expected a power of two from 1 to 64, got 3"),
                         ({"fwd": {"BLOCK_N": 16}}, r"config\['fwd'\]: expected one of")):
        with pytest.raises(ValueError, match=what):
            fn(q, kc, kc, table, lens, config=config)
    from attngen.kvcache import PagedKVCache

    with pytest.raises(ValueError, match="page_size"):
        PagedKVCache(1, 8, 1, 16, page_size=512, device=DEVICE)
    cache = PagedKVCache(1, 8, 1, 16, page_size=4, dtype=torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match="exceed max_len"):
        cache.append(torch.randn(1, 9, 1, 16, device=DEVICE), torch.randn(1, 9, 1, 16, device=DEVICE))


@pytest.mark.parametrize("path", sorted((EXAMPLES[0].parent / "serving").glob("*.attn")), ids=lambda p: p.stem)
def test_serving_examples(tmp_path, path):
    from attngen.verify import CPU_SERVE

    for kernel, fn in compiled(path, tmp_path):
        for i, shape in enumerate(CPU_SERVE):
            r = check_serving(kernel, fn, shape, torch.float16, DEVICE, seed=i, config={"SPLITS": 1 + i})
            assert r.ok, f"{kernel.name} {shape}: {r.why}"
