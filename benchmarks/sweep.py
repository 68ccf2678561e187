"""Launch-configuration sweeps on the GPU (issue 4's autotuning notes; the defaults come from here).

    python benchmarks/sweep.py [--out DIR] [--only fwd,bwd,mla,doc,banded,ragged,tma,splits,paged_splits,
                                             gluon_stages]

bf16, B=2, H=16, S=8192, D=128 for the training kernels (forward alone; forward + backward with the
forward fixed at its default, so differences are the backward's); MLA decode (B=8, 16 heads over
one latent head, L=8192, 576/512 dims, page 64) for the serving kernel. do_bench medians.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from attngen.verify import compiled  # noqa: E402

OUT = Path(".")
ROWS: list[dict] = []  # every measurement, in order


def _measure(f, work: float, unit: str, base_ms: float = 0.0, **row) -> None:
    """Time f and record a row with `unit` = work per second (flops -> "tflops", bytes -> "gbps");
    base_ms is subtracted first (the backward alone). The file stays current, so a run cut short
    still leaves its numbers."""
    ms = _time(f)
    if not ms:
        return
    ms -= base_ms
    ROWS.append(dict(row, ms=ms, **{unit: work / ms / (1e9 if unit == "tflops" else 1e6)}))
    print(json.dumps(ROWS[-1]), flush=True)
    (OUT / "sweep.json").write_text(json.dumps(dict(device=torch.cuda.get_device_name(), rows=ROWS), indent=1))


def _qkv(B: int = 2, H: int = 16, S: int = 8192, D: int = 128):
    g = torch.Generator(device="cuda").manual_seed(0)
    return tuple(torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))


FLOPS = 4 * 2 * 16 * 8192 * 8192 * 128  # the training shape's dense forward


def _time(f) -> float | None:
    import triton

    try:
        f()
        return triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median")
    except Exception as e:  # noqa: BLE001 - configurations that do not fit are skipped
        print(f"  skipped: {type(e).__name__}: {str(e)[:100]}", flush=True)
        return None


def training(tmp: Path, which: set[str]) -> None:
    q, k, v = _qkv()
    do = torch.randn_like(q)
    for name in ("full", "causal"):
        (_, fn), = compiled(ROOT / "examples" / f"{name}.attn", tmp)
        fl = FLOPS * (1.0 if name == "full" else 0.5)
        if "fwd" in which:
            for bm, bn, w, st in itertools.product((64, 128), (64, 128), (4, 8), (2, 3, 4)):
                cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
                _measure(lambda: fn(q, k, v, config={"fwd": cfg}), fl, "tflops", kind="fwd", variant=name, config=cfg)
        if "bwd" in which and name == "causal":
            qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

            def step(cfg):
                qg.grad = kg.grad = vg.grad = None
                fn(qg, kg, vg, config={"bwd": cfg}).backward(do)
            base = _time(lambda: fn(q, k, v))
            for (bm, bn), w, st in itertools.product(((32, 64), (64, 64), (64, 128), (128, 64), (128, 128)), (4, 8),
                                                     (1, 2)):
                cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
                if base:
                    _measure(lambda: step(cfg), 2.5 * fl, "tflops", base, kind="bwd", variant=name, config=cfg)


def mla(tmp: Path) -> None:
    spec = tmp / "mla.attn"
    spec.write_text("attention mla { layout paged  heads kv = 1  scale 0.0721687836  mask q_idx >= kv_idx }")
    (_, fn), = compiled(spec, tmp)
    B, Hm, L, page = 8, 16, 8192, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    kc = torch.randn(B * L // page, page, 1, 576, device="cuda", dtype=torch.bfloat16, generator=g)
    table = torch.randperm(B * L // page, device="cuda", generator=g).view(B, -1).int()
    q = torch.randn(B, 1, Hm, 576, device="cuda", dtype=torch.bfloat16, generator=g)
    lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
    for bn, w, st, sp in itertools.product((16, 32, 64), (4, 8), (1, 2, 3), (None, 66)):
        cfg = dict(BLOCK_N=bn, num_warps=w, num_stages=st, **({"SPLITS": sp} if sp else {}))
        _measure(lambda: fn(q, kc, kc[..., :512], table, lens, config=cfg), B * L * 576 * 2, "gbps", kind="mla",
                 config=cfg)


def document(tmp: Path) -> None:
    """The document mask (16 random docs, causal) with a prebuilt block map: forward tile shapes."""
    q, k, v = _qkv()
    B, S = q.shape[0], q.shape[2]
    g = torch.Generator(device="cuda").manual_seed(0)
    docs = torch.sort(torch.randint(0, 16, (B, S), device="cuda", generator=g), dim=-1).values.int()
    (_, fn), = compiled(ROOT / "examples" / "document.attn", tmp)
    for bm, bn, w, st in itertools.product((64, 128), (64, 128), (4, 8), (2, 3)):
        cfg = {"fwd": dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)}
        try:
            bmap = fn.block_map(q, k, v, docs, config=cfg)
        except Exception as e:  # noqa: BLE001
            print(f"  skipped {cfg}: {e}")
            continue
        _measure(lambda: fn(q, k, v, docs, block_map=bmap, config=cfg), FLOPS * 0.0314, "tflops", kind="doc",
                 config=cfg["fwd"])


def ragged(tmp: Path) -> None:
    """Decode over a ragged batch (lengths 100..32768, B=8, 32 over 8 heads): stream-K programs and tiles."""
    spec = tmp / "ragged.attn"
    spec.write_text("attention rag { layout ragged  mask q_idx >= kv_idx }")
    (_, fn), = compiled(spec, tmp)
    B, H, Hkv, L, D = 8, 32, 8, 32768, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    lengths = torch.linspace(100, L, B, device="cuda").long()
    lengths[-1] = L
    cu = torch.zeros(B + 1, dtype=torch.int32, device="cuda")
    cu[1:] = lengths.cumsum(0)
    k = torch.randn(int(cu[-1]), Hkv, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn_like(k)
    q = torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    cu_q = torch.arange(B + 1, device="cuda", dtype=torch.int32)
    for bn, st, n in itertools.product((64, 128), (2, 3), (None, 64, 128, 256)):
        cfg = dict(BLOCK_N=bn, num_stages=st, **({"PROGRAMS": n} if n else {}))
        _measure(lambda: fn(q, k, v, cu_q, cu, max_seqlen_q=1, max_seqlen_k=L, config=cfg), 2 * k.numel() * 2,
                 "gbps", kind="ragged", config=cfg)


def splits(tmp: Path) -> None:
    """Decode split counts (contiguous rows, one query, D=128) across batch and head shapes: the
    split rule in the serving template comes from here."""
    spec = tmp / "dec.attn"
    spec.write_text("attention dec { layout ragged  mask q_idx >= kv_idx }")
    (_, fn), = compiled(spec, tmp)
    g = torch.Generator(device="cuda").manual_seed(0)
    D = 128
    kbuf = torch.randn(8 * 32768 * 8 * D, device="cuda", dtype=torch.bfloat16, generator=g)
    vbuf = torch.randn_like(kbuf)  # V apart from K: one tensor for both would be read twice from L2
    for B, H, Hkv, L in ((1, 32, 8, 32768), (2, 32, 8, 32768), (4, 32, 8, 32768), (8, 32, 8, 32768),
                         (16, 32, 8, 16384), (32, 32, 8, 8192), (8, 32, 8, 4096), (64, 32, 8, 2048),
                         (8, 64, 8, 8192), (4, 16, 16, 8192), (8, 8, 8, 8192)):
        q = torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
        k, v = (buf[: B * L * Hkv * D].view(B * L, Hkv, D) for buf in (kbuf, vbuf))
        cu_q = torch.arange(B + 1, device="cuda", dtype=torch.int32)
        for sp in (None, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64):
            if sp and sp > L // 64:
                continue
            cfg = {"SPLITS": sp} if sp else {}
            _measure(lambda: fn(q, k, v, cu_q, cu_q * L, max_seqlen_q=1, max_seqlen_k=L, config=cfg),
                     2 * k.numel() * 2, "gbps", kind="splits", variant=f"B{B} H{H}/{Hkv} L{L}", config=cfg)


def paged_splits(tmp: Path) -> None:
    """Decode split counts over a paged cache (the block-table gather needs more loads in flight)."""
    spec = tmp / "decp.attn"
    spec.write_text("attention decp { layout paged  mask q_idx >= kv_idx }")
    (_, fn), = compiled(spec, tmp)
    g = torch.Generator(device="cuda").manual_seed(0)
    D, Hkv = 128, 8
    for B, H, L, page in ((1, 32, 32768, 16), (2, 32, 32768, 16), (4, 32, 32768, 16), (8, 32, 32768, 16),
                          (8, 32, 32768, 64), (16, 32, 16384, 16), (8, 64, 8192, 16)):
        n = B * L // page
        kc, vc = (torch.randn(n, page, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
        table = torch.randperm(n, device="cuda", generator=g).view(B, -1).int()
        q = torch.randn(B, 1, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
        lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
        for sp in (None, 1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32):
            cfg = {"SPLITS": sp} if sp else {}
            _measure(lambda: fn(q, kc, vc, table, lens, config=cfg), 2 * kc.numel() * 2, "gbps", kind="paged_splits",
                     variant=f"B{B} H{H}/{Hkv} L{L} page{page}", config=cfg)
        kc = vc = None  # free the pools before the next shape


def tma(tmp: Path) -> None:
    """Forward with and without tensor-descriptor (TMA) loads of K and V, across a few tiles."""
    q, k, v = _qkv()
    for name, dens, kw in (("full", 1.0, {}), ("causal", 0.5, {}), ("sliding_window", 0.117, {"window": 1024})):
        (_, fn), = compiled(ROOT / "examples" / f"{name}.attn", tmp)
        for t, w, st, bn in itertools.product((False, True), (4, 8), (2, 3), (64, 128)):
            cfg = {"fwd": dict(TMA=t, num_warps=w, num_stages=st, BLOCK_N=bn)}
            _measure(lambda: fn(q, k, v, **kw, config=cfg), FLOPS * dens, "tflops", kind="tma", variant=name,
                     config=cfg["fwd"])


def banded(tmp: Path) -> None:
    """The rows whose key ranges are narrow (document map, sliding 1024, chunked 2048, 4 sinks + window 1024):
    forward tiles, then dK/dV's with dQ at its default, then dQ's with dK/dV at its default (the backward
    alone: forward + backward minus the default forward). BANDED's defaults come from here."""
    q, k, v = _qkv()
    do = torch.randn_like(q)
    g = torch.Generator(device="cuda").manual_seed(1)
    docs = torch.sort(torch.randint(0, 16, (q.shape[0], q.shape[2]), device="cuda", generator=g), dim=-1).values.int()
    c = lambda m, n, w, s: dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)  # noqa: E731
    cands = {"fwd": [None, c(64, 64, 4, 2), c(64, 64, 4, 3), c(64, 32, 4, 3), c(64, 32, 4, 4), c(128, 64, 4, 2),
                     c(64, 64, 8, 3)],
             "dkdv": [None, c(32, 64, 4, 2), c(32, 64, 4, 3), c(64, 64, 4, 3), c(32, 128, 8, 2), c(16, 64, 4, 3)],
             "dq": [None, c(64, 32, 4, 2), c(64, 32, 4, 3), c(64, 64, 4, 3), c(128, 32, 8, 2), c(64, 16, 4, 3)]}
    rows = (("document", ROOT / "examples/document.attn", (docs,), {}, 0.0314),
            ("sliding_window", ROOT / "examples/sliding_window.attn", (), {"window": 1024}, 0.1172),
            ("chunked", ROOT / "benchmarks/specs/chunked_2048.attn", (), {}, 0.1251),
            ("sinks", ROOT / "examples/sink_window.attn", (), {}, 0.1176))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    for name, path, args, kw, dens in rows:
        (_, fn), = compiled(path, tmp)

        def call(cfg, grad: bool):
            bmap = {"block_map": fn.block_map(q, k, v, *args, config=cfg)} if args else {}

            def step():
                if grad:
                    qg.grad = kg.grad = vg.grad = None
                    fn(qg, kg, vg, *args, **kw, **bmap, config=cfg).backward(do)
                else:
                    fn(q, k, v, *args, **kw, **bmap, config=cfg)
            return step
        base = _time(call(None, False))
        for sec, cfgs in cands.items():
            for cfg in cfgs:
                over = None if cfg is None else {sec: cfg}
                if sec == "fwd":
                    _measure(call(over, False), FLOPS * dens, "tflops", kind="banded fwd", variant=name, config=cfg)
                elif base:
                    _measure(call(over, True), 2.5 * FLOPS * dens, "tflops", base, kind=f"banded {sec}", variant=name,
                             config=cfg)


