"""Stage 4: IR + plan -> Python/Triton source through the Jinja templates."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import jinja2

from . import __version__
from .analyze import Plan, Segment, plan
from .ir import LAYOUTS, SERVING, Kernel, Node, Op
from .printer import PythonPrinter, TritonPrinter, input_args, literal, param_name
from .resources import resource_dir
from .rewrite import RESIDUE, rewrite
from .runtime import writable_cache

_KERNEL_VARS = {v: v for v in ("b", "h", "q_idx", "kv_idx", "q_len", "kv_len", "qk", "sm_scale", "kv0")}
_TYPE_SIG = {"int": "i32", "float": "fp32", "bool": "i32"}
_PTR_SIG = {"bool": "*i1", "int8": "*i8", "uint8": "*u8", "int16": "*i16", "int32": "*i32",
            "int64": "*i64", "float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32",
            "float64": "*fp64"}
py = PythonPrinter()


@cache
def _env() -> jinja2.Environment:
    # compiled templates are kept in the user's cache (Jinja checks each against its source)
    folder = writable_cache("jinja")
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(resource_dir("templates"))),
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                              trim_blocks=False, lstrip_blocks=False, autoescape=False,
                              bytecode_cache=jinja2.FileSystemBytecodeCache(str(folder)) if folder else None)


def _nest(fn: str, xs: list[str]) -> str:
    out = xs[0]
    for x in xs[1:]:
        out = f"{fn}({out}, {x})"
    return out


@dataclass(frozen=True)
class Side:
    """Names for one orientation of the block loops: rows are the program's own block, columns
    are visited. Forward and dQ: rows are queries. dK/dV: rows are keys."""

    row_var: str = "q_idx"
    ends: tuple[str, str] = ("q0", "q1")
    n_col: str = "kv_len"
    col_block: str = "BLOCK_N"


FWD = Side()
BWD = Side("kv_idx", ("k0", "k1"), "q_len", "BLOCK_M")


def _segment_lines(k: Kernel, i: int, seg: Segment, helpers: set[str], side: Side) -> list[str]:
    """Scalar code computing segment i's column range (lo..hi), full range (flo..fhi) and blocks."""
    p0 = TritonPrinter(k, {**_KERNEL_VARS, side.row_var: side.ends[0]}, prefix=f"a{i}_")
    p1 = TritonPrinter(k, {**_KERNEL_VARS, side.row_var: side.ends[1]}, prefix=f"z{i}_")

    def at(n: Node, end: int) -> str:
        return (p0 if end == 0 else p1)(n)

    # a bound f(row) monotone in row takes its extremes over the block's rows at the ends
    last, nb = f"{side.n_col} - 1", side.col_block
    lo = _nest("tl.maximum", ["0"] + [at(n, d < 0) for n, d in seg.lo])
    flo = _nest("tl.maximum", ["0"] + [at(n, d > 0) for n, d in seg.lo])
    hi = _nest("tl.minimum", [last] + [at(n, d > 0) for n, d in seg.hi])
    fhi = _nest("tl.minimum", [last] + [at(n, d < 0) for n, d in seg.hi])
    on = [p0(g) for g in seg.guards]
    full = [] if not seg.residual else ["False"]
    for a in seg.q_atoms:
        x, y = at(a, 0), at(a, 1)
        on.append(f"({x} | {y})")
        full.append(f"({x} & {y})")
    for pr in (p0, p1):
        helpers |= pr.helpers
    lines = [f"# segment {i}: {_describe(seg, side)}"] + p0.lines + p1.lines
    lines += [f"lo{i} = {lo}", f"hi{i} = {hi}", f"flo{i} = {flo}", f"fhi{i} = {fhi}", f"blo{i} = lo{i} // {nb}"]
    cond = " & ".join(on + [f"(hi{i} >= lo{i})"])
    lines.append(f"bhi{i} = tl.where({cond}, (hi{i} + {nb}) // {nb}, blo{i})")
    lines.append(f"fblo{i} = (flo{i} + {nb} - 1) // {nb}")
    if "False" in full:
        lines.append(f"fbhi{i} = fblo{i}  # residual atoms: every block is partial")
    elif full:
        lines.append(f"fbhi{i} = tl.where({' & '.join(full)}, tl.maximum(fhi{i} + 1, 0) // {nb}, fblo{i})")
    else:
        lines.append(f"fbhi{i} = tl.maximum(fhi{i} + 1, 0) // {nb}")
    return lines


