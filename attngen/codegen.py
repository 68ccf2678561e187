"""Stage 4: IR + plan -> Python/Triton source through the Jinja templates."""

from __future__ import annotations

from functools import cache

import jinja2

from . import __version__
from .analyze import Plan, Segment, plan
from .ir import Kernel, Node
from .printer import PythonPrinter, TritonPrinter, input_args, literal, param_name
from .resources import resource_dir

_KERNEL_VARS = {v: v for v in ("b", "h", "q_idx", "kv_idx", "q_len", "kv_len", "qk", "sm_scale")}
_TYPE_SIG = {"int": "i32", "float": "fp32", "bool": "i32"}
_PTR_SIG = {"bool": "*i1", "int8": "*i8", "uint8": "*u8", "int16": "*i16", "int32": "*i32",
            "int64": "*i64", "float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32",
            "float64": "*fp64"}
py = PythonPrinter()


@cache
def _env() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(resource_dir("templates"))),
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                              trim_blocks=False, lstrip_blocks=False, autoescape=False)


def _nest(fn: str, xs: list[str]) -> str:
    out = xs[0]
    for x in xs[1:]:
        out = f"{fn}({out}, {x})"
    return out


def _segment_lines(k: Kernel, i: int, seg: Segment, helpers: set[str]) -> tuple[list[str], str]:
    """Scalar code computing segment i's element range (lo..hi), full range (flo..fhi) and blocks."""
    p0 = TritonPrinter(k, {**_KERNEL_VARS, "q_idx": "q0"}, prefix=f"a{i}_")
    p1 = TritonPrinter(k, {**_KERNEL_VARS, "q_idx": "q1"}, prefix=f"z{i}_")

    def at(n: Node, end: int) -> str:
        return (p0 if end == 0 else p1)(n)

    # a bound f(q) monotone in q takes its extremes over q0..q1 at the ends; direction says which
    lo = _nest("tl.maximum", ["0"] + [at(n, d < 0) for n, d in seg.lo])
    flo = _nest("tl.maximum", ["0"] + [at(n, d > 0) for n, d in seg.lo])
    hi = _nest("tl.minimum", ["kv_len - 1"] + [at(n, d > 0) for n, d in seg.hi])
    fhi = _nest("tl.minimum", ["kv_len - 1"] + [at(n, d < 0) for n, d in seg.hi])
    on = [p0(g) for g in seg.guards]
    full = [] if not seg.residual else ["False"]
    for a in seg.q_atoms:
        x, y = at(a, 0), at(a, 1)
        on.append(f"({x} | {y})")
        full.append(f"({x} & {y})")
    for pr in (p0, p1):
        helpers |= pr.helpers
    lines = p0.lines + p1.lines + [f"lo{i} = {lo}", f"hi{i} = {hi}", f"flo{i} = {flo}",
                                   f"fhi{i} = {fhi}", f"blo{i} = lo{i} // BLOCK_N"]
    cond = " & ".join(on + [f"(hi{i} >= lo{i})"])
    lines.append(f"bhi{i} = tl.where({cond}, (hi{i} + BLOCK_N) // BLOCK_N, blo{i})")
    lines.append(f"fblo{i} = (flo{i} + BLOCK_N - 1) // BLOCK_N")
    if "False" in full:
        lines.append(f"fbhi{i} = fblo{i}  # residual atoms: every block is partial")
    elif full:
        lines.append(f"fbhi{i} = tl.where({' & '.join(full)}, tl.maximum(fhi{i} + 1, 0) // BLOCK_N, fblo{i})")
    else:
        lines.append(f"fbhi{i} = tl.maximum(fhi{i} + 1, 0) // BLOCK_N")
    doc = _describe(seg)
    return lines, doc


def _describe(seg: Segment) -> str:
    lo = ", ".join(py(n) for n, _ in seg.lo) or "0"
    hi = ", ".join(py(n) for n, _ in seg.hi) or "kv_len - 1"
    lo = f"max({lo})" if len(seg.lo) > 1 else lo
    hi = f"min({hi})" if len(seg.hi) > 1 else hi
    s = f"kv_idx in [{lo}, {hi}]"
    conds = [py(n) for n in seg.guards + seg.q_atoms]
    if conds:
        s += " where " + " and ".join(conds)
    if seg.residual:
        s += "; every block partial (mask checked per element)"
    return s


def _range_map(ranges: list[tuple[str, str]], name: str) -> tuple[list[str], list[str]]:
    """Code before the loop (cumulative starts, and the count `n_{name}`) and inside it (the map from
    counter j to a block index) for a concatenation of [lo, hi) ranges; empty ones fall through."""
    pre, body = [], [f"blk = {ranges[0][0]} + j"]
    done = f"({ranges[0][1]} - {ranges[0][0]})"
    for r, (lo, hi) in enumerate(ranges[1:], 1):
        pre.append(f"{name}{r} = {done}")
        body.append(f"blk = tl.where(j >= {name}{r}, {lo} + (j - {name}{r}), blk)")
        done = f"{name}{r} + ({hi} - {lo})"
    pre.append(f"n_{name} = {done}")
    return pre, body


def _swaps(n: int) -> list[tuple[int, int]]:
    """A bubble-sort network over n segments (n is at most analyze.MAX_SEGMENTS)."""
    return [(j, j + 1) for i in range(n - 1) for j in range(n - 1 - i)]


