"""Backward launch-configuration sweep on the GPU, against FlexAttention (the dK/dV and dQ defaults of
`_bwd_config` come from here).

    python benchmarks/bwd_sweep.py [--out DIR] [--masks causal,full] [--budget-s 420] [--quick]

bf16, B=2, H=16, S=8192, D=128, masks from examples/causal.attn and examples/full.attn. Per mask:
  1. correctness: our forward + backward against torch SDPA (flash) and fp32 SDPA (math, on the first
     heads), in this process: our error against fp32 must stay within 2x flash's plus a floor;
  2. the forward alone (ours, default config), subtracted from every forward + backward time;
  3. the backward at its defaults and at the previous ones (64 x 64 tiles, 4 warps, 2 stages);
  4. FlexAttention: torch.compile(flex_attention) with create_block_mask, forward and forward + backward;
  5. the dK/dV kernel's configurations with dQ at its default, then dQ's with dK/dV at its default
     (a configuration that fails to build is skipped; each one's gradients are compared with the
     default's), then the best of each together.
Times: triton.testing.do_bench median (warmup=10, rep=50). Backward TFLOP/s = 2.5 x 4*B*H*S^2*D x density
over (forward + backward - forward). Everything measured goes to DIR/bwd_sweep.json ($OUT if set),
rewritten after each row so that a run cut short keeps its numbers; --budget-s stops the sweeps in
time (the whole run stays under 8 minutes on an H100 by default).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

B, H, S, D = 2, 16, 8192, 128
DENSITY = {"full": 1.0, "causal": 0.5}
DKDV = [dict(BLOCK_N=bn, BLOCK_M=bm, num_warps=w, num_stages=st)
        for bn, bm, w, st in itertools.product((64, 128), (32, 64), (4, 8), (2, 3, 4))]
DQ = [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
      for bm, bn, w, st in itertools.product((64, 128), (32, 64), (4, 8), (2, 3))]
OLD = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)  # both kernels, before per-kernel configs


class Recorder:
    """Rows of measurements, printed and written to the JSON file as they come."""

    def __init__(self, out: Path, meta: dict):
        self.path = out / "bwd_sweep.json"
        self.doc = dict(meta, rows=[], checks=[], checks_ok={}, best={})
        self.t0 = time.time()

    def add(self, kind: str, **row) -> dict:
        row = dict(kind=kind, t_s=round(time.time() - self.t0, 1), **row)
        self.doc["rows" if kind != "check" else "checks"].append(row)
        print(json.dumps(row), flush=True)
        self.save()
        return row

    def save(self) -> None:
        self.path.write_text(json.dumps(self.doc, indent=1))


def bench(f) -> float | None:
    """Median ms of f, or None if it fails (e.g. a configuration that does not build)."""
    import triton

    try:
        f()
        return triton.testing.do_bench(f, warmup=10, rep=50, return_mode="median")
    except Exception as e:  # noqa: BLE001 - out of resources, compile errors: skip the configuration
        print(f"  skipped: {type(e).__name__}: {str(e)[:160]}", flush=True)
        return None


def grads(fn, q, k, v, do, **kw):
    import torch

    out = fn(q, k, v, **kw)
    return torch.autograd.grad(out, (q, k, v), do)


def max_err(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


def check(name: str, fn, q, k, v, do, rec: Recorder, heads: int) -> bool:
    """Our output and gradients against SDPA: flash (bf16, all heads) and math in fp32 on the first
    `heads` heads (the golden). Ours must be within 2x flash's error against the golden + 1e-2 x scale."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    causal = name == "causal"
    ours = [fn(q, k, v).detach(), *grads(fn, q, k, v, do)]
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        fo = sdpa(q, k, v, is_causal=causal)
        flash = [fo.detach(), *torch.autograd.grad(fo, (q, k, v), do)]
    sub = (slice(0, 1), slice(0, heads))
    q32, k32, v32 = (t[sub].detach().float().requires_grad_() for t in (q, k, v))
    with sdpa_kernel([SDPBackend.MATH]):
        go = sdpa(q32, k32, v32, is_causal=causal)
        gold = [go.detach(), *torch.autograd.grad(go, (q32, k32, v32), do[sub].float())]
    ok = True
    for label, a, f, g in zip(("out", "dq", "dk", "dv"), ours, flash, gold):
        e, ef = max_err(a[sub], g), max_err(f[sub], g)
        bound = 2.0 * ef + 1e-2 * float(g.abs().max())
        full = max_err(a, f)  # all heads, against flash
        good = e <= bound
        ok &= good
        rec.add("check", variant=name, tensor=label, err_vs_fp32=e, flash_err_vs_fp32=ef, bound=bound,
                max_diff_vs_flash_all_heads=full, ok=good)
    del ours, flash, gold
    torch.cuda.empty_cache()
    return ok


