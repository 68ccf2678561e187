"""The Gluon Hopper kernels' host side (forward and its cut last round, dK/dV, dQ): when they run, what config
says, what they are passed, and how tune treats them. The kernels themselves need an H100 (benchmarks/gpu_check.py
checks them there against the interpreter); their sm_90 builds are checked in test_codegen."""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import compile_spec

import attngen


def _mod(examples, name: str):
    return sys.modules[examples[name][1].__module__]


def _qkv(dtype=torch.bfloat16, d_qk: int = 64, d_v: int = 64):
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 64, d_qk, generator=g).to(dtype) for _ in range(2))
    v = torch.randn(1, 2, 64, d_v, generator=g).to(dtype)
    return q, k, v, torch.empty(1, 2, 64, d_v, dtype=dtype)


@pytest.fixture
def hopper(examples, monkeypatch):
    """Pretend q lives on an H100 (the other conditions are checked for real)."""
    for name in ("causal", "sliding_window", "sink_window", "alibi"):
        monkeypatch.setattr(_mod(examples, name), "_major", lambda t: 9)


def test_sm90_runs_where_it_can_and_says_why_not(examples, hopper):
    mod = _mod(examples, "causal")
    if not mod._GLUON:
        pytest.skip("this Triton has no Gluon")
    q, k, v, out = _qkv()
    assert mod._sm90(q, k, v, out, None, None)
    assert mod._sm90(*_qkv(torch.float16, 128, 128), {"fwd": {"GLUON": True}}, None)
    # kept on the Triton forward: asked to, the Triton forward's own launch keys, a trace
    for config, trace in (({"GLUON": False}, None), ({"fwd": {"GLUON": False}}, None), ({"BLOCK_M": 64}, None),
                          ({"fwd": {"num_warps": 4}}, None), (None, {"fwd": object()})):
        assert not mod._sm90(q, k, v, out, config, trace)
    # cannot run: False by default, and a ValueError naming the reason when GLUON=True insists
    cases = [(_qkv(torch.float32), "float16 or bfloat16"), (_qkv(d_qk=64, d_v=128), "head dims"),
             (_qkv(d_qk=96, d_v=96), "head dims"),
             ((q.transpose(2, 3).contiguous().transpose(2, 3), k, v, out), "16-byte aligned"),
             ((q, k[:, :1].expand(k.shape), v, out), "broadcast")]  # heads from expand: stride 0
    for args, why in cases:
        assert not mod._sm90(*args, None, None)
        with pytest.raises(ValueError, match=why):
            mod._sm90(*args, {"GLUON": True}, None)


def test_sm90_needs_hopper(examples):
    mod = _mod(examples, "causal")
    q, k, v, out = _qkv()  # on the CPU (or a non-Hopper GPU in a GPU run)
    if mod._major(q) != 9:
        assert not mod._sm90(q, k, v, out, None, None)
        with pytest.raises(ValueError, match="compute capability 9"):
            examples["causal"][1](q, k, v, config={"GLUON": True})


def test_banded_masks_keep_the_triton_forward_unless_asked(examples, hopper):
    mod = _mod(examples, "sliding_window")
    if not mod._GLUON:
        pytest.skip("this Triton has no Gluon")
    assert mod.BANDED
    assert not mod._sm90(*_qkv(), None, None)
    assert mod._sm90(*_qkv(), {"GLUON": True}, None)


def test_gluon_keys(examples):
    """GLUON is a key of the kernels that have a Gluon version: the forward, and dQ and dK/dV where the module
    has them."""
    fn = examples["causal"][1]
    q, k, v, _ = _qkv(torch.float32)
    with pytest.raises(ValueError, match="GLUON"):
        fn(q, k, v, config={"GLUON": 1})
    for good in ({"GLUON": False}, {"fwd": {"GLUON": False}}, {"bwd": {"GLUON": False}}, {"dkdv": {"GLUON": False}},
                 {"dq": {"GLUON": False}}):
        fn(q, k, v, config=good)
    # relative bias reads both positions in one term (no split logit): no Gluon dK/dV kernel (codegen's sm90_bwd),
    # so no such key either
    rel = examples["relative_bias"][1]
    assert not hasattr(_mod(examples, "relative_bias"), "relative_bias_bwd_dkdv_sm90_kernel")
    with pytest.raises(ValueError, match="GLUON"):
        rel(q, k, v, torch.rand(2, 65), config={"dkdv": {"GLUON": False}})


def _bwd_tensors(dtype=torch.bfloat16, d: int = 64, sq: int = 64):
    q, k, v, out = _qkv(dtype, d, d)
    q = q[:, :, :sq]
    return q, k, v, out[:, :, :sq], torch.empty_like(k), torch.empty_like(v)