def gluon_stages(tmp: Path) -> None:
    """The Gluon kernels' ring depth (STAGES: 2 by default, 3 for dQ and dK/dV at D=64) per kernel, on full and
    causal, at D=128 (B2 H16 S8192) and D=64 (B4 H16 S4096, bench.py --shape's second shape). Built for sm_90 on the
    CPU, the kernels use 65-96 KB of shared memory at D=64 (129-192 KB at D=128), so D=64 has room for deeper rings.
    Forward alone for fwd_sm90; forward+backward minus the forward for dq_sm90 and dkdv_sm90 (the other kernel at
    its default)."""
    for D, (B, S) in ((128, (2, 8192)), (64, (4, 4096))):
        q, k, v = _qkv(B, 16, S, D)
        do = torch.randn_like(q)
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        fl = 4 * B * 16 * S * S * D
        for name in ("full", "causal"):
            (_, fn), = compiled(ROOT / "examples" / f"{name}.attn", tmp)
            mod = sys.modules[fn.__module__]
            default = mod._gluon_launch
            dens = 1.0 if name == "full" else 0.5

            def step():
                qg.grad = kg.grad = vg.grad = None
                fn(qg, kg, vg).backward(do)
            base = _time(lambda: fn(q, k, v))
            for kern, stages in itertools.product(("fwd_sm90", "dq_sm90", "dkdv_sm90"), (2, 3, 4)):
                mod._gluon_launch = lambda which, d_qk, d_v, kern=kern, stages=stages: {
                    **default(which, d_qk, d_v), **({"STAGES": stages} if which == kern else {})}
                mod._PLANS.clear()  # the plans hold the launch keywords
                if kern == "fwd_sm90":
                    _measure(lambda: fn(q, k, v), fl * dens, "tflops", kind="gluon stages", variant=f"{name} D{D}",
                             config={kern: stages})
                elif base:
                    _measure(step, 2.5 * fl * dens, "tflops", base, kind="gluon stages", variant=f"{name} D{D}",
                             config={kern: stages})
            mod._gluon_launch = default
            mod._PLANS.clear()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--only", default="fwd,bwd,mla")
    a = ap.parse_args()
    which = set(a.only.split(","))
    global OUT
    OUT = Path(a.out)
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if which & {"fwd", "bwd"}:
            training(Path(tmp), which)
        if "mla" in which:
            mla(Path(tmp))
        if "doc" in which:
            document(Path(tmp))
        if "banded" in which:
            banded(Path(tmp))
        if "ragged" in which:
            ragged(Path(tmp))
        if "tma" in which:
            tma(Path(tmp))
        if "gluon_stages" in which:
            gluon_stages(Path(tmp))
        if "splits" in which:
            splits(Path(tmp))
        if "paged_splits" in which:
            paged_splits(Path(tmp))
    for kind in ("fwd", "bwd", "mla", "doc", "ragged", "tma"):
        for variant in ("full", "causal", "sliding_window", None):
            sel = [r for r in ROWS if r["kind"] == kind and r.get("variant") == variant]
            if sel:
                best = min(sel, key=lambda r: r["ms"])
                print(f"best {kind} {variant}: {best}")


if __name__ == "__main__":
    main()
