"""Stage 2: AST -> typed IR. Resolves names, checks types, inlines `let`s and named masks."""

from __future__ import annotations

import builtins
import dataclasses
import keyword
import re
from dataclasses import dataclass

from . import ast
from .errors import AttnError, Span
from .ir import (
    BUILTINS,
    DTYPES,
    LAYOUTS,
    SHAPE_SYMBOLS,
    Input,
    Kernel,
    Layout,
    Node,
    Op,
    Param,
    T,
    const,
    verify,
)

_IDENT = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
# names the generated wrapper uses itself (arguments, locals, modules, Python builtins); params and
# inputs become its keyword arguments, so they may not take them
RESERVED = ({"q", "k", "v", "scale", "return_lse", "deterministic", "config", "block_map", "unknown", "out", "lse",
             "inputs", "params", "tensors", "grad", "name", "val", "torch", "triton", "tl", "math", "inf"}
            | set(BUILTINS) | set(SHAPE_SYMBOLS) | set(dir(builtins)))
FUNCS = {"exp": Op.EXP, "log": Op.LOG, "sqrt": Op.SQRT, "tanh": Op.TANH, "sigmoid": Op.SIGMOID,
         "abs": Op.ABS, "min": Op.MIN, "max": Op.MAX, "clamp": None}
_BINOPS = {"+": Op.ADD, "-": Op.SUB, "*": Op.MUL, "/": Op.DIV, "//": Op.FLOORDIV, "%": Op.MOD,
           "<": Op.LT, "<=": Op.LE, ">": Op.GT, ">=": Op.GE, "==": Op.EQ, "!=": Op.NE,
           "and": Op.AND, "or": Op.OR}
_TYPES = {"int": T.INT, "float": T.FLOAT, "bool": T.BOOL}


def check_ident(name: str, span: Span, what: str) -> None:
    """Identifiers reach generated Python, so they follow one strict pattern."""
    if not _IDENT.fullmatch(name) or "__" in name or keyword.iskeyword(name):
        raise AttnError(f"{what} name {name!r} is not allowed", span,
                        "use letters, digits and single '_', starting with a letter (at most 64)")


def _num(n: Node) -> bool:
    return n.type in (T.INT, T.FLOAT)


def _join(a: Node, b: Node) -> T:
    return T.FLOAT if T.FLOAT in (a.type, b.type) else T.INT


@dataclass
class _Scope:
    kernel_name: str
    consts: dict[str, tuple[int | float | bool, Span]]
    params: dict[str, Param]
    inputs: dict[str, Input]
    lets: dict[str, ast.Let]          # spec-level and file-level, spec-level winning is an error
    allow_score: bool = False
    shape_ctx: bool = False