def test_sm90_dkdv_rules(examples, hopper):
    mod = _mod(examples, "causal")
    if not mod._GLUON:
        pytest.skip("this Triton has no Gluon")
    ts = _bwd_tensors()
    assert mod._sm90_dkdv(*ts, None, False)
    assert mod._sm90_dkdv(*_bwd_tensors(torch.float16, 128), {"dkdv": {"GLUON": True}}, False)
    assert mod._sm90_dkdv(*ts, {"fwd": {"GLUON": False}}, False)  # the forward's key only
    for config, trace in (({"GLUON": False}, False), ({"bwd": {"GLUON": False}}, False),
                          ({"dkdv": {"GLUON": False}}, False), ({"dkdv": {"BLOCK_N": 64}}, False),
                          ({"bwd": {"num_warps": 4}}, False), ({"num_stages": 2}, False), (None, True)):
        assert not mod._sm90_dkdv(*ts, config, trace)
    assert not mod._sm90_dkdv(*_bwd_tensors(sq=0), {"GLUON": True}, False)  # no queries: the Triton kernel's zeros
    with pytest.raises(ValueError, match="dK/dV kernel needs float16 or bfloat16"):
        mod._sm90_dkdv(*_bwd_tensors(torch.float32), {"dkdv": {"GLUON": True}}, False)
    q, k, v, dout, dk, dv = ts
    with pytest.raises(ValueError, match="16-byte aligned"):
        mod._sm90_dkdv(q, k, v, dout.transpose(2, 3).contiguous().transpose(2, 3), dk, dv, {"GLUON": True}, False)
    sw = _mod(examples, "sliding_window")
    assert sw.BANDED and not sw._sm90_dkdv(*ts, None, False) and sw._sm90_dkdv(*ts, {"GLUON": True}, False)


def test_long_bands_take_the_gluon_dkdv(examples, hopper, build_dir):
    """A banded mask keeps the Triton dK/dV unless its keys see 512 queries or more on average (_long_band):
    a window of 1024 at S=2048 and chunks of 2048 at S=8192 take the Gluon one, a window of 256 and chunks of 256
    do not; config and the trace hook still decide first. Sink tokens beside a window (two ranges) count the union
    of both (_covered, an overlap once): with a window of 1024 they take it, with 256 they do not. The chunks also
    check _long_rows (the forward's rule) both ways."""
    sw = _mod(examples, "sliding_window")
    if not sw._GLUON:
        pytest.skip("this Triton has no Gluon")
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, 2, 2048, 64, generator=g).to(torch.bfloat16) for _ in range(4))
    ts = (q, k, v, do, torch.empty_like(k), torch.empty_like(v))
    assert sw._sm90_dkdv(*ts, None, False, {"window": 1024})
    assert not sw._sm90_dkdv(*ts, None, False, {"window": 256})
    assert not sw._sm90_dkdv(*_bwd_tensors(), None, False, {"window": 1024})  # 64 queries
    assert not sw._sm90_dkdv(*ts, None, False)  # no params: the Triton kernel, as before
    for config, trace in (({"dkdv": {"GLUON": False}}, False), ({"dkdv": {"BLOCK_N": 64}}, False), (None, True)):
        assert not sw._sm90_dkdv(*ts, config, trace, {"window": 1024})
    sink = _mod(examples, "sink_window")
    assert sink.BANDED and sink._sm90_dkdv(*ts, None, False, {"window": 1024})
    assert not sink._sm90_dkdv(*ts, None, False, {"window": 256})
    # keys 0-3 see every later query; the 16 sampled keys (from 32) see the window's queries only
    assert sink._queries_seen(8192, 8192, 256) == 256 and sink._keys_seen(8192, 8192, 1024) == 963.625
    assert [sink._covered(s) for s in (((0, 3), (2, 10)), ((0, 3), (5, 6)), ((0, -1), (4, 4)), ((2, 3), (0, 10)),
                                       ((5, 4),), ((0, 0), (0, 0)))] == [11, 6, 1, 11, 0, 1]
    for chunk, long in ((2048, True), (256, False)):
        src = f"attention chunk{chunk} {{ mask q_idx // {chunk} == kv_idx // {chunk} and q_idx >= kv_idx }}"
        mod = sys.modules[compile_spec(src, build_dir, tag=f"c{chunk}")[f"chunk{chunk}"][1].__module__]
        assert mod._long_band(8192, 8192, {}) is long and mod._long_rows(8192, 8192, {}) is long, chunk
    # the spec's params are locals of _long_band: one named like a loop counter must keep its value
    src = "attention win_i { param i: int = 1024\n mask q_idx >= kv_idx and q_idx - kv_idx < i }"
    mod = sys.modules[compile_spec(src, build_dir, tag="win_i")["win_i"][1].__module__]
    assert mod._long_band(2048, 2048, {"i": 1024}) and not mod._long_band(2048, 2048, {"i": 256})