def _visit(k: Kernel, segs: tuple[Segment, ...], helpers: set[str], side: Side) -> dict:
    """All scalar code before the two loops, and the counter-to-block maps inside them."""
    n = len(segs)
    pre = [line for i, seg in enumerate(segs) for line in _segment_lines(k, i, seg, helpers, side)]
    if n > 1:
        pre.append("# visit segments in order of their first block, so that overlaps are visited once")
    for i, j in _swaps(n):
        pre.append(f"sw = blo{j} < blo{i}")
        for v in ("blo", "bhi", "fblo", "fbhi"):
            pre.append(f"{v}{i}, {v}{j} = tl.where(sw, {v}{j}, {v}{i}), tl.where(sw, {v}{i}, {v}{j})")
    pre.append("# clip each segment to what earlier ones left; split it into partial and full ranges")
    pre.append("cursor = 0")
    for i in range(n):
        pre += [f"s{i} = tl.maximum(blo{i}, cursor)", f"e{i} = tl.maximum(bhi{i}, s{i})",
                f"f{i} = tl.minimum(tl.maximum(fblo{i}, s{i}), e{i})",
                f"g{i} = tl.maximum(tl.minimum(fbhi{i}, e{i}), f{i})", f"cursor = e{i}"]
    if n:
        partial = _range_map([r for i in range(n) for r in ((f"s{i}", f"f{i}"), (f"g{i}", f"e{i}"))], "partial")
        full = _range_map([(f"f{i}", f"g{i}") for i in range(n)], "full")
    else:  # the mask is always false: nothing to visit
        partial = (["n_partial = 0"], ["blk = j"])
        full = (["n_full = 0"], ["blk = j"])
    return {"pre": pre, "partial_pre": partial[0], "partial_map": partial[1], "full_pre": full[0],
            "full_map": full[1]}


def uses_block_map(pl: Plan) -> bool:
    """Does the spec get a runtime block map? Only when the mask reads a tensor and the analysis
    leaves some segment residual (every block in its range partial): index arithmetic alone
    (even `%` or `!=`) keeps the sympy ranges and builds nothing at run time."""
    return (pl.sparse and pl.mask is not None and bool(pl.segments)
            and any(s.residual for s in pl.segments + pl.segments_t)
            and any(n.op is Op.LOAD for n in pl.mask.walk()))


def _with_map(visit: dict, row_block: str) -> dict:
    """The loops' scalar code with a BLOCK_MAP branch: the map's counts and lists for this row
    block (one scalar load per iteration), else the sympy ranges as without a map."""
    ind = lambda lines: ["    " + line for line in lines]  # noqa: E731
    pre = ["if BLOCK_MAP:  # the runtime block map's lists for this row block (see BlockMap)",
           f"    map_row = (b * map_stride_b + h * map_stride_h + {row_block}).to(tl.int64)",
           "    n_partial = tl.load(MapNum + map_row * 2)",
           "    n_full = tl.load(MapNum + map_row * 2 + 1)",
           "    Map_partial = MapIdx + map_row * 2 * map_cols",
           "    Map_full = Map_partial + map_cols",
           "else:"] + ind(visit["pre"] + visit["partial_pre"] + visit["full_pre"])
    return {"pre": pre, "partial_pre": [], "full_pre": [],
            "partial_map": ["if BLOCK_MAP:", "    blk = tl.load(Map_partial + j)", "else:"]
            + ind(visit["partial_map"]),
            "full_map": ["if BLOCK_MAP:", "    blk = tl.load(Map_full + j)", "else:"] + ind(visit["full_map"])}


def _map_kernel_code(n_segments: int) -> dict:
    """Which fine column blocks the sympy ranges allow (the rest is empty without evaluating the
    mask) and which they prove full; uses the names that `_visit` defines."""
    inside = " | ".join(f"((i_n >= s{i}) & (i_n < e{i}))" for i in range(n_segments))
    full = " | ".join(f"((i_n >= f{i}) & (i_n < g{i}))" for i in range(n_segments))
    return {"in_range": inside, "known_full": full}


def _run_code(k: Kernel, pl: Plan, helpers: set[str]) -> list[dict]:
    """For each run of the plan, the map kernel's loads of its ids over the tile's rows (o_r) and columns (o_c)."""
    out = []
    for i, run in enumerate(pl.runs):
        pr = TritonPrinter(k, {**_KERNEL_VARS, "q_idx": "o_r", "kv_idx": "o_c"}, prefix=f"r{i}_")
        out.append({"q": pr(run.q), "kv": pr(run.kv), "lines": pr.lines, "src": f"{py(run.q)} == {py(run.kv)}"})
        helpers |= pr.helpers
    return out


