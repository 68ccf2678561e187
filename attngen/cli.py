"""`attngen compile | check | verify | tune`: the command line. Spec errors exit 2 with no traceback."""

from __future__ import annotations

import argparse
import sys

from .errors import AttnError


def _cmd_compile(a) -> int:
    from .runtime import compile_file

    if a.emit == "ir":
        from . import load_kernels
        from .analyze import plan, simplify
        from .codegen import _describe
        from .ir import dump

        for k in load_kernels(a.spec, a.layout).values():
            print(dump(k))
            s = simplify(k)
            print(f"  after sympy: mask  = {s.mask!r}")
            print(f"  after sympy: score = {s.score!r}")
            p = plan(k, sparse=not a.dense)
            print(f"  logit (log2 units) = {p.logit!r}")
            if p.split:
                print(f"  split logit: c = {p.split.qk!r}, key = {p.split.key!r}, shift = {p.split.shift!r}")
            for i, seg in enumerate(p.segments):
                print(f"  segment {i}: {_describe(seg)}")
            for note in p.notes:
                print(f"  note: {note}")
        return 0
    for path in compile_file(a.spec, a.output, sparse=not a.dense, layout=a.layout):
        print(path)
    return 0


def _cmd_check(a) -> int:
    from . import load_kernels

    for spec in a.specs:
        names = ", ".join(load_kernels(spec))
        print(f"{spec}: ok ({names})")
    return 0


def _cmd_verify(a) -> int:
    from .verify import main

    return main(a.paths, dtypes=a.dtype, quick=a.quick)


def _cmd_tune(a) -> int:
    import json

    import torch

    from . import load, load_kernels
    from .autotune import tune
    from .verify import Shape, make_inputs

    kernels = load_kernels(a.spec)
    name = a.name or next(iter(kernels))
    if name not in kernels:
        raise AttnError(f"{a.spec}: no spec named {name!r} (have {', '.join(kernels)})")
    kernel = kernels[name]
    if kernel.layout.kind in ("paged", "ragged"):
        print(f"error: {name}: the {kernel.layout.kind} layout is not tuned (its splits follow the batch)",
              file=sys.stderr)
        return 2
    try:
        B, H, Hkv, S, D = (int(x) for x in a.shape.split(","))
    except ValueError:
        print(f"error: --shape {a.shape!r}: expected B,H,H_KV,S,D (five integers)", file=sys.stderr)
        return 2
    params = {p.name: p.default for p in kernel.params if p.default is not None}
    kinds = {p.name: p.type.value for p in kernel.params}
    for item in a.param or []:
        key, _, val = item.partition("=")
        if key not in kinds or not val:
            print(f"error: --param {item!r}: expected NAME=VALUE with NAME one of {sorted(kinds)}", file=sys.stderr)
            return 2
        params[key] = {"int": int, "float": float, "bool": lambda x: x.lower() in ("1", "true")}[kinds[key]](val)
    missing = [n for n in kinds if n not in params]
    if missing:
        print(f"error: {name}: param {missing[0]} has no default: pass --param {missing[0]}=VALUE", file=sys.stderr)
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = Shape(B, H, Hkv, S, S, D, D).fit(kernel)
    q, k, v, inputs = make_inputs(kernel, shape, getattr(torch, a.dtype), device, seed=0)
    if not a.fwd_only:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    try:
        cfg = tune(load(a.spec, name), q, k, v, *inputs.values(), backward=not a.fwd_only, verbose=a.verbose,
                   **params)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(cfg))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="attngen", description="Compile .attn specs to Triton kernels.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compile", help="write one Python module per spec")
    c.add_argument("spec")
    c.add_argument("-o", "--output", default=".", help="output folder (default: .)")
    c.add_argument("--emit", choices=["py", "ir"], default="py", help="ir: print the IR and the plan")
    c.add_argument("--dense", action="store_true", help="switch off the block-sparsity analysis")
    c.add_argument("--layout", help="compile for this layout instead of the spec's (bhsd, bshd, paged, ragged)")
    c.set_defaults(fn=_cmd_compile)
    k = sub.add_parser("check", help="parse and type-check specs")
    k.add_argument("specs", nargs="+")
    k.set_defaults(fn=_cmd_check)
    v = sub.add_parser("verify", help="compile examples and check them against the interpreter")
    v.add_argument("paths", nargs="*", default=["examples"])
    v.add_argument("--dtype", action="append", help="float16, bfloat16, float32 (repeatable)")
    v.add_argument("--quick", action="store_true", help="one small shape per spec")
    v.set_defaults(fn=_cmd_verify)
    t = sub.add_parser("tune", help="time launch configurations on the GPU; prints the fastest as config JSON")
    t.add_argument("spec")
    t.add_argument("--name", help="which spec of the file (default: the first)")
    t.add_argument("--shape", required=True, help="B,H,H_KV,S,D (q and k of length S, random inputs)")
    t.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    t.add_argument("--param", action="append", help="NAME=VALUE for a spec param (repeatable; default: its default)")
    t.add_argument("--fwd-only", action="store_true", help="tune the forward kernel only")
    t.add_argument("-v", "--verbose", action="store_true", help="print each candidate's time")
    t.set_defaults(fn=_cmd_tune)
    a = ap.parse_args(argv)
    try:
        return a.fn(a)
    except AttnError as e:
        print(e, file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"error: {e.filename or e}: no such file", file=sys.stderr)
        return 2
    except Exception as e:  # a compiler bug: say so plainly, without a traceback
        print(f"attngen: internal error ({type(e).__name__}: {e}); please report it with the spec",
              file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
