"""One device call: the correctness suite at real sizes, then first timings side by side.

    python benchmarks/gpu_check.py [--out DIR] [--skip-bench]

Correctness: every example at S=4096 against the interpreter with the fp64-calibrated
tolerance, forward and backward (dq, dk, dv, learnable inputs): bf16 at D=128 with GQA, fp16 at
D=64 with B=2 and GQA (the Gluon backward's deeper ring there); and where the Gluon forward cuts its
last round, two shapes that make it. Determinism of learnable-input
gradients. Timing (bf16, B=2, H=16, S=8192, D=128): attngen against SDPA (flash, cuDNN) and
torch.compile(flex_attention) on the same inputs, do_bench medians.
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

from attngen.verify import Shape, check, compiled, kernels_run  # noqa: E402

# (dtype, shape, check gradients): forward + backward at S=4096, bf16 at D=128 and fp16 at D=64
COMBOS = ((torch.bfloat16, Shape(1, 8, 2, 4096, 4096, 128, 128), True),
          (torch.float16, Shape(2, 8, 4, 4096, 4096, 64, 64), True))
# where every query sees every key, the Gluon forward cuts its last round into shares (_tail): on 132 SMs, 320 tiles
# (two whole rounds, then 56 tiles in 132 shares) and 192 (one whole round, then 60)
CUT_COMBOS = ((torch.bfloat16, Shape(1, 10, 2, 4096, 4096, 128, 128), True),
              (torch.float16, Shape(1, 6, 6, 4096, 4096, 64, 64), True))


def correctness(tmp: Path, only: str | None = None, config: dict | None = None) -> list[dict]:
    rows = []
    for spec in sorted((ROOT / "examples").glob("*.attn")):
        for kernel, fn in compiled(spec, tmp):
            if only and kernel.name not in only.split(","):
                continue
            cuts = hasattr(sys.modules[fn.__module__], "_tail")
            for dtype, shape, grad in COMBOS + (CUT_COMBOS if cuts else ()):
                t0 = time.time()
                with kernels_run(fn) as kernels:  # which ran: Gluon (*_sm90_kernel) or Triton
                    r = check(kernel, fn, shape, dtype, torch.device("cuda"), seed=len(rows), config=config,
                              grad=grad, repeat=2)
                rows.append(dict(name=r.name, dtype=r.dtype, shape=r.shape, grad=grad, errors=r.errors, ok=r.ok,
                                 why=r.why, kernels=kernels))
                print(f"{'ok  ' if r.ok else 'FAIL'} {r.name:16s} {r.dtype:8s} {r.shape:30s} {r.line()} "
                      f"{time.time() - t0:.1f}s {r.why}", flush=True)
                torch.cuda.empty_cache()
    return rows


SPECIAL = """
attention big_offsets { layout bshd }
attention empty_rows { mask q_idx % 3 != 0 and q_idx >= kv_idx }
attention neg_inf_score { score -inf if kv_idx > q_idx or q_idx == 5 else score }
attention big_logits { score score * 64.0 }
"""


def numerics(tmp: Path) -> list[dict]:
    """Hardening at real sizes: fully masked rows, -inf scores, large logits in fp16, and a [B, S, H, D]
    tensor of more than 2**31 elements (64-bit offsets), the last checked against SDPA."""
    spec = tmp / "special.attn"
    spec.write_text(SPECIAL)
    fns = {k.name: (k, f) for k, f in compiled(spec, tmp)}
    rows = []
    for name in ("empty_rows", "neg_inf_score", "big_logits"):
        kernel, fn = fns[name]
        for dtype in (torch.float16, torch.bfloat16):
            r = check(kernel, fn, Shape(1, 8, 8, 4096, 4096, 128, 128), dtype, torch.device("cuda"), grad=True,
                      repeat=2)
            rows.append(dict(name=name, dtype=r.dtype, ok=r.ok, why=r.why, errors=r.errors))
            print(f"{'ok  ' if r.ok else 'FAIL'} {name:14s} {r.dtype:8s} {r.line()} {r.why}", flush=True)
    _, fn = fns["big_offsets"]
    H, D, sk, sq = 16, 128, 2**20 + 64, 256  # K and V: 2**31 + 2**17 elements each
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, sq, H, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    k = torch.randn(1, sk, H, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    v = torch.randn(1, sk, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    out = fn(q, k, v)
    do = torch.randn_like(out)
    out.backward(do)
    ref = torch.nn.functional.scaled_dot_product_attention(  # bf16: an fp32 copy would need ~50 GB
        q.detach().transpose(1, 2), k.detach().transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    err = (out.float() - ref).abs().max().item()
    row = dict(name="big_offsets", elements=k.numel(), out_err=err, dk_finite=bool(torch.isfinite(k.grad).all()),
               dk_last_rows_nonzero=bool(k.grad[0, -64:].abs().sum() > 0))
    row["ok"] = err < 2e-2 and row["dk_finite"] and row["dk_last_rows_nonzero"]
    print(row, flush=True)
    rows.append(row)
    return rows


def determinism(tmp: Path) -> dict:
    """Learnable-input gradients twice: default (atomics) and deterministic mode."""
    spec = ROOT / "examples" / "relative_bias.attn"
    (kernel, fn), = compiled(spec, tmp)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 16, 4096, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    bias = torch.randn(16, 65, device="cuda", generator=g)
    out = {}
    for det in (False, True):
        grads = []
        for _ in range(2):
            b = bias.clone().requires_grad_()
            fn(q, k, v, b, deterministic=det).float().square().sum().backward()
            grads.append(b.grad)
        out["deterministic" if det else "default"] = bool(torch.equal(grads[0], grads[1]))
    print("bit-identical bias gradients across two runs:", out, flush=True)
    return out


def bench(tmp: Path) -> list[dict]:
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from attngen.runtime import compile_file, import_path

    B, H, S, D = 2, 16, 8192, 128
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=dt, generator=g) for _ in range(3))
    torch._dynamo.config.recompile_limit = 64  # one process times many variants, with and without grad
    docs = torch.sort(torch.randint(0, 16, (B, S), device=dev, generator=g), dim=-1).values.int()

    def fn_of(example, name=None):
        path = compile_file(ROOT / "examples" / f"{example}.attn", tmp / "bench")[0]
        mod = import_path(path, f"bench_{example}")
        return getattr(mod, name or example)

    rows = []
    variants = [
        ("full", "full", {}, None, lambda b, h, qi, ki: qi >= 0, False),
        ("causal", "causal", {}, None, lambda b, h, qi, ki: qi >= ki, True),
        ("sliding 1024", "sliding_window", {"window": 1024}, None,
         lambda b, h, qi, ki: (qi >= ki) & (qi - ki < 1024), None),
        ("softcap 30", "softcap", {"cap": 30.0}, lambda s, b, h, qi, ki: 30.0 * torch.tanh(s / 30.0),
         lambda b, h, qi, ki: qi >= ki, None),
        ("document 16", "document", {"doc_id": docs}, None,
         lambda b, h, qi, ki: (docs[b, qi] == docs[b, ki]) & (qi >= ki), None),
    ]
    for label, example, kw, score_mod, mask_mod, sdpa_causal in variants:
        flex = torch.compile(flex_attention, dynamic=False)  # a fresh cache per variant
        fn = fn_of(example)
        bm = create_block_mask(mask_mod, B, 1, S, S, device=dev)
        density = 1.0 - bm.sparsity() / 100.0
        flops = 4 * B * H * S * S * D
        ours = fn(q, k, v, **kw)
        ref = flex(q, k, v, score_mod=score_mod, block_mask=bm)
        diff = (ours.float() - ref.float()).abs().max().item()
        t_ours = triton.testing.do_bench(lambda: fn(q, k, v, **kw), return_mode="median")
        t_flex = triton.testing.do_bench(lambda: flex(q, k, v, score_mod=score_mod, block_mask=bm),
                                         return_mode="median")
        row = dict(variant=label, density=density, attngen_ms=t_ours, flex_ms=t_flex, max_diff_vs_flex=diff)
        qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
        do = torch.randn_like(q)

        def fb(f):
            def run():
                qg.grad = kg.grad = vg.grad = None
                f().backward(do)
            return run
        t_ours_b = triton.testing.do_bench(fb(lambda: fn(qg, kg, vg, **kw)), return_mode="median")
        t_flex_b = triton.testing.do_bench(fb(lambda: flex(qg, kg, vg, score_mod=score_mod, block_mask=bm)),
                                           return_mode="median")
        row.update(attngen_fb_ms=t_ours_b, flex_fb_ms=t_flex_b)
        if sdpa_causal is not None:
            for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
                try:
                    with sdpa_kernel(backend):
                        f = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=sdpa_causal)  # noqa: E731
                        f()
                        row[f"{name}_ms"] = triton.testing.do_bench(f, return_mode="median")
                except RuntimeError as e:
                    row[f"{name}_ms"] = None
                    print(f"{name}: {e}")
        for key in [k for k in row if k.endswith("_ms")]:
            if row[key]:
                f = flops * (3.5 if "_fb_" in key else 1.0)  # fwd + bwd = 1 + 2.5 fwd
                row[key.replace("_ms", "_tflops")] = f * density / row[key] / 1e9
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--numerics", action="store_true", help="hardening checks at real sizes")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--only", help="one spec name")
    ap.add_argument("--config", type=json.loads, help='launch overrides, e.g. {"num_stages": 1}')
    a = ap.parse_args()
    import triton

    info = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, date=time.strftime("%Y-%m-%d"))
    print(info)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [] if a.skip_correctness else correctness(Path(tmp), a.only, a.config)
        det = determinism(Path(tmp))
        num = numerics(Path(tmp)) if a.numerics else []
        bench_rows = [] if a.skip_bench else bench(Path(tmp))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result = dict(info=info, correctness=rows, determinism=det, numerics=num, bench=bench_rows)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    fails = [r for r in rows if not r["ok"]]
    print(f"\n{len(rows) - len(fails)} passed, {len(fails)} failed")
    for r in bench_rows:
        print(f"{r['variant']:14s} dens {r['density']:.2f} attngen {r.get('attngen_tflops', 0):6.0f} TF/s "
              f"flex {r.get('flex_tflops', 0):6.0f} cudnn {r.get('cudnn_tflops') or 0:6.0f} "
              f"flash {r.get('flash_tflops') or 0:6.0f}  vs flex {r['flex_ms'] / r['attngen_ms']:.2f}  "
              f"fwd+bwd {r['attngen_fb_tflops']:5.0f} TF/s vs flex {r['flex_fb_ms'] / r['attngen_fb_ms']:.2f}")


if __name__ == "__main__":
    main()