def _cell_code(k: Kernel, pl: Plan, helpers: set[str]) -> list[dict]:
    """For each block layout (Cells) of the plan, the map kernel's read of the cell at the tile's first row and
    column (q0, n0)."""
    out = []
    for i, cell in enumerate(pl.cells):
        pr = TritonPrinter(k, {**_KERNEL_VARS, "q_idx": "q0", "kv_idx": "n0"}, prefix=f"c{i}_")
        out.append({"value": pr(cell.load), "lines": pr.lines, "rows": cell.rows, "cols": cell.cols,
                    "src": py(cell.load)})
        helpers |= pr.helpers
    return out


def _describe(seg: Segment, side: Side = FWD) -> str:
    lo = ", ".join(py(n) for n, _ in seg.lo) or "0"
    hi = ", ".join(py(n) for n, _ in seg.hi) or f"{side.n_col} - 1"
    lo = f"max({lo})" if len(seg.lo) > 1 else lo
    hi = f"min({hi})" if len(seg.hi) > 1 else hi
    col = "kv_idx" if side.row_var == "q_idx" else "q_idx"
    s = f"{col} in [{lo}, {hi}]"
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


_CONSTEXPR = "constexpr"


def _sig(args: list[str]) -> str:
    """A kernel's parameter list from 'name:type' items, wrapped like hand-written code."""
    names = [f"{a.split(':')[0]}: tl.constexpr" if a.endswith(_CONSTEXPR) else a.split(":")[0] for a in args]
    lines, cur = [], ""
    for n in names:
        if cur and len(cur) + len(n) > 100:
            lines.append(cur.rstrip())
            cur = ""
        cur += n + ", "
    lines.append(cur.rstrip())
    return "\n    " + "\n    ".join(lines) + "\n"


def _strides(t: str, dims: str) -> list[str]:
    # the head-dim stride is a constexpr (1 in practice): Triton specializes ints only on divisibility
    # by 16, and without a known unit stride loads are neither vectorized nor pipelined (cp.async)
    return [f"stride_{t}{d}:{_CONSTEXPR if d == 'd' else 'i32'}" for d in dims]


def banded(pl: Plan) -> bool:
    """Whether every segment's key range has a bounded width (a window, a chunk, sink tokens): an upper end is
    fixed (not the sequence's end), or both ends move with q_idx. Such masks visit a few key blocks per query
    block and want small backward tiles (benchmarks/results/2026-11-26-h100-bwd-ab.json). A lower end that moves
    alone is not enough: [q_idx, kv_len) (anti-causal) grows as wide as causal's."""
    def narrow(seg: Segment) -> bool:
        fixed = any(d == 0 and not f.vars() & {"kv_len", "q_len"} for f, d in seg.hi)
        return fixed or (any(d == 1 for _, d in seg.lo) and any(d == 1 for _, d in seg.hi))
    return pl.sparse and bool(pl.segments) and all(narrow(s) for s in pl.segments)


def band_ranges(pl: Plan, params: set[str], rows: bool = False) -> list[dict] | None:
    """Python for the ranges of queries a key sees (rows: of keys a query sees), from the dK/dV side's segments (rows:
    the forward's): per segment {"lo", "hi", "on" (None: always)} in kv_idx (q_idx), q_len, kv_len and the spec's
    params. The host averages the size of their union (_covered) to pick a banded mask's kernels (_long_band,
    _long_rows): a window, a chunk, sink tokens beside a window. None where a bound reads anything else."""
    segs = pl.segments if rows else pl.segments_t
    known = {"q_idx" if rows else "kv_idx", "q_len", "kv_len"}
    out = []
    for seg in segs:
        nodes = [n for n, _ in seg.lo + seg.hi] + list(seg.guards) + list(seg.q_atoms)
        if any(n.vars() - known or {m.arg for m in n.walk() if m.op is Op.PARAM} - params for n in nodes):
            return None
        lo = ["0"] + [py(n) for n, _ in seg.lo]
        hi = ["kv_len - 1" if rows else "q_len - 1"] + [py(n) for n, _ in seg.hi]
        out.append({"lo": f"max({', '.join(lo)})" if len(lo) > 1 else lo[0],
                    "hi": f"min({', '.join(hi)})" if len(hi) > 1 else hi[0],
                    "on": " and ".join(py(n) for n in seg.guards + seg.q_atoms) or None})
    return out or None