class _Lowerer:
    def __init__(self, scope: _Scope) -> None:
        self.s = scope
        self.active: list[str] = []   # let names being expanded, for cycle detection
        self.cache: dict[tuple[str, bool], Node] = {}

    def err(self, msg: str, span: Span, hint: str | None = None) -> AttnError:
        return AttnError(msg, span, hint)

    def name(self, e: ast.Name) -> Node:
        n, s = e.id, self.s
        if s.shape_ctx:
            if n in SHAPE_SYMBOLS:
                return Node(Op.VAR, T.INT, (), n, e.span)
            if n in s.consts:
                return const(s.consts[n][0], e.span)
            raise self.err(f"unknown name {n!r} in an input shape", e.span,
                           "shapes use " + ", ".join(SHAPE_SYMBOLS) + " and consts")
        if n == "score":
            if not s.allow_score:
                raise self.err("'score' is only available in the score clause", e.span,
                               "a mask cannot depend on the score")
            return Node(Op.VAR, T.FLOAT, (), n, e.span)
        if n in BUILTINS:
            return Node(Op.VAR, T.INT, (), n, e.span)
        if n == "inf":
            return const(float("inf"), e.span)
        if n in s.consts:
            return const(s.consts[n][0], e.span)
        if n in s.params:
            return Node(Op.PARAM, s.params[n].type, (), n, e.span)
        if n in s.inputs:
            raise self.err(f"input {n!r} is a tensor; index it", e.span,
                           f"e.g. {n}[" + ", ".join("..." for _ in s.inputs[n].shape) + "]")
        if n in s.lets:
            key = (n, s.allow_score)
            if n in self.active:
                raise self.err(f"definition of {n!r} refers to itself", e.span)
            if key not in self.cache:
                self.active.append(n)
                d = s.lets[n]
                node = self.expr(d.expr)
                self.active.pop()
                if d.is_mask and node.type is not T.BOOL:
                    raise self.err(f"mask {n!r} must be a predicate, got {node.type.value}", d.expr.span)
                self.cache[key] = node
            return self.cache[key]
        if n in SHAPE_SYMBOLS:
            raise self.err(f"{n!r} is only usable in input shapes", e.span)
        raise self.err(f"unknown name {n!r}", e.span,
                       "builtins are " + ", ".join(BUILTINS) + "; declare params, inputs or lets first")

    def expr(self, e: ast.Expr) -> Node:
        if isinstance(e, ast.Num):
            return const(e.value, e.span)
        if isinstance(e, ast.Name):
            return self.name(e)
        if isinstance(e, ast.Unary):
            x = self.expr(e.x)
            if e.op == "not":
                if x.type is not T.BOOL:
                    raise self.err(f"'not' needs a predicate, got {x.type.value}", e.x.span)
                return Node(Op.NOT, T.BOOL, (x,), None, e.span)
            if not _num(x):
                raise self.err("a bool used in arithmetic", e.x.span, "use a conditional: a if c else b")
            return Node(Op.NEG, x.type, (x,), None, e.span)
        if isinstance(e, ast.Binary):
            return self.binary(e)
        if isinstance(e, ast.IfExp):
            c, a, b = self.expr(e.cond), self.expr(e.then), self.expr(e.other)
            if c.type is not T.BOOL:
                raise self.err(f"condition must be a predicate, got {c.type.value}", e.cond.span)
            if (a.type is T.BOOL) != (b.type is T.BOOL):
                raise self.err("branches mix a bool and a number", e.span)
            t = T.BOOL if a.type is T.BOOL else _join(a, b)
            return Node(Op.WHERE, t, (c, a, b), None, e.span)
        if isinstance(e, ast.Call):
            return self.call(e)
        if isinstance(e, ast.Index):
            return self.index(e)
        raise self.err(f"unsupported expression {type(e).__name__}", e.span)

    def binary(self, e: ast.Binary) -> Node:
        op = _BINOPS[e.op]
        a, b = self.expr(e.lhs), self.expr(e.rhs)
        if op in (Op.AND, Op.OR):
            for x, xe in ((a, e.lhs), (b, e.rhs)):
                if x.type is not T.BOOL:
                    raise self.err(f"'{e.op}' needs predicates, got {x.type.value}", xe.span,
                                   "compare it, e.g. x != 0")
            return Node(op, T.BOOL, (a, b), None, e.span)
        if op in (Op.EQ, Op.NE) and a.type is T.BOOL and b.type is T.BOOL:
            return Node(op, T.BOOL, (a, b), None, e.span)
        for x, xe in ((a, e.lhs), (b, e.rhs)):
            if not _num(x):
                other = b if x is a else a
                what = f"a bool compared to {'a float' if other.type is T.FLOAT else 'an int'}" \
                    if op in (Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE) else "a bool used in arithmetic"
                raise self.err(what, xe.span, "use a conditional: a if c else b")
        if op in (Op.DIV, Op.FLOORDIV, Op.MOD) and b.op is Op.CONST and b.arg == 0:
            raise self.err("division by zero", e.rhs.span)
        if op in (Op.FLOORDIV, Op.MOD):
            for x, xe in ((a, e.lhs), (b, e.rhs)):
                if x.type is not T.INT:
                    raise self.err(f"'{e.op}' needs int operands, got {x.type.value}", xe.span,
                                   "use '/' for float division")
            return Node(op, T.INT, (a, b), None, e.span)
        if op is Op.DIV:
            return Node(op, T.FLOAT, (a, b), None, e.span)
        if op in (Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE):
            return Node(op, T.BOOL, (a, b), None, e.span)
        return Node(op, _join(a, b), (a, b), None, e.span)

    def call(self, e: ast.Call) -> Node:
        if e.fn not in FUNCS:
            raise self.err(f"unknown function {e.fn!r}", e.span, "functions: " + ", ".join(FUNCS))
        args = [self.expr(a) for a in e.args]
        for a, ae in zip(args, e.args):
            if not _num(a):
                raise self.err(f"{e.fn}() needs numbers, got a bool", ae.span)
        want = {"min": None, "max": None, "clamp": 3}.get(e.fn, 1)
        if want is None and len(args) < 2:
            raise self.err(f"{e.fn}() takes at least 2 arguments, got {len(args)}", e.span)
        if want is not None and len(args) != want:
            raise self.err(f"{e.fn}() takes {want} argument{'s' if want > 1 else ''}, got {len(args)}",
                           e.span)
        if e.fn in ("min", "max"):
            out = args[0]
            for a in args[1:]:
                out = Node(FUNCS[e.fn], _join(out, a), (out, a), None, e.span)
            return out
        if e.fn == "clamp":
            x, lo, hi = args
            t = _join(_join_node(x, lo), hi)
            inner = Node(Op.MAX, _join(x, lo), (x, lo), None, e.span)
            return Node(Op.MIN, t, (inner, hi), None, e.span)
        op = FUNCS[e.fn]
        return Node(op, args[0].type if op is Op.ABS else T.FLOAT, (args[0],), None, e.span)

    def index(self, e: ast.Index) -> Node:
        inp = self.s.inputs.get(e.name)
        if inp is None:
            hint = "declare it: input NAME: DTYPE[dims]"
            raise self.err(f"{e.name!r} is not an input tensor", e.span, hint)
        if len(e.args) != len(inp.shape):
            raise self.err(f"input {e.name!r} has {len(inp.shape)} dimension(s), indexed with "
                           f"{len(e.args)}", e.span)
        idx = [self.expr(a) for a in e.args]
        for i, ae in zip(idx, e.args):
            if i.type is not T.INT:
                raise self.err(f"a {i.type.value} used as an index", ae.span, "indices must be ints")
        t = T.BOOL if inp.dtype == "bool" else T.FLOAT if "float" in inp.dtype else T.INT
        return Node(Op.LOAD, t, tuple(idx), e.name, e.span)