def render(k: Kernel, sparse: bool = True, the_plan: Plan | None = None) -> str:
    """The generated module's source for one kernel."""
    pl = the_plan or plan(k, sparse=sparse)
    helpers: set[str] = set()
    mp = TritonPrinter(k, _KERNEL_VARS, prefix="m")
    mask_expr = "kv_idx < kv_len" if pl.mask is None else f"{mp(pl.mask)} & (kv_idx < kv_len)"
    lp = TritonPrinter(k, _KERNEL_VARS, prefix="s")
    logit_expr = lp(pl.logit)
    helpers |= mp.helpers | lp.helpers
    segs = []
    for i, seg in enumerate(pl.segments):
        lines, doc = _segment_lines(k, i, seg, helpers)
        segs.append({"lines": lines, "doc": doc})
    n = len(segs)
    if n:
        partial = _range_map([r for i in range(n) for r in ((f"s{i}", f"f{i}"), (f"g{i}", f"e{i}"))],
                             "partial")
        full = _range_map([(f"f{i}", f"g{i}") for i in range(n)], "full")
    else:  # the mask is always false: nothing to visit
        partial = (["n_partial = 0"], ["blk = j"])
        full = (["n_full = 0"], ["blk = j"])
    extra = [param_name(p.name) for p in k.params]
    host_extra = [f"{_cast(p.type.value)}({p.name})" for p in k.params]
    kernel_args = ["Q:*q", "K:*q", "V:*q", "Out:*q", "Lse:*fp32", "Trace:*i32"]
    for t, dims in (("q", "bhmd"), ("k", "bhnd"), ("v", "bhnd"), ("o", "bhmd")):
        kernel_args += [f"stride_{t}{d}:i32" for d in dims]
    kernel_args += ["q_len:i32", "kv_len:i32", "H:i32", "GROUP:i32", "sm_scale:fp32"]
    kernel_args += [f"{param_name(p.name)}:{_TYPE_SIG[p.type.value]}" for p in k.params]
    for inp in k.inputs:
        names = input_args(inp.name, len(inp.shape))
        extra += names
        host_extra += [inp.name, f"*{inp.name}.stride()", f"*{inp.name}.shape"]
        kernel_args += [f"{names[0]}:{_PTR_SIG[inp.dtype]}"] + [f"{n}:i32" for n in names[1:]]
    shape_doc = {"bhsd": ("[B, H, S_q, D_qk]", "[B, H_kv, S_kv, D_qk]", "[B, H_kv, S_kv, D_v]",
                          "[B, H, S_q, D_v]"),
                 "bshd": ("[B, S_q, H, D_qk]", "[B, S_kv, H_kv, D_qk]", "[B, S_kv, H_kv, D_v]",
                          "[B, S_q, H, D_v]")}[k.layout.kind]
    notes = [f"segment {i}: {s['doc']}" for i, s in enumerate(segs)] or ["none: the mask is always false"]
    notes += list(pl.notes)
    ctx = dict(
        name=k.name, version=__version__, file=k.file, spec_source=k.source,
        kernel_name=f"_{k.name}_fwd_kernel", helpers=sorted(helpers),
        extra_params="".join(f", {a}" for a in extra), host_extra=host_extra,
        mask_src=py(pl.mask) if pl.mask is not None else "(none)",
        score_src=py(k.score) if k.score is not None else "score",
        mask_lines=mp.lines, mask_expr=mask_expr, logit_lines=lp.lines, logit_expr=logit_expr,
        segments=segs, swaps=_swaps(len(segs)), plan_notes=notes,
        partial_pre=partial[0], partial_map=partial[1], full_pre=full[0], full_map=full[1],
        params=[{"name": p.name, "type": p.type.value,
                 "default": None if p.default is None else literal(p.default)} for p in k.params],
        inputs=[i.name for i in k.inputs],
        inputs_doc={i.name: f"{i.dtype}[{', '.join(py(d) for d in i.shape)}]" for i in k.inputs},
        params_table=_table({p.name: (p.type.value, p.default) for p in k.params}),
        inputs_table=_inputs_table(k),
        heads_q=k.heads_q, heads_kv=k.heads_kv, layout=k.layout.kind,
        layout_doc=shape_doc[0], shape_q=shape_doc[0], shape_k=shape_doc[1], shape_v=shape_doc[2],
        shape_out=shape_doc[3],
        scale_expr=py(k.scale) if k.scale is not None else "1.0 / math.sqrt(Dqk)",
        scale_doc=f"spec: {py(k.scale)}" if k.scale is not None else "default 1/sqrt(D_qk)",
        kernel_args=repr(kernel_args),
    )
    return _env().get_template("forward.py.jinja").render(**ctx)


def _cast(t: str) -> str:
    return {"int": "int", "float": "float", "bool": "int"}[t]


def _table(d: dict) -> str:
    if not d:
        return "{}"
    items = ", ".join(f"{k!r}: ({t!r}, {literal(v) if v is not None else None})" for k, (t, v) in d.items())
    return "{" + items + "}"


def _inputs_table(k: Kernel) -> str:
    """Input name -> (dtype, shape as strings, shape as a function of the call's sizes)."""
    if not k.inputs:
        return "{}"
    rows = []
    for i in k.inputs:
        dims = [py(d) for d in i.shape]
        fn = f"lambda b, h, h_kv, q_len, kv_len: ({', '.join(dims)},)"
        rows.append(f"    {i.name!r}: ({i.dtype!r}, {dims!r}, {fn}),")
    return "{\n" + "\n".join(rows) + "\n}"


def compile_source(source: str, file: str = "<spec>", sparse: bool = True) -> dict[str, str]:
    """Spec text -> {kernel name: module source}."""
    from .lower import lower
    from .parse import parse

    return {k.name: render(k, sparse) for k in lower(parse(source, file))}