def skewed(pl: Plan) -> bool:
    """Whether row blocks differ in work: some segment's key range moves with q_idx or holds for some rows
    only (causal, prefix-LM). Their programs then run heaviest first (full masks: every row the same)."""
    return pl.sparse and any(s.q_atoms or any(d != 0 for _, d in s.lo + s.hi) for s in pl.segments)


def all_keys(pl: Plan) -> bool:
    """Whether every query sees every key: no mask (scores aside), or dense loops. Every row block then visits all
    cdiv(kv_len, BLOCK_N) key blocks, and the Gluon forward may cut its last round's tiles into equal shares of
    them (_tail)."""
    return pl.mask is None or not pl.sparse


def key_chunks(pl: Plan, block_map: bool) -> int:
    """The dK/dV kernels' program order: key blocks heaviest first, in chunks of this many blocks across every
    (batch, head) pair (_heaviest_first, with _key_order finding the heavier end at run time; 0: the grid's own
    order, a head's blocks in turn). Skewed masks (causal, prefix-LM) take chunks of 8, as the forward's rows do.
    A banded mask's key blocks cost the same unless one of its transposed ranges runs to the last query: sink
    tokens, whose key block every later row sees (8192 rows against a window's 1088). Launched in grid order those
    blocks of the last heads start last and run alone; chunks of 32 put them first and still keep a head's
    neighbouring blocks, which share Q and dO, together (backward 1.10-1.18 ms against 1.34:
    results/2026-11-27-h100-sink-order.json)."""
    if block_map:  # the map's lists, not the ranges, say what a block costs
        return 0
    if banded(pl):
        return 32 if any(not s.hi for s in pl.segments_t) else 0
    return 8 if skewed(pl) else 0


def gluon_backward(pl: Plan) -> bool:
    """Whether the module gets the Gluon dK/dV and dQ kernels (with the Gluon forward's conditions). The dK/dV
    consumer holds dK, dV and two score tiles in registers; a score that reads positions keeps index tiles live
    too and spills (ALiBi's backward: 4.21 ms against 3.65 with the Triton dK/dV,
    results/2026-11-27-h100-gluon-regs.json). A split logit (Plan.split) forms no such tile."""
    return pl.split is not None or not ({"q_idx", "kv_idx"} & (pl.logit.vars() | pl.dlogit.vars()))


def _split_hooks(k: Kernel, pl: Plan, helpers: set[str]) -> dict | None:
    """The bodies of _logit_qk, _logit_key and _lse_shift: (lines, expression) each. A term that does not read
    its position still returns a vector over it, as the kernels index it so."""
    if pl.split is None:
        return None
    out = {}
    for part, var in (("qk", None), ("key", "kv_idx"), ("shift", "q_idx")):
        pr = TritonPrinter(k, _KERNEL_VARS, prefix=f"{part}_")
        node = getattr(pl.split, part)
        expr = pr(node)
        if var is None:  # the hook returns c * qk
            expr = f"{expr} * qk"
        elif var not in node.vars():
            expr = f"{expr} + 0.0 * {var}"
        out[part] = (pr.lines, expr)
        helpers |= pr.helpers
    return out


def dscore_reads_qk(pl: Plan) -> bool:
    """Whether d score / d qk reads qk (a score nonlinear in qk, e.g. softcap). Its temporaries then live beside
    dK and dV in the Gluon dK/dV, so the kernel folds them into P^T before it waits for V dO^T. (Live across
    the wait, at 64 queries a step, they spilled 1132 bytes and ran slower than 32 queries:
    results/2026-11-27-h100-dkdv-rows.json. Scores linear in qk keep the order that runs faster for them:
    results/2026-11-27-h100-dkdv-order.json.)"""
    return "qk" in pl.dlogit.vars()