def _join_node(a: Node, b: Node) -> Node:
    return Node(Op.ADD, _join(a, b), (a, b))  # only its type is used


def _literal(e: ast.Expr | None) -> int | float | bool | None:
    if isinstance(e, ast.Num):
        return e.value
    if isinstance(e, ast.Unary) and e.op == "-" and isinstance(e.x, ast.Num) and not isinstance(e.x.value, bool):
        return -e.x.value
    if isinstance(e, ast.Name) and e.id == "inf":
        return float("inf")
    raise AttnError("a default must be a literal number or true/false", e.span if e else None)


def _value_for(t: T, v: int | float | bool, span: Span, name: str) -> int | float | bool:
    if t is T.BOOL:
        if not isinstance(v, bool):
            raise AttnError(f"{name} is bool, its default is not", span, "use true or false")
        return v
    if isinstance(v, bool):
        raise AttnError(f"{name} is {t.value}, its default is a bool", span)
    if t is T.INT:
        if not isinstance(v, int):
            raise AttnError(f"{name} is int, its default {v!r} is not", span)
        return v
    return float(v)


def _sparse(c: ast.Sparse, low: _Lowerer) -> tuple[Input, ast.Expr]:
    """A sparse layout's input (its lead dims, then one cell per block of rows and of keys) and its cell read,
    `NAME[lead.., q_idx // rows, kv_idx // cols]` (`!= 0` for integer cells), written as spec text would be."""
    if c.dtype != "bool" and not c.dtype.startswith(("int", "uint")):
        raise AttnError(f"a sparse layout holds bool or integer cells, not {c.dtype!r}", c.span,
                        "e.g. sparse layout: bool[h] block 64")
    lead = [d.id if isinstance(d, ast.Name) else None for d in c.lead]
    if lead not in ([], ["b"], ["h"], ["b", "h"]):
        bad = next((d for d, n in zip(c.lead, lead) if n not in ("b", "h")), c.lead[-1] if c.lead else c)
        raise AttnError("a sparse layout's leading dims are b and/or h, in that order", bad.span,
                        "e.g. sparse layout: bool[b, h] block 64, or bool[] for one layout for all")
    sizes = []
    for e in (c.rows, c.cols or c.rows):
        n = low.expr(e)
        if n.op is not Op.CONST or n.type is not T.INT or n.arg < 1:
            raise AttnError("a sparse layout's block size must be a positive int constant", e.span,
                            "e.g. block 64, or block 128, 64 for rows x keys")
        sizes.append(ast.Num(e.span, n.arg))
    sp = c.span

    def cdiv(n: str, size: ast.Num) -> ast.Expr:
        return ast.Binary(sp, "//", ast.Binary(sp, "+", ast.Name(sp, n), ast.Num(sp, size.value - 1)), size)
    low.s.shape_ctx = True
    try:
        shape = tuple(low.expr(d) for d in (*c.lead, cdiv("q_len", sizes[0]), cdiv("kv_len", sizes[1])))
    finally:
        low.s.shape_ctx = False
    read: ast.Expr = ast.Index(sp, c.name, (*(ast.Name(sp, n) for n in lead),
                                            ast.Binary(sp, "//", ast.Name(sp, "q_idx"), sizes[0]),
                                            ast.Binary(sp, "//", ast.Name(sp, "kv_idx"), sizes[1])))
    if c.dtype != "bool":
        read = ast.Binary(sp, "!=", read, ast.Num(sp, 0))
    return Input(c.name, c.dtype, shape, c.span, False), read


