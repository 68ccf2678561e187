"""Runtime block maps on the GPU: the cost of building one (attngen's map kernel against Flex's
eager and compiled create_block_mask) and the document mask's attention with a prebuilt map, a
map built per call, and the sympy ranges alone (BLOCK_MAP off), against FlexAttention.

    python benchmarks/blockmap.py [--S 8192] [--docs 16]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    import triton
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from attngen.runtime import compile_file, import_path

    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=2)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--S", type=int, default=8192)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--docs", type=int, default=16)
    a = ap.parse_args()
    B, H, S, D, dev = a.B, a.H, a.S, a.D, "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
    docs = torch.sort(torch.randint(0, a.docs, (B, S), device=dev, generator=g), dim=-1).values.int()
    with tempfile.TemporaryDirectory() as tmp:
        path = compile_file(ROOT / "examples" / "document.attn", tmp)[0]
        fn = import_path(path, "bench_blockmap_document").document

        def mask_mod(b, h, qi, ki):
            return (docs[b, qi] == docs[b, ki]) & (qi >= ki)

        bench = lambda f: triton.testing.do_bench(f, return_mode="median")  # noqa: E731
        row = dict(B=B, H=H, S=S, D=D, docs=a.docs)
        row["attngen_map_ms"] = bench(lambda: fn.block_map(q, k, v, docs))
        row["flex_eager_mask_ms"] = bench(lambda: create_block_mask(mask_mod, B, 1, S, S, device=dev, _compile=False))
        row["flex_compiled_mask_ms"] = bench(lambda: create_block_mask(mask_mod, B, 1, S, S, device=dev, _compile=True))
        bmap = fn.block_map(q, k, v, docs)
        bm = create_block_mask(mask_mod, B, 1, S, S, device=dev)
        flex = torch.compile(flex_attention, dynamic=False)
        diff = (fn(q, k, v, docs, block_map=bmap).float() - flex(q, k, v, block_mask=bm).float()).abs().max()
        row["max_diff_vs_flex"] = float(diff)
        row["fwd_prebuilt_map_ms"] = bench(lambda: fn(q, k, v, docs, block_map=bmap))
        row["fwd_map_per_call_ms"] = bench(lambda: fn(q, k, v, docs))
        row["fwd_no_map_ms"] = bench(lambda: fn(q, k, v, docs, config={"BLOCK_MAP": False}))
        row["fwd_flex_ms"] = bench(lambda: flex(q, k, v, block_mask=bm))
        qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
        do = torch.randn_like(q)

        def fb(f):
            def run():
                qg.grad = kg.grad = vg.grad = None
                f().backward(do)
            return run
        row["fb_prebuilt_map_ms"] = bench(fb(lambda: fn(qg, kg, vg, docs, block_map=bmap)))
        row["fb_flex_ms"] = bench(fb(lambda: flex(qg, kg, vg, block_mask=bm)))
        row["map_speedup_vs_flex_eager"] = row["flex_eager_mask_ms"] / row["attngen_map_ms"]
        row["fwd_vs_flex"] = row["fwd_flex_ms"] / row["fwd_prebuilt_map_ms"]
        row["fb_vs_flex"] = row["fb_flex_ms"] / row["fb_prebuilt_map_ms"]
        print(repr(bmap))
        print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