def render(k: Kernel, sparse: bool = True, the_plan: Plan | None = None) -> str:
    """The generated module's source for one kernel."""
    user = k  # the spec as written: the public signature
    rw = rewrite(k, enabled=sparse and k.layout.kind not in SERVING)
    k = rw.kernel  # what the kernels compute (rewrites add internal params)
    pl = the_plan or plan(k, sparse=sparse)
    helpers: set[str] = set()
    mp = TritonPrinter(k, _KERNEL_VARS, prefix="m")
    mask_expr = "kv_idx < kv_len" if pl.mask is None else f"{mp(pl.mask)} & (kv_idx < kv_len)"
    lp = TritonPrinter(k, _KERNEL_VARS, prefix="s")
    logit_expr = lp(pl.logit)
    if "qk" not in pl.logit.vars():  # a score that ignores qk is still one value per (query, key) entry
        logit_expr = f"{logit_expr} + tl.zeros_like(qk)"
    # c of a plain score s = c * qk (the forward's full blocks never form s); its sign picks max or min
    logit_scale = TritonPrinter(k, _KERNEL_VARS, prefix="c")(pl.logit_scale) if pl.logit_scale else None
    dp = TritonPrinter(k, _KERNEL_VARS, prefix="d")
    dscore_expr = dp(pl.dlogit)
    helpers |= mp.helpers | lp.helpers | dp.helpers
    fwd = _visit(k, pl.segments, helpers, FWD)
    bwd = _visit(k, pl.segments_t, helpers, BWD)
    block_map = uses_block_map(pl) and k.layout.kind not in SERVING  # serving kernels keep the sympy ranges
    map_vars = sorted(pl.mask.vars() & {"b", "h"}) if block_map else []
    band = block_map or banded(pl)  # narrow key ranges: small tiles, plain program order
    runs = _run_code(k, pl, helpers) if block_map else []
    cells = _cell_code(k, pl, helpers) if block_map else []
    # the map kernel visits fine tiles with the forward's orientation and names; with runs or cells, over the
    # ranges of the mask without them (the ids' spans and the cells decide those)
    fine_segs = pl.rest if runs or cells else pl.segments
    fine = _visit(k, fine_segs, helpers, FWD) if runs or cells else fwd
    if block_map:
        fwd, bwd = _with_map(fwd, "i_m"), _with_map(bwd, "i_n")
    grad_lines, grad_extra_args = _input_grad_code(k, pl, helpers)
    split = _split_hooks(k, pl, helpers)

    extra_args = [f"{param_name(p.name)}:{_TYPE_SIG[p.type.value]}" for p in k.params]
    host_extra = [f"{_cast(p.type.value)}(params[{p.name!r}])" for p in k.params]
    for i, inp in enumerate(k.inputs):
        names = input_args(inp.name, len(inp.shape))
        extra_args += [f"{names[0]}:{_PTR_SIG[inp.dtype]}"] + [f"{n}:i32" for n in names[1:]]
        host_extra += [f"tensors[{i}]", f"*tensors[{i}].stride()", f"*tensors[{i}].shape"]
    extra = "".join(f", {a.split(':')[0]}" for a in extra_args)
    grad_extra = "".join(f", {a.split(':')[0]}" for a in grad_extra_args)
    tile = ["BLOCK_M", "BLOCK_N", "BLOCK_DQK", "BLOCK_DV", "D_QK", "D_V"]
    cx = lambda names: [f"{n}:{_CONSTEXPR}" for n in names]  # noqa: E731
    map_args = ["MapNum:*i32", "MapIdx:*i32", "map_stride_b:i32", "map_stride_h:i32", "map_cols:i32"] \
        if block_map else []
    map_cx = ["BLOCK_MAP"] if block_map else []
    sizes = ["q_len:i32", "kv_len:i32", "H:i32", "GROUP:i32", "sm_scale:fp32"]
    args = {
        "fwd": ["Q:*q", "K:*q", "V:*q", "Out:*q", "Mrow:*fp32", "Lrow:*fp32", "Trace:none"] + _strides("q", "bhmd")
        + _strides("k", "bhnd") + _strides("v", "bhnd") + _strides("o", "bhmd") + sizes + extra_args + map_args
        + cx(tile + ["TRACE", "DOT_PRECISION", "I64", "FAST_MATH", "TMA", "LOGIT_POS"] + map_cx),
        "dkdv": ["Q:*q", "K:*q", "V:*q", "dO:*q", "Mrow:*fp32", "Lrow:*fp32", "Delta:*fp32", "dK:*q", "dV:*q",
                 "Trace:none"]
        + _strides("q", "bhmd") + _strides("k", "bhnd") + _strides("v", "bhnd") + _strides("do", "bhmd")
        + _strides("dk", "bhnd") + _strides("dv", "bhnd") + sizes + extra_args + map_args
        + cx(tile + ["TRACE", "DOT_PRECISION", "I64", "FAST_MATH"] + map_cx),
        "dq": ["Q:*q", "K:*q", "V:*q", "Out:*q", "dO:*q", "dLse:*fp32", "Mrow:*fp32", "Lrow:*fp32", "Delta:*fp32",
               "dQ:*q", "Trace:none"]
        + _strides("q", "bhmd") + _strides("k", "bhnd") + _strides("v", "bhnd") + _strides("o", "bhmd")
        + _strides("do", "bhmd") + _strides("dq", "bhmd") + sizes + extra_args + map_args + grad_extra_args
        + cx(tile + ["TRACE", "DOT_PRECISION", "DETERMINISTIC", "INPUT_GRADS", "HAS_DLSE", "I64", "FAST_MATH", "TMA"]
             + map_cx),
    }
    knames = {"fwd": "fwd_kernel", "dkdv": "bwd_dkdv_kernel", "dq": "bwd_dq_kernel"}
    sm90 = not block_map and k.layout.kind not in SERVING  # the Gluon kernels (block maps: not yet)
    sm90_bwd = sm90 and gluon_backward(pl)  # the Gluon dK/dV and dQ kernels
    if sm90:
        # persistent: B * H tiles per row block; a cut last round's pieces (TAIL shares of nb key blocks a tile) go
        # to the part buffer, positional after the Triton twin's arguments, and fwd_merge merges them
        at = next(i for i, a in enumerate(args["fwd"]) if a.startswith("BLOCK_M:"))
        args["fwd_sm90"] = args["fwd"][:at] + ["Part:*fp32"] + args["fwd"][at:] + cx(["STAGES", "REGS"]) \
            + ["BH:i32", "nb:i32", "TAIL:i32"] + cx(["CUT"])
        knames["fwd_sm90"] = "fwd_sm90_kernel"
        if all_keys(pl):
            args["fwd_merge"] = ["Part:*fp32", "Out:*q", "Mrow:*fp32", "Lrow:*fp32",
                                 "stride_ob:i32", "stride_oh:i32", "stride_om:i32", "q_len:i32", "H:i32", "BH:i32",
                                 "nb:i32", "P:i32", "PT:i32"] + cx(["BLOCK_M", "ROWS", "D_V", "BLOCK_DV"])
            knames["fwd_merge"] = "fwd_merge"
    if sm90_bwd:  # host-side TMA descriptors after the Triton twin's positional arguments (before its constexprs)
        for kern, descs in (("dkdv", "QD dOD KD VD dKD dVD LseD DeltaD"), ("dq", "QD dOD dQD KD VD")):
            at = next(i for i, a in enumerate(args[kern]) if a.startswith("BLOCK_M:"))
            args[f"{kern}_sm90"] = args[kern][:at] + [f"{d}:desc" for d in descs.split()] + args[kern][at:] \
                + cx(["STAGES", "REGS"])
        knames.update(dkdv_sm90="bwd_dkdv_sm90_kernel", dq_sm90="bwd_dq_sm90_kernel")
    if block_map:
        args["blockmap"] = ["State:*i8", "q_len:i32", "kv_len:i32", "H_MAP:i32"] + extra_args \
            + cx(["BLOCK_M", "BLOCK_N", "TILES"])
        args["blocklists"] = ["State:*i8", "Num:*i32", "Idx:*i32", "stride_sbh:i32", "stride_sr:i32",
                              "stride_sc:i32", "n_fine_r:i32", "n_fine_c:i32", "n_cols:i32"] \
            + cx(["RATIO_R", "RATIO_C", "COLS"])
        knames.update(blockmap="blockmap_kernel", blocklists="blockmap_lists")
    if k.layout.kind in SERVING:
        args = {"serve": ["Q:*q", "K:*q", "V:*q", "Out:*q", "Lse:*fp32", "Opart:*fp32", "Mpart:*fp32", "Lpart:*fp32",
                          "Count:*i32", "CuQ:*i32", "KvInfo:*i32", "BlockTable:*i32"] + _strides("q", "thd")
                + _strides("k", "pshd") + _strides("v", "pshd") + _strides("o", "thd") + ["stride_bt:i32"]
                + ["H:i32", "H_KV:i32", "GROUP:i32", "n_rows:i32", "n_tiles:i32", "grid_m:i32",
                   "sm_scale:fp32"] + extra_args
                + cx(["BLOCK_M", "BLOCK_N", "HP", "BLOCK_D1", "BLOCK_D2", "HAS_D2", "BLOCK_DV", "D_QK", "D_V", "PAGED",
                      "PAGE", "SPLIT", "MERGE", "STREAM", "BLOCK_T", "FAST_MATH", "DOT_PRECISION", "V_IN_K"]),
                "combine": ["Opart:*fp32", "Mpart:*fp32", "Lpart:*fp32", "Out:*q", "Lse:*fp32"] + _strides("o", "thd")
                + ["n_rows:i32", "H:i32", "n_splits:i32"] + cx(["BLOCK_S", "BLOCK_DV", "D_V"])}
        knames = {"serve": "serve_kernel", "combine": "serve_combine"}
    shape_doc = {"bhsd": ("[B, H, S_q, D_qk]", "[B, H_kv, S_kv, D_qk]", "[B, H_kv, S_kv, D_v]",
                          "[B, H, S_q, D_v]"),
                 "bshd": ("[B, S_q, H, D_qk]", "[B, S_kv, H_kv, D_qk]", "[B, S_kv, H_kv, D_v]",
                          "[B, S_q, H, D_v]")}.get(k.layout.kind, ("",) * 4)
    notes_fwd = [f"segment {i}: {_describe(s)}" for i, s in enumerate(pl.segments)] or ["none: never visible"]
    notes_fwd += list(pl.notes)
    if rw.dilation > 1:
        notes_fwd.append(f"rewrite: the mask holds (q_idx - kv_idx) % {rw.dilation} == 0, so the kernels run "
                         f"{rw.dilation} strided sub-problems q[r::{rw.dilation}] x k[r::{rw.dilation}] in which "
                         f"q_idx -> {rw.dilation} * q_idx + _r (likewise kv_idx)")
    notes_bwd = [f"segment {i}: {_describe(s, BWD)}" for i, s in enumerate(pl.segments_t)] or ["none"]
    learnable = tuple(i.name for i in k.inputs if i.learnable)
    ctx = dict(
        name=k.name, version=__version__, file=k.file, spec_source=k.source, helpers=sorted(helpers),
        extra=extra, grad_extra=grad_extra, host_extra=", ".join(host_extra),
        mask_src=py(pl.mask) if pl.mask is not None else "(none)",
        score_src=py(user.score) if user.score is not None else "score",
        mask_lines=mp.lines, mask_expr=mask_expr, logit_lines=lp.lines, logit_expr=logit_expr,
        logit_scale=logit_scale, logit_scale_py=py(pl.logit_scale) if pl.logit_scale else None,
        dscore_lines=dp.lines, dscore_expr=dscore_expr, dscore_src=py(pl.dlogit),
        grads_doc=[f"{g.name}[{', '.join(py(i) for i in g.index)}] = {py(g.partial)}" for g in pl.input_grads],
        fwd=fwd, bwd=bwd, notes_fwd=notes_fwd, block_map=block_map, map_vars=map_vars, fine=fine,
        banded=band, sm90=sm90, sm90_bwd=sm90_bwd, all_keys=sm90 and all_keys(pl), dscore_reads_qk=dscore_reads_qk(pl),
        split=split,
        band_keys=band_ranges(pl, {p.name for p in user.params}) if band and sm90_bwd and not block_map else None,
        band_rows=band_ranges(pl, {p.name for p in user.params}, rows=True) if band and sm90 else None,
        split_doc=[f"{label} = {py(n)}" for label, n in (("c", pl.split.qk), ("key", pl.split.key),
                                                          ("shift", pl.split.shift))] if split else [],
        longest_first=not band and skewed(pl), key_chunks=key_chunks(pl, block_map),
        map_code=_map_kernel_code(len(fine_segs)) if block_map else {}, runs=runs, cells=cells,
        notes_bwd=notes_bwd,
        input_grads=list(pl.input_grads), input_grad_lines=grad_lines,
        grad_owner=repr([g.name for g in pl.input_grads]), learnable=repr(learnable), learnable_names=list(learnable),
        read=repr(tuple(dict.fromkeys(g.name for g in pl.input_grads))),
        sig={key: _sig(a) for key, a in args.items()},
        call={key: ", ".join(a.split(":")[0] for a in args_) for key, args_ in args.items()},
        kernel_table=[(key, f"{k.name}_{knames[key]}", repr(a)) for key, a in args.items()],
        params=[{"name": p.name, "type": p.type.value,
                 "default": None if p.default is None else literal(p.default)} for p in user.params],
        inputs=[i.name for i in k.inputs],
        inputs_doc={i.name: f"{i.dtype}[{', '.join(py(d) for d in i.shape)}]" + (" (learnable)" if i.learnable else "")
                    for i in k.inputs},
        params_table=_table({p.name: (p.type.value, p.default) for p in user.params}), dilation=rw.dilation,
        # the residue r of a strided sub-problem stays a plain argument: specialized (Triton folds 1 and multiples of
        # 16), residues 0 and 1 would compile every kernel twice
        entry_jit=f"(do_not_specialize=[{param_name(RESIDUE)!r}])" if rw.dilation > 1 else "",
        inputs_table=_inputs_table(k), heads_q=k.heads_q, heads_kv=k.heads_kv, layout=k.layout.kind,
        shape_q=shape_doc[0], shape_k=shape_doc[1], shape_v=shape_doc[2], shape_out=shape_doc[3],
        scale_expr=py(k.scale) if k.scale is not None else "1.0 / math.sqrt(Dqk)",
        scale_doc=f"spec: {py(k.scale)}" if k.scale is not None else "default 1/sqrt(D_qk)",
    )
    if k.layout.kind in SERVING:
        reads_h = pl.mask is not None and "h" in pl.mask.vars()
        ctx.update(pack_heads=not reads_h, layout_doc=LAYOUTS[k.layout.kind])
        return _env().get_template("serving.py.jinja").render(**ctx)
    return _env().get_template("module.py.jinja").render(**ctx)


