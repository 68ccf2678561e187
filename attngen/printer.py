"""IR -> source text. Triton for kernels (Python semantics for // and % on any sign,
bounds-checked input loads) and plain Python for host-side scalars."""

from __future__ import annotations

import math

from .ir import Kernel, Node, Op, T

_TL_BIN = {Op.ADD: "+", Op.SUB: "-", Op.MUL: "*", Op.LT: "<", Op.LE: "<=", Op.GT: ">",
           Op.GE: ">=", Op.EQ: "==", Op.NE: "!=", Op.AND: "&", Op.OR: "|"}
_TL_FN = {Op.EXP: "tl.exp", Op.LOG: "tl.log", Op.SQRT: "tl.sqrt", Op.SIGMOID: "tl.sigmoid",
          Op.TANH: "_tanh", Op.ABS: "tl.abs", Op.MIN: "tl.minimum", Op.MAX: "tl.maximum"}
_PY_FN = {Op.EXP: "math.exp", Op.LOG: "math.log", Op.SQRT: "math.sqrt", Op.TANH: "math.tanh",
          Op.ABS: "abs", Op.MIN: "min", Op.MAX: "max"}
_TL_DTYPE = {"bool": "tl.int1", "int8": "tl.int8", "uint8": "tl.uint8", "int16": "tl.int16",
             "int32": "tl.int32", "int64": "tl.int64", "float16": "tl.float16",
             "bfloat16": "tl.bfloat16", "float32": "tl.float32", "float64": "tl.float64"}


def literal(v: int | float | bool) -> str:
    """Numbers are rendered from parsed values, never from spec text."""
    if isinstance(v, bool):
        return "True" if v else "False"
    if isinstance(v, int):
        return str(int(v))
    if math.isinf(v):
        return 'float("inf")' if v > 0 else 'float("-inf")'
    if math.isnan(v):
        return 'float("nan")'
    return repr(float(v))


def nonneg(n: Node) -> bool:
    """Conservatively: is this int expression never negative? (Lets // and % skip sign fixes.)"""
    if n.op is Op.CONST:
        return not isinstance(n.arg, bool) and n.arg >= 0
    if n.op is Op.VAR:
        return n.arg != "score"
    if n.op in (Op.ADD, Op.MUL, Op.FLOORDIV, Op.MOD, Op.MIN, Op.MAX):
        return all(nonneg(s) for s in n.srcs)
    return n.op is Op.ABS


def param_name(name: str) -> str:
    return f"prm_{name}"


def input_args(name: str, rank: int) -> list[str]:
    """Kernel arguments that carry one input tensor: pointer, strides, sizes."""
    return ([f"inp_{name}"] + [f"inp_{name}_stride{d}" for d in range(rank)]
            + [f"inp_{name}_size{d}" for d in range(rank)])