def lower_spec(mod: ast.Module, spec: ast.Spec) -> Kernel:
    check_ident(spec.name, spec.span, "attention")
    consts: dict[str, tuple] = {}
    params: dict[str, Param] = {}
    inputs: dict[str, Input] = {}
    lets: dict[str, ast.Let] = {d.name: d for d in mod.defs}
    bodies: dict[str, ast.Body] = {}
    cells: list[ast.Expr] = []  # the sparse layouts' reads, joined to the mask
    heads: dict[str, int] = {}
    layout = "bhsd"
    seen: dict[str, Span] = {d.name: d.span for d in mod.defs}

    def declare(name: str, span: Span, what: str) -> None:
        check_ident(name, span, what)
        if name in RESERVED:
            raise AttnError(f"{what} name {name!r} clashes with a builtin or generated name", span,
                            "pick another name")
        if name in seen:
            prev = seen[name]
            raise AttnError(f"{name!r} is defined twice (first at {prev})", span)
        seen[name] = span

    scope = _Scope(spec.name, consts, params, inputs, lets)
    low = _Lowerer(scope)
    for c in spec.clauses:
        if isinstance(c, ast.Heads):
            if heads:
                raise AttnError("heads given twice", c.span)
            for key, val, sp in c.items:
                if key not in ("q", "kv") or key in heads:
                    raise AttnError(f"unknown or repeated head count {key!r}", sp, "write: heads q = 16, kv = 4")
                if val < 1:
                    raise AttnError(f"head count must be positive, got {val}", sp)
                heads[key] = val
            if "q" in heads and "kv" in heads and heads["q"] % heads["kv"]:
                raise AttnError(f"{heads['q']} query heads cannot share {heads['kv']} kv heads evenly",
                                c.span, "q must be a multiple of kv")
        elif isinstance(c, ast.Param):
            declare(c.name, c.span, "const" if c.const else "param")
            if c.type not in _TYPES:
                raise AttnError(f"unknown type {c.type!r}", c.span, "types: int, float, bool")
            t = _TYPES[c.type]
            if c.const:
                consts[c.name] = (_value_for(t, _literal(c.default), c.default.span, c.name), c.span)
            else:
                dv = None if c.default is None else _value_for(t, _literal(c.default), c.default.span, c.name)
                params[c.name] = Param(c.name, t, dv, c.span)
        elif isinstance(c, ast.Input):
            declare(c.name, c.span, "input")
            if c.dtype not in DTYPES:
                raise AttnError(f"unknown dtype {c.dtype!r}", c.span, "dtypes: " + ", ".join(sorted(DTYPES)))
            scope.shape_ctx = True
            shape = tuple(low.expr(d) for d in c.shape)
            scope.shape_ctx = False
            for d, de in zip(shape, c.shape):
                if d.type is not T.INT:
                    raise AttnError("a shape dimension must be an int", de.span)
            if c.learnable and "float" not in c.dtype:
                raise AttnError(f"learnable input {c.name!r} must be a float tensor, not {c.dtype}", c.span)
            inputs[c.name] = Input(c.name, c.dtype, shape, c.span, c.learnable)
        elif isinstance(c, ast.Sparse):
            declare(c.name, c.span, "sparse layout")
            inputs[c.name], cell = _sparse(c, low)
            cells.append(cell)
        elif isinstance(c, ast.Let):
            declare(c.name, c.span, "mask" if c.is_mask else "let")
            lets[c.name] = c
        elif isinstance(c, ast.Body):
            if c.kind in bodies:
                raise AttnError(f"{c.kind} given twice (first at {bodies[c.kind].span})", c.span,
                                "combine masks with 'and' / 'or'" if c.kind == "mask" else None)
            bodies[c.kind] = c
        elif isinstance(c, ast.Layout):
            if c.name not in LAYOUTS:
                raise AttnError(f"unknown layout {c.name!r}", c.span, "layouts: " + ", ".join(LAYOUTS))
            layout = c.name

    mask = score = scale = None
    if "mask" in bodies:
        mask = low.expr(bodies["mask"].expr)
        if mask.type is not T.BOOL:
            raise AttnError(f"mask must be a predicate, got {mask.type.value}", bodies["mask"].expr.span,
                            "e.g. mask q_idx >= kv_idx")
    for cell in cells:  # each sparse layout's cell is one more conjunct
        cell = low.expr(cell)
        mask = cell if mask is None else Node(Op.AND, T.BOOL, (mask, cell), None, cell.span)
    learn = {i.name for i in inputs.values() if i.learnable}
    if mask is not None and learn & {n.arg for n in mask.walk() if n.op is Op.LOAD}:
        bad = next(n for n in mask.walk() if n.op is Op.LOAD and n.arg in learn)
        raise AttnError(f"learnable input {bad.arg!r} is read in the mask, which has no gradient", bad.span,
                        "read learnable inputs in the score")
    if "score" in bodies:
        scope.allow_score = True
        score = low.expr(bodies["score"].expr)
        scope.allow_score = False
        if score.type is T.BOOL:
            raise AttnError("score must be a number, got a predicate", bodies["score"].expr.span,
                            "to drop entries, use the mask or '-inf if c else score'")
        if score.type is T.INT:
            score = Node(Op.ADD, T.FLOAT, (score, const(0.0)), None, score.span)
    if "scale" in bodies:
        e = bodies["scale"].expr
        scale = low.expr(e)
        if not _num(scale):
            raise AttnError("scale must be a number", e.span)
        if scale.vars() or any(n.op is Op.LOAD for n in scale.walk()):
            raise AttnError("scale may only use params and constants", e.span)
    # the spec's own text plus any file-level definitions it uses, for the module header
    lines = mod.source.split("\n")
    expanded = {name for name, _ in low.cache}
    used = [d for d in mod.defs if d.name in expanded]
    text = [lines[d.span.line - 1] for d in used]
    text += lines[spec.span.line - 1: spec.span.end_line]
    k = Kernel(name=spec.name, source="\n".join(text), file=mod.file,
               heads_q=heads.get("q"), heads_kv=heads.get("kv"), layout=Layout(layout),
               normalizer="softmax", params=tuple(params.values()),
               consts=tuple((n, v[0]) for n, v in consts.items()), inputs=tuple(inputs.values()),
               mask=mask, score=score, scale=scale, span=spec.span)
    return verify(k)