def test_long_rows_take_the_gluon_forward_and_dq(examples, hopper):
    """A banded mask keeps the Triton forward and dQ unless its queries see 896 keys or more on average
    (_long_rows): a window of 1024 and chunks of 2048 at S=8192 take the persistent Gluon forward and the Gluon dQ,
    windows of 512 and 896 (whose first rows see fewer) and chunks of 256 do not; config, the trace hook and
    learnable inputs' gradients still decide first. Sink tokens beside a window (two ranges) count their union: 4
    sinks and a window of 1024 take them, of 768 not."""
    sw = _mod(examples, "sliding_window")
    if not sw._GLUON:
        pytest.skip("this Triton has no Gluon")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8192, 64, generator=g).to(torch.bfloat16) for _ in range(3))
    ts = (q, k, v, torch.empty_like(q))

    def both(*args, params=None):  # (forward, dQ)
        config, trace = args[-2:]
        return (sw._sm90(*args[:-2], config, trace, params),
                sw._sm90_dq(*args[:-2], q, torch.empty_like(q), config, bool(trace), False, params))
    assert both(*ts, None, None, params={"window": 1024}) == (True, True)
    assert not sw._sm90_dq(*ts, q, torch.empty_like(q), None, False, True, {"window": 1024})  # learnable grads
    for window in (512, 896):
        assert both(*ts, None, None, params={"window": window}) == (False, False)
    q64 = _qkv(torch.bfloat16, 64, 64)  # 64 queries, 64 keys
    assert sw._sm90(*q64, None, None, {"window": 1024}) is False
    assert both(*ts, None, None) == (False, False)  # no params: the Triton kernels, as before
    for config, trace in (({"GLUON": False}, None), ({"BLOCK_M": 64}, None), (None, {"fwd": None})):
        assert both(*ts, config, trace, params={"window": 1024}) == (False, False)
    assert both(*ts, {"fwd": {"GLUON": False}}, None, params={"window": 1024}) == (False, True)  # one's section
    sink = _mod(examples, "sink_window")
    for window, long in ((1024, True), (768, False)):  # chunks: test_long_bands_take_the_gluon_dkdv
        assert sink._sm90(*ts, None, None, {"window": window}) is long
        assert sink._sm90_dq(*ts, q, torch.empty_like(q), None, False, False, {"window": window}) is long


def test_sm90_dq_rules(examples, hopper):
    mod = _mod(examples, "causal")
    if not mod._GLUON:
        pytest.skip("this Triton has no Gluon")
    q, k, v, out = _qkv()
    ts = (q, k, v, out, torch.empty_like(out), torch.empty_like(q))
    assert mod._sm90_dq(*ts, None, False, False)
    assert not mod._sm90_dq(*ts, None, False, True)  # learnable inputs want gradients: the Triton kernel
    with pytest.raises(ValueError, match="learnable-input gradients"):
        mod._sm90_dq(*ts, {"dq": {"GLUON": True}}, False, True)
    for config, trace in (({"GLUON": False}, False), ({"bwd": {"GLUON": False}}, False),
                          ({"dq": {"GLUON": False}}, False), ({"dq": {"TMA": True}}, False),
                          ({"bwd": {"BLOCK_M": 64}}, False), (None, True)):
        assert not mod._sm90_dq(*ts, config, trace, False)
    assert mod._sm90_dq(*ts, {"dkdv": {"GLUON": False}}, False, False)  # dK/dV's key only
    with pytest.raises(ValueError, match="dQ kernel needs float16 or bfloat16"):
        mod._sm90_dq(*(t.float() for t in ts), {"dq": {"GLUON": True}}, False, False)