class TritonPrinter:
    """Prints expressions; loads become numbered statements in `lines` (shared by CSE)."""

    def __init__(self, k: Kernel, names: dict[str, str], prefix: str = "t") -> None:
        self.k, self.names, self.prefix = k, names, prefix
        self.lines: list[str] = []
        self.memo: dict[Node, str] = {}
        self.helpers: set[str] = set()

    def _tmp(self, code: str) -> str:
        name = f"{self.prefix}{len(self.lines)}"
        self.lines.append(f"{name} = {code}")
        return name

    def _float(self, n: Node) -> str:
        s = self(n)
        if n.type is T.FLOAT:
            return s
        if n.op is Op.CONST:
            return literal(float(n.arg))
        return f"({s} * 1.0)"

    def __call__(self, n: Node) -> str:
        if n in self.memo:
            return self.memo[n]
        s = self._print(n)
        self.memo[n] = s
        return s

    def _print(self, n: Node) -> str:
        op = n.op
        if op is Op.CONST:
            s = literal(n.arg)
            return f"({s})" if s.startswith("-") else s
        if op is Op.VAR:
            return self.names[n.arg]
        if op is Op.PARAM:
            # bool params travel as int32 (0/1): the interpreter has no scalar i1 argument
            return f"({param_name(n.arg)} != 0)" if n.type is T.BOOL else param_name(n.arg)
        if op is Op.LOAD:
            return self._load(n)
        if op is Op.NEG:
            return f"(-{self(n.srcs[0])})"
        if op is Op.NOT:
            return f"(~{self(n.srcs[0])})"
        if op is Op.DIV:
            return f"({self._float(n.srcs[0])} / {self._float(n.srcs[1])})"
        if op in (Op.FLOORDIV, Op.MOD):
            a, b = n.srcs
            sym = "//" if op is Op.FLOORDIV else "%"
            if nonneg(a) and b.op is Op.CONST and b.arg > 0:
                return f"({self(a)} {sym} {self(b)})"
            self.helpers.add(op.value)
            return f"_{op.value}({self(a)}, {self(b)})"
        if op is Op.ADD and n.srcs[1].op is Op.CONST and n.srcs[1].arg == 0.0 and n.type is T.FLOAT:
            return self._float(n.srcs[0])  # int -> float promotion written by lowering/analysis
        if op in _TL_BIN:
            fl = n.type is T.FLOAT
            a, b = (self._float(s) if fl else self(s) for s in n.srcs)
            return f"({a} {_TL_BIN[op]} {b})"
        if op is Op.WHERE:
            c, a, b = n.srcs
            fl = n.type is T.FLOAT
            return (f"tl.where({self(c)}, {self._float(a) if fl else self(a)}, "
                    f"{self._float(b) if fl else self(b)})")
        if op in (Op.MIN, Op.MAX):
            fl = n.type is T.FLOAT
            a, b = (self._float(s) if fl else self(s) for s in n.srcs)
            return f"{_TL_FN[op]}({a}, {b})"
        if op is Op.ABS:
            return f"tl.abs({self(n.srcs[0])})"
        if op is Op.TANH:  # FAST_MATH: a constexpr of every function that evaluates scores
            self.helpers.add("tanh")
            return f"_tanh({self._float(n.srcs[0])}, FAST_MATH)"
        return f"{_TL_FN[op]}({self._float(n.srcs[0])})"

    def _load(self, n: Node) -> str:
        inp = self.k.input(n.arg)
        ptr, *rest = input_args(inp.name, len(inp.shape))
        strides, sizes = rest[: len(inp.shape)], rest[len(inp.shape):]
        idx = []
        for s in n.srcs:
            code = self(s)
            idx.append(code if s.op in (Op.VAR, Op.CONST, Op.PARAM) else self._tmp(code))
        offset = " + ".join(f"{i} * {st}" for i, st in zip(idx, strides))
        # out-of-range reads (padding rows/cols, or a bad index) read 0 instead of faulting
        conds = []
        for i, s, size in zip(idx, n.srcs, sizes):
            if not nonneg(s):
                conds.append(f"({i} >= 0)")
            conds.append(f"({i} < {size})")
        val = f"tl.load({ptr} + {offset}, mask={' & '.join(conds)}, other=0)"
        if inp.dtype in ("float16", "bfloat16"):
            val += ".to(tl.float32)"
        return self._tmp(val)


class PythonPrinter:
    """Host-side scalar expressions over params (the spec's `scale`, input shapes), and the
    infix form of any expression for documentation."""

    def __call__(self, n: Node) -> str:
        op = n.op
        if op is Op.CONST:
            s = literal(n.arg)
            return f"({s})" if s.startswith("-") else s
        if op in (Op.PARAM, Op.VAR):
            return n.arg
        if op is Op.ADD and n.srcs[1].op is Op.CONST and n.srcs[1].arg == 0.0 and n.type is T.FLOAT:
            return self(n.srcs[0])  # an int -> float promotion
        xs = [self(s) for s in n.srcs]
        if op is Op.LOAD:
            return f"{n.arg}[{', '.join(xs)}]"
        if op is Op.NEG:
            return f"(-{xs[0]})"
        if op is Op.NOT:
            return f"(not {xs[0]})"
        if op is Op.WHERE:
            return f"({xs[1]} if {xs[0]} else {xs[2]})"
        if op is Op.SIGMOID:
            return f"(1.0 / (1.0 + math.exp(-{xs[0]})))"
        if op in _PY_FN:
            return f"{_PY_FN[op]}({', '.join(xs)})"
        sym = {Op.DIV: "/", Op.FLOORDIV: "//", Op.MOD: "%", Op.AND: "and", Op.OR: "or"}.get(op)
        sym = sym or _TL_BIN[op]
        return f"({xs[0]} {sym} {xs[1]})"