def _input_grad_code(k: Kernel, pl: Plan, helpers: set[str]) -> tuple[list[str], list[str]]:
    """The body of `_input_grads` and the extra kernel arguments it needs."""
    args: list[str] = []
    for name in dict.fromkeys(g.name for g in pl.input_grads):  # learnable inputs the score reads
        rank = len(k.input(name).shape)
        args += [f"grad_{name}:*fp32"] + [f"grad_{name}_stride{d}:i32" for d in range(rank)]
    lines: list[str] = []
    if pl.input_grads:
        lines.append("flat = ((b * H + h).to(tl.int64) * q_len + q_idx) * kv_len + kv_idx  # [BLOCK_M, BLOCK_N]")
        lines.append("inside = (q_idx < q_len) & (kv_idx < kv_len)")
    for r, g in enumerate(pl.input_grads):
        args += [f"Gv{r}:none", f"Gi{r}:none"]
        pr = TritonPrinter(k, _KERNEL_VARS, prefix=f"r{r}_")
        idx = [pr(i) for i in g.index]
        idx = [c if i.op in (Op.VAR, Op.CONST, Op.PARAM) else pr._tmp(c) for c, i in zip(idx, g.index)]
        part = pr(g.partial)
        helpers |= pr.helpers
        inp = k.input(g.name)
        sizes = input_args(g.name, len(inp.shape))[1 + len(inp.shape):]
        inb = " & ".join(f"({i} >= 0) & ({i} < {sz})" for i, sz in zip(idx, sizes))
        off = " + ".join(f"{i} * grad_{g.name}_stride{d}" for d, i in enumerate(idx))
        deps = set().union(*(n.vars() for n in g.index)) & {"q_idx", "kv_idx"}
        lines.append(f"# {g.name}[{', '.join(py(i) for i in g.index)}]: d score / d read = {py(g.partial)}")
        lines += pr.lines
        lines.append(f"g{r} = ds * {part}" if part != "1.0" else f"g{r} = ds")
        lines.append(f"inb{r} = {inb}")
        lines.append("if DETERMINISTIC:")
        lines.append(f"    tl.store(Gv{r} + flat, g{r}, mask=inside)")
        lines.append(f"    tl.store(Gi{r} + flat, tl.where(inb{r}, ({off}).to(tl.int64) + flat * 0, -1), mask=inside)")
        lines.append("else:")
        if deps == {"q_idx", "kv_idx"}:
            lines.append(f"    tl.atomic_add(grad_{g.name} + {off}, g{r}, mask=inb{r})")
        elif deps == {"q_idx"}:
            lines.append(f"    tl.atomic_add(grad_{g.name} + {off}, tl.sum(g{r}, 1, keep_dims=True), mask=inb{r})")
        elif deps == {"kv_idx"}:
            lines.append(f"    tl.atomic_add(grad_{g.name} + {off}, tl.sum(g{r}, 0, keep_dims=True), mask=inb{r})")
        else:  # one entry per tile: sum it first, then a single atomic
            lines.append(f"    tl.atomic_add(grad_{g.name} + {off}, tl.sum(tl.sum(g{r}, 1), 0), mask=inb{r})")
    return lines, args


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


def compile_source(source: str, file: str = "<spec>", sparse: bool = True, layout: str | None = None) -> dict[str, str]:
    """Spec text -> {kernel name: module source}; `layout` overrides the specs' own."""
    from .lower import lower, relayout
    from .parse import parse

    return {k.name: render(relayout(k, layout), sparse) for k in lower(parse(source, file))}