def _fake_gluon(mod, name: str, kernel: str, launched: list):
    """Stand-in for a Gluon kernel's launch ("fwd", "dkdv" or "dq") on a machine without a Hopper: its Triton twin
    computes it. The Gluon backward kernels' Mrow already holds m + log2(l) and they never read Lrow, so Lrow goes
    in as zeros; and the interpreter has no tensor descriptors."""
    twin = {"fwd": "fwd_kernel", "dkdv": "bwd_dkdv_kernel", "dq": "bwd_dq_kernel"}[kernel]
    lrow = {"dkdv": 5, "dq": 7}.get(kernel)

    class Launcher:
        def __getitem__(self, grid):
            def launch(*args, STAGES, REGS, BH=None, nb=None, TAIL=0, CUT=False, **kw):  # noqa: N803 - the kernel's names
                launched.append((grid, kw["BLOCK_M"], kw["BLOCK_N"]))
                if BH is not None:  # the forward's part buffer, after its twin's arguments
                    part, args = args[-1], args[:-1]
                    if TAIL:
                        _fake_pieces(mod, args, part, grid[0], nb, TAIL, kw["BLOCK_M"], kw["BLOCK_N"])
                # the Gluon backward's host-side TMA descriptors: checked against the tensors, then dropped
                descs = [a for a in args if type(a).__name__ == "TensorDescriptor"]
                _check_descs(kernel, descs, args, kw)
                args = tuple(a for a in args if type(a).__name__ != "TensorDescriptor")
                twin_grid = grid
                if BH is not None:  # the persistent forward's P programs: its twin takes a program per tile
                    twin_grid = (-(-args[0].shape[2] // kw["BLOCK_M"]), BH)
                if lrow is not None:
                    args = (*args[:lrow], torch.zeros_like(args[lrow]), *args[lrow + 1:])
                if "TMA" in kw:
                    kw["TMA"] = False
                return getattr(mod, f"{name}_{twin}")[twin_grid](*args, **kw)
            return launch
    return Launcher()


def _items(mod, n: int, P: int, nb: int, PT: int) -> list[list[tuple]]:
    """Each of P programs' items (tile, t0, t1, slot), as the Gluon forward's partitions walk them (_fwd90_items,
    _fwd90_item), from a Triton kernel that calls the module's own helpers."""
    walk = _walker(mod, "pieces", _PIECES)
    most = n // P + 3
    out = torch.full((P, most, 4), -9, dtype=torch.int32)
    walk[(P,)](out, n, P, nb, PT, most, PT > 0)
    return [[tuple(r) for r in prog.tolist() if r[0] != -9] for prog in out]


def _walker(mod, name: str, source: str):
    """A test kernel that imports the generated module's helpers (`source`, formatted with the module's name)."""
    d = Path(tempfile.mkdtemp())
    (d / f"{name}_{mod.__name__}.py").write_text(source.format(module=mod.__name__))
    sys.path[:0] = [str(d), str(Path(mod.__file__).parent)]
    try:
        spec = importlib.util.spec_from_file_location(f"{name}_{mod.__name__}", d / f"{name}_{mod.__name__}.py")
        m = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(m)
    finally:
        del sys.path[:2]
    return getattr(m, name)


def _fake_pieces(mod, args: tuple, part: torch.Tensor, P: int, nb: int, PT: int, bm: int, bn: int) -> None:
    """What the Gluon forward leaves for its merge when it cuts the last round: each piece's unnormalised rows
    (acc, m, l, exp2 domain) in its slot, computed here in float64 from the keys it names; and the cut tiles'
    output rows and row statistics poisoned (NaN), which only the merge may then overwrite."""
    names = [a.split(":")[0] for a in mod.KERNELS["fwd_sm90"][1]]
    a = dict(zip(names, args))
    q, k, v, out, mrow, lrow = (a[n] for n in ("Q", "K", "V", "Out", "Mrow", "Lrow"))
    B, H, Sq, _ = q.shape
    n_m = -(-Sq // bm)
    n = 2 * PT * bm  # the part buffer: outputs [2 PT, bm, D_V], then m and l [2 PT, bm]
    opart, mpart, lpart = part[:n * v.shape[3]].view(2 * PT, bm, -1), *part[n * v.shape[3]:].view(2, 2 * PT, bm)
    for items in _items(mod, n_m * B * H, P, nb, PT):
        for tile, t0, t1, slot in items:
            i_m, i_bh = n_m - 1 - tile % n_m, tile // n_m
            b, h = divmod(i_bh, H)
            rows = slice(i_m * bm, min(i_m * bm + bm, Sq))
            if slot < 0:
                continue
            keys = slice(t0 * bn, min(t1 * bn, k.shape[2]))
            hk = h // (H // k.shape[1])
            s = (q[b, h, rows].double() @ k[b, hk, keys].double().T) * a["sm_scale"] * 1.4426950408889634
            m = s.max(1).values
            p_ = torch.exp2(s - m[:, None])
            r = rows.stop - rows.start
            opart[slot, :r] = (p_ @ v[b, hk, keys].double()).float()
            mpart[slot, :r], lpart[slot, :r] = m.float(), p_.sum(1).float()
            out[b, h, rows] = float("nan")
            mrow[b, h, rows] = lrow[b, h, rows] = float("nan")


def _check_descs(kernel: str, descs: list, args: tuple, kw: dict) -> None:
    """The Gluon backward's host-side descriptors (_dkdv_descs, _dq_descs) describe the tensors its Triton twin
    reads, in the kernel's order, whole, with the kernel's tiles; none for the forward."""
    if kernel == "fwd":
        assert not descs
        return
    bm, bn = kw["BLOCK_M"], kw["BLOCK_N"]
    if kernel == "dkdv":  # (Q, K, V, dO, Mrow, Lrow, Delta, dK, dV, ...): Q, dO, K, V, dK, dV, Mrow, Delta
        tiles, rows = [(args[0], bm), (args[3], bm)] + [(args[i], bn // 2) for i in (1, 2, 7, 8)], [args[4], args[6]]
    else:  # (Q, K, V, Out, dO, dLse, Mrow, Lrow, Delta, dQ, ...): Q, dO, dQ, K, V
        tiles, rows = [(args[i], bm // 2) for i in (0, 4, 9)] + [(args[1], bn), (args[2], bn)], []
    assert len(descs) == len(tiles) + len(rows)
    for d, (t, r) in zip(descs, tiles):
        assert d.base is t and list(d.shape) == list(t.shape) and list(d.strides) == list(t.stride())
        assert list(d.block_shape) == [1, 1, r, t.shape[3]]
    for d, t in zip(descs[len(tiles):], rows):  # [B * H, q_len] rows of a _rows buffer, bm entries a copy
        B, H, S = t.shape
        assert d.base is t and list(d.shape) == [B * H, S] and list(d.strides) == [t.stride(1), 1]
        assert t.stride(0) == H * t.stride(1) and list(d.block_shape) == [1, bm]


def _on_hopper(mod, *sections, at: int):
    """_sm90's (or _sm90_dkdv's, _sm90_dq's) config logic, as on an H100, reading `sections` of the config (its
    argument `at`: _sm90's fifth, the others' seventh)."""
    def rule(*args):
        cfg = mod._override(args[at], *sections)
        return cfg.get("GLUON") is not False and not any(key in cfg for key in mod._TRITON_LAUNCH)
    return rule


def _logged(fn):
    """fn, appending each call's config to the returned log; tune sees fn's module and name."""
    log: list = []

    def call(*a, config=None, **kw):
        log.append(config)
        return fn(*a, config=config, **kw)
    call.__module__, call.__name__ = fn.__module__, fn.__name__
    return call, log


@pytest.mark.parametrize("gluon_ms, winner", [(1.0, "gluon"), (3.0, (32, 16))])
def test_tune_puts_the_gluon_forward_first(examples, tmp_path, monkeypatch, gluon_ms, winner):
    """Where the Gluon forward runs by default it is the forward's first candidate; Triton tilings compete
    with GLUON=False, and the result says which kernel won."""
    monkeypatch.setenv("ATTNGEN_CACHE_DIR", str(tmp_path))
    fn = examples["causal"][1]
    mod = sys.modules[fn.__module__]
    launched: list = []
    monkeypatch.setattr(mod, "causal_fwd_sm90_kernel", _fake_gluon(mod, "causal", "fwd", launched))
    monkeypatch.setattr(mod, "_sm90", _on_hopper(mod, "fwd", at=4))
    call, log = _logged(fn)

    def timer(f):
        f()
        sec = log[-1]["fwd"]
        return gluon_ms if sec.get("GLUON") else {(32, 16): 1.0}.get((sec["BLOCK_M"], sec["BLOCK_N"]), 2.0)

    q, k, v, _ = _qkv(torch.float32, 16, 16)
    cfg = attngen.tune(call, q, k, v, candidates={"fwd": [(16, 16, 4, 1), (32, 16, 4, 1)]}, timer=timer,
                       backward=False)
    assert launched, "the Gluon candidate was never run"
    if winner == "gluon":
        assert cfg["fwd"] == {"GLUON": True}
    else:
        assert cfg["fwd"] == {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1, "GLUON": False}
        n = len(launched)
        fn(q, k, v, config=cfg)
        assert len(launched) == n  # the tuned config keeps the Triton forward


_WALK = """
import triton
import triton.language as tl
from {module} import _rounds, _snake


@triton.jit
def walk(Seen, Load, Weight, n, P):
    pid = tl.program_id(0)
    for r in range(0, _rounds(n, pid, P)):
        tile = _snake(r, pid, P)
        tl.atomic_add(Seen + tile, 1)
        tl.atomic_add(Load + pid, tl.load(Weight + tile))
"""


def test_persistent_programs_take_every_tile_once_and_balance(examples):
    """The persistent forward's programs (_rounds, _snake) take every tile exactly once, for tile counts that P
    divides and that it does not; and on tiles in heaviest-first order their loads differ by at most one round's
    spread, where pid + r P loaded the first programs with the heaviest tile of every round. Also the aliasing of
    chunks of 2048 (16 row blocks of 128) with 132 programs: the most loaded program 3% over the mean (what 15 or
    16 tiles each must give), against 21% for pid + r P."""
    mod = _mod(examples, "causal")
    if not mod._GLUON:
        pytest.skip("this Triton has no Gluon")
    walk = _walker(mod, "walk", _WALK)

    def loads(n: int, P: int, weight: torch.Tensor) -> torch.Tensor:
        seen, load = torch.zeros(n, dtype=torch.int32), torch.zeros(P, dtype=torch.int32)
        walk[(P,)](seen, load, weight.to(torch.int32), n, P)
        assert seen.eq(1).all(), (n, P)
        return load.float()
    for n, P in ((12, 4), (13, 4), (18, 4), (5, 5), (7, 3), (100, 7)):
        loads(n, P, torch.ones(n))
    heaviest_first = torch.arange(100, 0, -1)
    load = loads(100, 8, heaviest_first)
    assert load.max() - load.min() <= 8  # round-robin pid + 8 r: 12 rounds x 7 = 84
    chunks = (torch.arange(64) % 16 + 1).repeat(32)  # chunks of 2048 at S 8192: 64 row blocks x 32 heads
    load = loads(len(chunks), 132, chunks)
    assert load.max() <= 1.035 * load.mean()


_PIECES = """
import triton
import triton.language as tl
from {module} import _fwd90_item, _fwd90_items


@triton.jit
def pieces(Out, n, P, nb, PT, MOST, CUT: tl.constexpr):
    pid = tl.program_id(0)
    for k in range(0, _fwd90_items(n, pid, P, nb, PT, CUT)):
        tile, t0, t1, slot = _fwd90_item(k, pid, P, n, nb, PT, CUT)
        at = Out + (pid * MOST + k) * 4
        tl.store(at, tile)
        tl.store(at + 1, t0)
        tl.store(at + 2, t1)
        tl.store(at + 3, slot)
"""


@pytest.mark.parametrize("n, P, nb, PT", [(2048, 132, 64, 132), (18, 5, 16, 5), (64, 132, 16, 128), (34, 8, 13, 3),
                                          (13, 4, 24, 3), (8, 17, 11, 11)])
def test_a_cut_last_round_takes_every_key_block_once_in_equal_shares(examples, n, P, nb, PT):
    """The Gluon forward's items (_fwd90_item) where the host cuts the last round into PT > n % P shares (_tail, and
    fewer tiles than programs, which the host leaves whole): the whole rounds take tiles 0..n // P * P - 1 whole, in
    snake order; the last round's tiles are cut into PT shares of their key blocks that differ by at most one block,
    each meeting at most two tiles, with distinct slots (2 pid, 2 pid + 1), and every key block of every tile is
    taken exactly once."""
    mod = sys.modules[examples["full"][1].__module__]
    if not mod._GLUON:
        pytest.skip("this Triton has no Gluon")
    items = _items(mod, n, P, nb, PT)
    seen = torch.zeros(n, nb, dtype=torch.int32)
    slots, share = set(), []
    for pid, its in enumerate(items):
        whole = [it for it in its if it[3] < 0]
        assert len(whole) == n // P and all(t0 == 0 and t1 == -1 for _, t0, t1, _ in whole)
        cut = its[len(whole):]
        assert len(cut) <= 2 and all(slot == 2 * pid + j for j, (*_, slot) in enumerate(cut))
        assert not cut or pid < PT
        share.append(sum(t1 - t0 for _, t0, t1, _ in cut))
        for tile, t0, t1, slot in its:
            seen[tile, t0:nb if t1 < 0 else t1] += 1
            if slot >= 0:
                assert tile >= n // P * P and 0 <= t0 < t1 <= nb and slot not in slots
                slots.add(slot)
    assert seen.eq(1).all()
    assert max(share[:PT]) - min(share[:PT]) <= 1


def test_the_host_cuts_the_last_round_where_it_pays(examples):
    """_tail: programs share the last round where its tiles would leave a quarter of them idle or more, in shares
    of at least 8 key blocks, after at least one whole round; never for an even round; the benchmark's full mask
    (2048 tiles of 64 key blocks over 132 SMs) on every SM."""
    mod = sys.modules[examples["full"][1].__module__]
    assert mod._tail(2048, 132, 64) == 132
    assert mod._tail(320, 132, 32) == 132
    assert mod._tail(2048, 128, 64) == 0  # 16 whole rounds
    assert mod._tail(262, 132, 64) == 0  # 130 of 132 busy: nothing to win
    assert mod._tail(200, 132, 2) == 0  # shares of one block
    assert mod._tail(64, 132, 16) == 0  # fewer tiles than SMs: a host-bound kernel
    assert not hasattr(sys.modules[examples["causal"][1].__module__], "_tail")  # rows differ: snake rounds


def test_the_gluon_forward_cuts_its_last_round_and_merges_it(examples, monkeypatch):
    """A full-mask forward whose last round is cut (4 SMs, 6 tiles of 13 key blocks: a whole round, then 2 tiles in
    3 shares of 8 or 9 blocks, the middle one across both tiles): the Gluon stand-in leaves each piece's rows in its
    slot and NaN in the cut tiles, the host merges them (fwd_merge), and the output, LSE and gradients match the Triton
    forward's; SPLIT_TAIL=False runs whole tiles."""
    fn = examples["full"][1]
    mod = sys.modules[fn.__module__]
    if not mod._GLUON:
        pytest.skip("this Triton has no Gluon")
    launched: list = []
    monkeypatch.setattr(mod, "full_fwd_sm90_kernel", _fake_gluon(mod, "full", "fwd", launched))
    monkeypatch.setattr(mod, "_sm90", _on_hopper(mod, "fwd", at=4))
    monkeypatch.setattr(mod, "_sms", lambda device: 4)
    mod._PLANS.clear()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 300, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(1, 2, 13 * 128, 16, generator=g, requires_grad=True) for _ in range(2))
    do = torch.randn(1, 2, 300, 16, generator=g)

    def run(config):
        out, lse = fn(q, k, v, return_lse=True, config=config)
        grads = torch.autograd.grad(out, (q, k, v), do)
        return out, lse, *grads
    ref = run({"GLUON": False})
    merged = []
    monkeypatch.setattr(mod, "full_fwd_merge", _counting(mod.full_fwd_merge, merged))
    for config, cut in ((None, True), ({"fwd": {"SPLIT_TAIL": False}}, False)):
        got = run(config)
        assert launched.pop()[0] == (4,) and bool(merged) == cut, config
        merged.clear()
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="SPLIT_TAIL"):
        examples["causal"][1](q, k, v, config={"fwd": {"SPLIT_TAIL": False}})  # causal never cuts


def _counting(kernel, log: list):
    """kernel, with its launches noted in `log`."""
    class Launcher:
        def __getitem__(self, grid):
            log.append(grid)
            return kernel[grid]
    return Launcher()


def test_the_gluon_forward_is_persistent(examples, monkeypatch):
    """The Gluon forward launches a program per SM (at most one per tile) that walks the cdiv(S_q, 128) x B*H tiles;
    config {"fwd": {"PERSISTENT": False}} launches one per tile, and so does a machine without SMs (the CPU)."""
    fn = examples["causal"][1]
    mod = sys.modules[fn.__module__]
    launched: list = []
    monkeypatch.setattr(mod, "causal_fwd_sm90_kernel", _fake_gluon(mod, "causal", "fwd", launched))
    monkeypatch.setattr(mod, "_sm90", _on_hopper(mod, "fwd", at=4))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 300, 16, generator=g) for _ in range(3))  # 3 x 6 tiles
    ref = fn(q, k, v, config={"GLUON": False})  # 64 x 64 tiles: equal up to rounding
    for sms, config, grid in ((4, None, (4,)), (40, None, (18,)), (4, {"fwd": {"PERSISTENT": False}}, (18,)),
                              (0, None, (18,))):
        monkeypatch.setattr(mod, "_sms", lambda device, n=sms: n)
        mod._PLANS.clear()  # the grid is a remembered decision: another SM count is another machine
        torch.testing.assert_close(fn(q, k, v, config=config), ref, rtol=1e-5, atol=1e-5)
        assert launched.pop()[0] == grid, (sms, config)
    with pytest.raises(ValueError, match="PERSISTENT"):
        fn(q, k, v, config={"PERSISTENT": False})  # a key of the forward's section only


def test_tune_asks_the_band_rules_with_the_calls_params(examples, tmp_path, monkeypatch, hopper):
    """tune finds each kernel's default as the call would: a banded mask's depends on its params (_long_rows,
    _long_band), so tune passes them, and a long band's Gluon forward is then the first candidate."""
    monkeypatch.setenv("ATTNGEN_CACHE_DIR", str(tmp_path))
    fn = examples["sliding_window"][1]
    mod = sys.modules[fn.__module__]
    if not mod._GLUON:
        pytest.skip("this Triton has no Gluon")
    seen: list = []
    monkeypatch.setattr(mod, "_long_rows", lambda q_len, kv_len, params: seen.append(params) or True)
    launched: list = []
    monkeypatch.setattr(mod, "sliding_window_fwd_sm90_kernel", _fake_gluon(mod, "sliding_window", "fwd", launched))
    q, k, v, _ = _qkv(torch.float16, 64, 64)  # float16: the interpreter's tl.dot is exact there
    cfg = attngen.tune(fn, q, k, v, window=48, candidates={"fwd": [(16, 16, 4, 1)]}, backward=False,
                       timer=lambda f: (f(), 1.0)[1])
    assert seen and all(p == {"window": 48} for p in seen)
    assert launched and cfg["fwd"] == {"GLUON": True}  # the default, which no Triton tiling beat by MARGIN


def _gluon_unless_false(*args):  # the config logic of _sm90_dkdv and _sm90_dq, as on an H100
    return (args[6] or {}).get("GLUON") is not False


@pytest.mark.parametrize("name", ["causal", "softcap"])
def test_the_gluon_backward_launches(examples, monkeypatch, name):
    """The host's Gluon dQ and dK/dV launches (grids, tiles, arguments, Mrow = m + log2 l), through stand-ins
    that compute with the Triton kernels: the gradients equal those of the Triton backward. The dK/dV takes
    64 queries per step, also where the score is nonlinear in qk (softcap)."""
    fn = examples[name][1]
    mod = sys.modules[fn.__module__]
    launched: list = []
    for kernel in ("dkdv", "dq"):
        monkeypatch.setattr(mod, f"{name}_bwd_{kernel}_sm90_kernel", _fake_gluon(mod, name, kernel, launched))
        monkeypatch.setattr(mod, f"_sm90_{kernel}", _gluon_unless_false)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 200, 16, generator=g).requires_grad_() for _ in range(3))  # 2 key blocks of 128
    dout = torch.randn(1, 2, 200, 16, generator=g)

    def grads(config):
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v, config=config).backward(dout)
        return [t.grad.clone() for t in (q, k, v)]
    checks = []  # TensorDescriptor's own checks run once per geometry (_desc); later ones are filled in directly
    post_init = mod.TensorDescriptor.__post_init__
    monkeypatch.setattr(mod.TensorDescriptor, "__post_init__", lambda d: (checks.append(d), post_init(d)))
    mod._DESC_CHECKED.clear()
    got = grads(None)
    assert launched == [((2, 2), 128, 64), ((2, 2), 64, 128)]  # dQ, then dK/dV
    first = len(checks)
    assert first == 2  # one geometry for every tile here ([1, 2, 200, 16] by 64 rows), one for the row vectors
    again = grads(None)  # the same geometry: descriptors without checks, each on this call's tensors (_check_descs)
    assert len(launched) == 4 and len(checks) == first
    want = grads({"GLUON": False})
    assert len(launched) == 4
    for a, b, c in zip(got, again, want):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b, c, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["causal", "alibi", "sliding_window"])