def close(a: list, b: list) -> bool:
    """Gradients of two configurations agree to bf16 rounding of their accumulation orders."""
    return all(max_err(x, y) <= 2e-2 * max(float(y.float().abs().max()), 1e-6) for x, y in zip(a, b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for bwd_sweep.json (default $OUT or .)")
    ap.add_argument("--masks", default="causal,full", help="comma-separated: causal, full")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="stop starting new sweep configurations after this many seconds (default 420)")
    ap.add_argument("--quick", action="store_true", help="a few configurations per kernel (smoke test)")
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    ap.add_argument("--check-heads", type=int, default=2, help="heads checked against fp32 SDPA (default 2)")
    a = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        sys.exit("bwd_sweep.py needs a CUDA GPU")
    import triton

    from attngen.verify import compiled

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    masks = [m for m in a.masks.split(",") if m]
    rec = Recorder(out, dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                             shape=dict(B=B, H=H, S=S, D=D, dtype="bfloat16"), masks=masks))
    dkdv_cfgs, dq_cfgs = (DKDV[::6], DQ[::4]) if a.quick else (DKDV, DQ)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    dense_flops = 4 * B * H * S * S * D
    tmp = Path(tempfile.mkdtemp(prefix="bwd_sweep_"))
    fns, base, fwd_ms = {}, {}, {}

    def tflops(name: str, ms: float | None) -> float | None:
        return None if ms is None or ms <= fwd_ms[name] else \
            2.5 * dense_flops * DENSITY[name] / (ms - fwd_ms[name]) / 1e9

    def step(name: str, cfg: dict | None):
        fn = fns[name]
        return lambda: grads(fn, q, k, v, do, config=cfg)

    def measure(kind: str, name: str, cfg: dict | None, **extra) -> dict:
        ms = bench(step(name, cfg))
        row = rec.add(kind, variant=name, config=cfg, fwd_bwd_ms=ms, bwd_ms=None if ms is None else ms - fwd_ms[name],
                      bwd_tflops=tflops(name, ms), **extra)
        return row

    # 1-4: correctness, forward, defaults, the previous defaults, FlexAttention
    for name in masks:
        (_, fn), = compiled(ROOT / "examples" / f"{name}.attn", tmp)
        fns[name] = fn
        rec.doc["checks_ok"][name] = check(name, fn, q, k, v, do, rec, a.check_heads)
        with torch.no_grad():
            fwd_ms[name] = bench(lambda: fn(q, k, v))
        rec.add("fwd", variant=name, ms=fwd_ms[name],
                tflops=dense_flops * DENSITY[name] / fwd_ms[name] / 1e9 if fwd_ms[name] else None)
        base[name] = [t.detach() for t in step(name, None)()]
        measure("default", name, None)
        measure("old", name, {"bwd": OLD})
        if not a.no_flex:
            flex(name, q, k, v, do, rec, dense_flops)

    # 5: per-kernel sweeps (the other kernel at its default), interleaved so that a run cut short by
    # the time budget has covered both kernels and both masks about equally
    best = {}
    jobs = []
    for i in range(max(len(dkdv_cfgs), len(dq_cfgs))):
        for kern, cfgs in (("dkdv", dkdv_cfgs), ("dq", dq_cfgs)):
            if i < len(cfgs):
                jobs += [(kern, name, cfgs[i]) for name in masks]
    for kern, name, c in jobs:
        if time.time() - rec.t0 > a.budget_s:
            rec.doc.setdefault("cut_short", []).append(dict(kernel=kern, variant=name, config=c))
            continue
        cfg = {kern: c}
        try:
            same = close([t.detach() for t in step(name, cfg)()], base[name])
        except Exception as e:  # noqa: BLE001 - does not build: skip
            print(f"  skipped {kern} {c}: {type(e).__name__}: {str(e)[:160]}", flush=True)
            rec.add("sweep", kernel=kern, variant=name, config=c, fwd_bwd_ms=None, error=str(e)[:200])
            continue
        row = measure("sweep", name, cfg, kernel=kern, grads_match_default=same)
        ms = row["fwd_bwd_ms"]
        if ms is not None and same and ms < best.get((kern, name), (1e30,))[0]:
            best[(kern, name)] = (ms, c)
    for name in masks:
        choice = {kern: best[(kern, name)][1] for kern in ("dkdv", "dq") if (kern, name) in best}
        rec.doc["best"][name] = choice
        if choice:
            measure("best", name, choice)
    rec.save()
    for r in rec.doc["rows"]:
        if r["kind"] in ("default", "old", "best", "flex"):
            print(f"{r['kind']:8s} {r['variant']:7s} bwd {r.get('bwd_tflops') or 0:6.1f} TFLOP/s  {r.get('config')}")
    print("checks ok:", rec.doc["checks_ok"], " best:", rec.doc["best"])
    print("written", rec.path)


def flex(name: str, q, k, v, do, rec: Recorder, dense_flops: int) -> None:
    """torch.compile(flex_attention) with create_block_mask (None for the full mask): forward alone,
    forward + backward, and the backward's TFLOP/s from their difference."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    try:
        fx = torch.compile(flex_attention, dynamic=False)
        bm = None
        if name == "causal":
            bm = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, S, S, device="cuda")
        with torch.no_grad():
            fwd = bench(lambda: fx(q, k, v, block_mask=bm))

        def fb():
            out = fx(q, k, v, block_mask=bm)
            return torch.autograd.grad(out, (q, k, v), do)
        both = bench(fb)
    except Exception as e:  # noqa: BLE001
        rec.add("flex", variant=name, error=f"{type(e).__name__}: {str(e)[:200]}")
        return
    bwd = None if fwd is None or both is None else both - fwd
    rec.add("flex", variant=name, fwd_ms=fwd, fwd_bwd_ms=both, bwd_ms=bwd,
            fwd_tflops=dense_flops * DENSITY[name] / fwd / 1e9 if fwd else None,
            bwd_tflops=2.5 * dense_flops * DENSITY[name] / bwd / 1e9 if bwd else None)


if __name__ == "__main__":
    main()
