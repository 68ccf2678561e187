"""Serving on the GPU: correctness at real sizes, then decode / paged / ragged / MLA / prefill timings.

    python benchmarks/serving.py [--out DIR] [--skip-correctness] [--sweep configs|programs]

Decode (PERF_ANCHORS): one query token, B=8, 32 query heads over 8 KV heads, KV length 32768, D=128,
bf16; bytes = K + V read once. Side by side in one process with SDPA (flash, cuDNN; enable_gqa) and
torch.compile(flex_attention), do_bench medians; outputs are cross-checked before timing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from attngen.verify import ServeShape, check_serving, compiled  # noqa: E402

SPECS = """
attention causal_paged { layout paged  mask q_idx >= kv_idx }
attention causal_ragged { layout ragged  mask q_idx >= kv_idx }
attention window_paged { layout paged  param window: int = 1024  mask q_idx >= kv_idx and q_idx - kv_idx < window }
attention mla_paged { layout paged  heads kv = 1  scale 0.0721687836  mask q_idx >= kv_idx }
attention softcap_ragged { layout ragged  score 30.0 * tanh(score / 30.0)  mask q_idx >= kv_idx }
"""


def correctness(fns: dict) -> list[dict]:
    rows = []
    cases = [("causal_paged", ServeShape(32, 8, (1,) * 8, tuple(range(4000, 4800, 100)), 128, 128, 16), {}),
             ("causal_paged", ServeShape(32, 8, (16, 5, 1, 9), (4096, 17, 1, 300), 128, 128, 1), {}),
             ("window_paged", ServeShape(32, 8, (1, 3, 7), (4096, 2500, 9), 128, 128, 16), {}),
             ("causal_ragged", ServeShape(16, 4, (500, 0, 1, 300), (2048, 40, 0, 300), 128, 128), {}),
             ("softcap_ragged", ServeShape(16, 16, (700, 1), (1500, 333), 64, 64), {}),
             ("mla_paged", ServeShape(16, 1, (1, 2, 1, 1), (4096, 1000, 3, 64), 576, 512, 64),
              dict(values_in_keys=True)),
             ("causal_ragged", ServeShape(32, 8, (1,) * 8, (32768,) * 8, 128, 128), {}),
             # unequal lengths: stream-K by default
             ("causal_ragged", ServeShape(32, 8, (1,) * 8, (100, 4767, 9433, 14100, 18767, 23434, 28100, 32768),
                                          128, 128), {}),
             ("softcap_ragged", ServeShape(16, 16, (4,) * 6, (50, 3000, 9000, 0, 12000, 700), 64, 64), {})]
    for i, (name, shape, kw) in enumerate(cases):
        kernel, fn = fns[name]
        for dtype in (torch.bfloat16, torch.float16):
            r = check_serving(kernel, fn, shape, dtype, torch.device("cuda"), seed=i, repeat=2, **kw)
            rows.append(dict(name=name, shape=str(shape), dtype=r.dtype, ok=r.ok, why=r.why, errors=r.errors))
            print(f"{'ok  ' if r.ok else 'FAIL'} {name:15s} {r.dtype:8s} {r.shape:40s} {r.line()} {r.why}", flush=True)
    return rows


def _pages(k: torch.Tensor, v: torch.Tensor, page: int, g):
    """[B, L, Hkv, D] -> a shuffled page pool and its block table."""
    B, L = k.shape[:2]
    n = L // page
    perm = torch.randperm(B * n, device=k.device, generator=g)
    kc, vc = torch.empty_like(k).view(B * n, page, *k.shape[2:]), torch.empty_like(v).view(B * n, page, *v.shape[2:])
    kc[perm] = k.reshape(B * n, page, *k.shape[2:])
    vc[perm] = v.reshape(B * n, page, *v.shape[2:])
    return kc, vc, perm.view(B, n).int()


def _graphed(f):
    """f captured in a CUDA graph after a warm-up on a side stream (a decode loop's usual form): the
    replay skips the host work (checks, Triton's launch); inputs are read from the same memory."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            f()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = f()
    return graph, out


def _host_us(f, n: int = 200) -> float:
    """Host time per call, issued back to back without a sync (the GPU work here is shorter)."""
    for _ in range(10):
        f()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        f()
    host = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return host


def _replay_check(graph, out, f, inputs: list, g) -> float:
    """Change the inputs in place (new values; lengths shortened), replay, and compare with an eager
    call on the same inputs; the inputs are restored afterwards."""
    saved = [t.clone() for t in inputs]
    for t in inputs:
        if t.is_floating_point():
            t.copy_(torch.randn(t.shape, device=t.device, dtype=t.dtype, generator=g))
        else:
            t.sub_(torch.arange(t.numel(), device=t.device, dtype=t.dtype).view(t.shape) * 3)
    graph.replay()
    err = (out.float() - f().float()).abs().max().item()
    for t, s in zip(inputs, saved):
        t.copy_(s)
    return err


def bench(fns: dict, sweep: bool) -> list[dict]:
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    do_bench = lambda f: triton.testing.do_bench(f, warmup=50, rep=300, return_mode="median")  # noqa: E731
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    B, H, Hkv, L, D = 8, 32, 8, 32768, 128
    q = torch.randn(B, 1, H, D, device=dev, dtype=dt, generator=g)
    k = torch.randn(B, L, Hkv, D, device=dev, dtype=dt, generator=g)
    v = torch.randn(B, L, Hkv, D, device=dev, dtype=dt, generator=g)
    gb = 2 * B * L * Hkv * D * 2 / 1e9
    rows = []

    def row(label, ms, nbytes, **kw):
        r = dict(variant=label, ms=ms, gbps=nbytes / ms * 1e3 if ms else None, **kw)
        rows.append(r)
        print(json.dumps(r), flush=True)
        return r

    # peers: SDPA over [B, H, 1, D] and flex decode, on the same numbers
    qs, ks, vs = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    ref = torch.nn.functional.scaled_dot_product_attention(qs.float(), ks.float(), vs.float(), enable_gqa=True)
    peer = {}
    for name, backend in (("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                f = lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, enable_gqa=True)  # noqa: E731
                err = (f().float() - ref).abs().max().item()
                peer[name] = row(f"decode {name}", do_bench(f), gb, max_err=err)["ms"]
        except RuntimeError as e:
            print(f"{name}: {str(e)[:200]}")
    flex = torch.compile(flex_attention, dynamic=False)
    f = lambda: flex(qs, ks, vs, enable_gqa=True)  # noqa: E731
    peer["flex"] = row("decode flex", do_bench(f), gb, max_err=(f().float() - ref).abs().max().item())["ms"]

    # attngen: contiguous = ragged with equal lengths; paged with several page sizes
    ragged = fns["causal_ragged"][1]
    cu_q = torch.arange(B + 1, device=dev, dtype=torch.int32)
    cu_k = torch.arange(B + 1, device=dev, dtype=torch.int32) * L
    q3, k3, v3 = q.view(B, H, D), k.view(B * L, Hkv, D), v.view(B * L, Hkv, D)

    def ours(fn, *args, **kw):
        out = fn(*args, **kw)
        return (out.float().view(B, H, D) - ref.view(B, H, D)).abs().max().item(), lambda: fn(*args, **kw)

    err, f = ours(ragged, q3, k3, v3, cu_q, cu_k, max_seqlen_q=1, max_seqlen_k=L)
    base = row("decode attngen contiguous", do_bench(f), gb, max_err=err)
    for p in peer:
        base[f"vs_{p}"] = peer[p] / base["ms"]
    lens = torch.full((B,), L, dtype=torch.int32, device=dev)
    for page in (16, 64, 256):
        kc, vc, table = _pages(k, v, page, g)
        err, f = ours(fns["causal_paged"][1], q, kc, vc, table, lens)
        r = row(f"decode attngen paged {page}", do_bench(f), gb, max_err=err)
        r["vs_contiguous"] = base["ms"] / r["ms"]
        if page == 16:
            paged16 = (kc, vc, table)
        del kc, vc
    if sweep == "configs":  # launch configurations around the default, on the paged-16 case
        kc, vc, table = paged16
        for bn in (32, 64, 128):
            for warps in (2, 4, 8):
                for stages in (2, 3, 4):
                    for split_mul in (1, 2):
                        cfg = dict(BLOCK_N=bn, num_warps=warps, num_stages=stages)
                        if split_mul == 2:
                            cfg["SPLITS"] = 2 * max(1, (2 * 132 + 63) // 64)
                        try:
                            ms = do_bench(lambda: fns["causal_paged"][1](q, kc, vc, table, lens, config=cfg))
                            row(f"sweep paged16 {cfg}", ms, gb)
                        except Exception as e:  # noqa: BLE001 - a config that does not build is reported
                            print(f"sweep {cfg}: {type(e).__name__} {str(e)[:120]}")

    # a sliding window of 1024 over the same paged cache reads ~1/32 of it
    kc, vc, table = paged16
    f = lambda: fns["window_paged"][1](q, kc, vc, table, lens, window=1024)  # noqa: E731
    f()
    r = row("decode attngen paged 16, window 1024", do_bench(f), gb * 1024 / L)
    r["host_us"] = _host_us(f)
    r["sdpa_host_us"] = _host_us(lambda: torch.nn.functional.scaled_dot_product_attention(
        qs, ks[:, :, -1024:], vs[:, :, -1024:], enable_gqa=True))
    graph, out = _graphed(f)
    err = _replay_check(graph, out, f, [q, lens], g)
    row("decode attngen paged 16, window 1024 (CUDA graph)", do_bench(graph.replay), gb * 1024 / L,
        replay_vs_eager=err)
    del kc, vc, table, paged16, graph

    # ragged: lengths 100..32768 against the same batch padded to the longest
    lengths = torch.linspace(100, L, B, device=dev).long()
    lengths[-1] = L
    cu_r = torch.zeros(B + 1, dtype=torch.int32, device=dev)
    cu_r[1:] = lengths.cumsum(0)
    kr = torch.cat([k[b, : lengths[b]] for b in range(B)])
    vr = torch.cat([v[b, : lengths[b]] for b in range(B)])
    f = lambda: ragged(q3, kr, vr, cu_q, cu_r, max_seqlen_q=1, max_seqlen_k=L)  # noqa: E731
    f()
    ragged_gb = 2 * int(lengths.sum()) * Hkv * D * 2 / 1e9
    r = row("decode attngen ragged 100..32768", do_bench(f), ragged_gb)
    r["vs_padded_gbps"] = r["gbps"] / base["gbps"]
    r["host_us"] = _host_us(f)
    # the same batch in a padded cache (each sequence's keys at its own 32768 rows, its length given): what a
    # server without the ragged layout runs; split-KV there, so the longest sequence's programs finish last
    page = 256
    kc, vc = k.view(B * L // page, page, Hkv, D), v.view(B * L // page, page, Hkv, D)
    table = torch.arange(B * L // page, device=dev, dtype=torch.int32).view(B, L // page)
    fp = lambda: fns["causal_paged"][1](q, kc, vc, table, lengths.int())  # noqa: E731
    err = (fp().float().view(B, H, D) - f().float().view(B, H, D)).abs().max().item()
    rpad = row("decode attngen padded cache 100..32768 (paged 256, per-sequence lengths)", do_bench(fp), ragged_gb,
               max_err_vs_ragged=err)
    r["vs_padded_cache"] = rpad["ms"] / r["ms"]
    del kc, vc, table
    # the same two batches replayed from CUDA graphs: no flush, no host work
    graph_p, _ = _graphed(lambda: ragged(q3, k3, v3, cu_q, cu_k, max_seqlen_q=1, max_seqlen_k=L))
    graph_r, out = _graphed(f)
    err = _replay_check(graph_r, out, f, [q3], g)
    rp = row("decode attngen contiguous (CUDA graph)", do_bench(graph_p.replay), gb)
    rr = row("decode attngen ragged 100..32768 (CUDA graph)", do_bench(graph_r.replay), ragged_gb,
             replay_vs_eager=err)
    rr["vs_padded_gbps"] = rr["gbps"] / rp["gbps"]
    del graph_p, graph_r
    if sweep == "programs":  # stream-K's program count (default: two per SM, rounded to the kv heads)
        # replayed from CUDA graphs, as the batches above: kernel time without the host's share
        for n in (66, 132, 198, 264, 396, 528):
            graph_c, _ = _graphed(lambda: ragged(q3, kr, vr, cu_q, cu_r, max_seqlen_q=1, max_seqlen_k=L,
                                                 config={"PROGRAMS": n}))
            rc = row(f"sweep ragged PROGRAMS={n} (CUDA graph)", do_bench(graph_c.replay), ragged_gb)
            rc["vs_padded_gbps"] = rc["gbps"] / rp["gbps"]
            del graph_c

    # MLA decode: 16 heads over one latent head of 512 + 64 rope dims; values inside the keys
    Lm, Hm = 8192, 16
    kv = torch.randn(B, Lm, 1, 576, device=dev, dtype=dt, generator=g)
    kc, _, table = _pages(kv, kv, 64, g)
    qm = torch.randn(B, 1, Hm, 576, device=dev, dtype=dt, generator=g)
    lm = torch.full((B,), Lm, dtype=torch.int32, device=dev)
    f = lambda: fns["mla_paged"][1](qm, kc, kc[..., :512], table, lm)  # noqa: E731
    out = f()
    refm = torch.nn.functional.scaled_dot_product_attention(
        qm.transpose(1, 2).float(), kv.transpose(1, 2).float(), kv[..., :512].transpose(1, 2).float(),
        enable_gqa=True, scale=0.0721687836).transpose(1, 2)
    row("MLA decode attngen paged 64 (B8, H16, L8192, 576/512)", do_bench(f), B * Lm * 576 * 2 / 1e9,
        max_err=(out.float() - refm).abs().max().item())
    del kv, kc

    # chunked prefill: 512 new queries per sequence over an 8192-token paged cache, causal
    Lp, Qp = 8192, 512
    kp, vp = k[:, :Lp].contiguous(), v[:, :Lp].contiguous()
    kc, vc, table = _pages(kp, vp, 16, g)
    qp = torch.randn(B, Qp, H, D, device=dev, dtype=dt, generator=g)
    lp = torch.full((B,), Lp, dtype=torch.int32, device=dev)
    f = lambda: fns["causal_paged"][1](qp, kc, vc, table, lp)  # noqa: E731
    out = f()
    pos = torch.arange(Qp, device=dev).view(-1, 1) + Lp - Qp
    mask = pos >= torch.arange(Lp, device=dev).view(1, -1)
    refp = torch.nn.functional.scaled_dot_product_attention(qp.transpose(1, 2), kp.transpose(1, 2),
                                                            vp.transpose(1, 2), attn_mask=mask, enable_gqa=True)
    flops = 4 * B * H * D * float(mask.sum())
    ms = do_bench(f)
    row("chunked prefill attngen paged 16 (512 over 8192)", ms, 0, tflops=flops / ms / 1e9,
        max_err=(out.float() - refp.transpose(1, 2).float()).abs().max().item())
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--sweep", choices=["configs", "programs"], help="launch configs (paged 16) or stream-K programs")
    a = ap.parse_args()
    import triton

    info = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, date=time.strftime("%Y-%m-%d"))
    print(info, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "serving.attn").write_text(SPECS)
        fns = {k.name: (k, f) for k, f in compiled(Path(tmp) / "serving.attn", Path(tmp))}
        rows = [] if a.skip_correctness else correctness(fns)
        bench_rows = [] if a.skip_bench else bench(fns, a.sweep)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serving.json").write_text(json.dumps(dict(info=info, correctness=rows, bench=bench_rows), indent=1))
    fails = [r for r in rows if not r["ok"]]
    print(f"\n{len(rows) - len(fails)} passed, {len(fails)} failed")


if __name__ == "__main__":
    main()