def test_the_gluon_backward_builds_no_descriptor(examples, name):
    """The Gluon dQ and dK/dV take their TMA descriptors from the host (_dq_descs, _dkdv_descs) and build none per
    program: built there, they cost the backward 8-10% on long bands (results/2026-11-28-h100-host-desc.json). Nor do
    their final stores read coordinates kept from before the steps (the program id again: _program_y)."""
    import ast
    import inspect

    src = inspect.getsource(_mod(examples, name))
    funcs = {n.name: ast.get_source_segment(src, n) for n in ast.walk(ast.parse(src)) if isinstance(n, ast.FunctionDef)}
    bwd = {f: body for f, body in funcs.items() if f.startswith(("_dkdv90", "_dq90", f"{name}_bwd_"))
           and not f.endswith(("_dkdv_kernel", "_dq_kernel"))}  # the Gluon functions (not the Triton twins)
    assert {f"{name}_bwd_dkdv_sm90_kernel", f"{name}_bwd_dq_sm90_kernel", "_dkdv90_compute", "_dq90_compute"} \
        <= set(bwd)
    assert not [f for f, body in bwd.items() if "make_tensor_descriptor" in body]
    assert "make_tensor_descriptor" in funcs[f"{name}_fwd_sm90_kernel"]  # the persistent forward: once per program
    for f, again in (("_dkdv90_compute", "_dkdv90_bhk(n0)"), ("_dq90_compute", "_dq90_bh(m0)")):
        store = bwd[f].split("fence_async_shared()")[-1]
        assert again in store and "[b, h" not in store


