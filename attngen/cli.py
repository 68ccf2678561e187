"""`attngen compile | check | verify`: the command line. Spec errors exit 2 with no traceback."""

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