def lower(mod: ast.Module) -> list[Kernel]:
    """Lower every spec in a parsed module, raising positioned AttnErrors."""
    names: dict[str, Span] = {}
    out = []
    for d in mod.defs:
        check_ident(d.name, d.span, "let")
        if d.name in RESERVED:
            raise AttnError(f"name {d.name!r} clashes with a builtin", d.span).with_source(mod.source)
        if d.name in names:
            raise AttnError(f"{d.name!r} is defined twice (first at {names[d.name]})", d.span).with_source(mod.source)
        names[d.name] = d.span
    for spec in mod.specs:
        if spec.name in names:
            raise AttnError(f"{spec.name!r} is defined twice (first at {names[spec.name]})",
                            spec.span).with_source(mod.source)
        names[spec.name] = spec.span
        try:
            out.append(lower_spec(mod, spec))
        except AttnError as e:
            raise e.with_source(mod.source) from None
    if not mod.specs:
        raise AttnError("no 'attention NAME { ... }' spec in this file", Span(mod.file, 1, 1, 1, 2),
                        "write one: attention NAME { mask q_idx >= kv_idx }").with_source(mod.source)
    return out


def relayout(k: Kernel, layout: str | None) -> Kernel:
    """The same spec compiled for another layout (`attngen compile --layout`, `load(layout=)`)."""
    if layout is None or layout == k.layout.kind:
        return k
    if layout not in LAYOUTS:
        raise AttnError(f"unknown layout {layout!r}", None, "layouts: " + ", ".join(LAYOUTS))
    return dataclasses.replace(k, layout=Layout(layout))