@pytest.mark.parametrize("kernel", ["dkdv", "dq"])
@pytest.mark.parametrize("gluon_ms, winner", [(1.0, "gluon"), (3.0, (32, 32))])
def test_tune_puts_the_gluon_backward_first(examples, tmp_path, monkeypatch, gluon_ms, winner, kernel):
    """tune times a backward kernel's Gluon version first and keeps it unless a Triton tiling beats it."""
    monkeypatch.setenv("ATTNGEN_CACHE_DIR", str(tmp_path))
    fn = examples["causal"][1]
    mod = sys.modules[fn.__module__]
    launched: list = []
    other = {"dkdv": "dq", "dq": "dkdv"}[kernel]
    monkeypatch.setattr(mod, f"causal_bwd_{kernel}_sm90_kernel", _fake_gluon(mod, "causal", kernel, launched))
    monkeypatch.setattr(mod, f"_sm90_{kernel}", _on_hopper(mod, "bwd", kernel, at=6))
    monkeypatch.setattr(mod, f"_sm90_{other}", lambda *a: False)
    call, log = _logged(fn)

    def timer(f):
        f()
        sec = log[-1][kernel]
        return gluon_ms if sec.get("GLUON") else {(32, 32): 1.0}.get((sec.get("BLOCK_M"), sec.get("BLOCK_N")), 2.0)

    q, k, v, _ = _qkv(torch.float32, 16, 16)
    for t in (q, k, v):
        t.requires_grad_()
    cfg = attngen.tune(call, q, k, v, candidates={"fwd": [], other: [], kernel: [(32, 32, 4, 1), (16, 16, 4, 1)]},
                       timer=timer)
    assert launched, f"the Gluon {kernel} candidate was never run"
    if winner == "gluon":
        assert cfg[kernel] == {"GLUON": True}
    else:
        assert cfg[kernel] == {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1, "GLUON": False}


def test_which_modules_have_the_gluon_backward():
    from attngen.codegen import compile_source

    code = compile_source("attention m { mask q_idx >= kv_idx }")["m"]
    assert "_fwd_sm90_kernel" in code and "_bwd_dkdv_sm90_kernel" in code
    code = compile_source("attention m { layout bshd }")["m"]  # its strides go into the same descriptors
    assert "_bwd_dq_sm90_kernel" in code and "_bwd_dkdv_sm90_kernel" in code
    code = compile_source("attention m { score score + (kv_idx - q_idx) * 0.1 }")["m"]  # split: key and query terms
    assert "_bwd_dq_sm90_kernel" in code and "_bwd_dkdv_sm90_kernel" in code and "def _lse_shift" in code
    code = compile_source("attention m { score score + (kv_idx * q_idx) * 0.001 }")["m"]  # one term reads both
    assert "_fwd_sm90_kernel" in code and "_bwd_dkdv_sm90_kernel" not in code and "_bwd_dq_sm90_kernel" not in code
