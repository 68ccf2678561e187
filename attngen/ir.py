"""The typed IR: one expression node type, an op enum, and the spec-level record.

Expressions are trees of `Node`. Equality ignores spans, so structurally equal
subtrees compare and hash equal (the printer relies on that for CSE).
The interpreter (interpreter.py) is the definition of what each op means.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from .errors import AttnError, Span


class T(Enum):
    INT = "int"
    FLOAT = "float"
    BOOL = "bool"


class Op(Enum):
    CONST = "const"      # arg: the Python value
    VAR = "var"          # arg: a builtin name (b, h, q_idx, kv_idx, q_len, kv_len, score)
    PARAM = "param"      # arg: a runtime scalar parameter's name
    LOAD = "load"        # arg: input tensor name; srcs: one int index per dimension
    NEG = "neg"          # -x
    ADD = "add"
    SUB = "sub"
    MUL = "mul"
    DIV = "div"          # true division, always float
    FLOORDIV = "floordiv"  # int // int, rounding toward -inf (Python)
    MOD = "mod"          # int % int, sign of the divisor (Python)
    LT = "lt"
    LE = "le"
    GT = "gt"
    GE = "ge"
    EQ = "eq"
    NE = "ne"
    AND = "and"
    OR = "or"
    NOT = "not"
    WHERE = "where"      # srcs: cond, then, else
    MIN = "min"          # binary
    MAX = "max"          # binary
    ABS = "abs"
    EXP = "exp"
    LOG = "log"
    SQRT = "sqrt"
    TANH = "tanh"
    SIGMOID = "sigmoid"


ARITH = {Op.ADD, Op.SUB, Op.MUL, Op.MIN, Op.MAX}
COMPARE = {Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE}
LOGIC = {Op.AND, Op.OR}
UNARY_FLOAT = {Op.EXP, Op.LOG, Op.SQRT, Op.TANH, Op.SIGMOID}
ARITY = {Op.CONST: 0, Op.VAR: 0, Op.PARAM: 0, Op.NEG: 1, Op.NOT: 1, Op.ABS: 1, Op.WHERE: 3,
         **{o: 1 for o in UNARY_FLOAT}}

# builtin variables and their meaning; all are int except `score`
BUILTINS = {
    "b": "batch index",
    "h": "query head index",
    "q_idx": "query position",
    "kv_idx": "key/value position",
    "q_len": "number of queries",
    "kv_len": "number of keys/values",
    "score": "the scaled q.k logit (score only)",
}
# names usable in an input's declared shape
SHAPE_SYMBOLS = {"b": "batch size", "h": "query heads", "h_kv": "key/value heads",
                 "q_len": "number of queries", "kv_len": "number of keys/values"}
DTYPES = {"bool", "int8", "uint8", "int16", "int32", "int64", "float16", "bfloat16", "float32",
          "float64"}
LAYOUTS = {"bhsd": "q/k/v are [B, H, S, D] (the default, as for SDPA)",
           "bshd": "q/k/v are [B, S, H, D] (as for flash-attn)",
           "paged": "new queries over a paged KV cache: k/v pages [P, page_size, H_kv, D], a block table "
                    "[B, max_pages] and kv_lens [B] (inference)",
           "ragged": "packed sequences, no padding: q [total_q, H, D], k/v [total_k, H_kv, D], cu_seqlens_q/k "
                     "[B + 1] (inference)"}
SERVING = {"paged", "ragged"}  # inference layouts: per-sequence lengths, bottom-right aligned positions
NORMALIZERS = {"softmax"}


@dataclass(frozen=True)
class Node:
    op: Op
    type: T
    srcs: tuple[Node, ...] = ()
    arg: object = None
    span: Span | None = field(default=None, compare=False, repr=False)

    def walk(self):
        yield self
        for s in self.srcs:
            yield from s.walk()

    def vars(self) -> set[str]:
        return {n.arg for n in self.walk() if n.op is Op.VAR}

    def __repr__(self) -> str:
        if self.op is Op.CONST:
            return repr(self.arg)
        if self.op in (Op.VAR, Op.PARAM):
            return str(self.arg)
        inner = ", ".join(repr(s) for s in self.srcs)
        if self.op is Op.LOAD:
            return f"{self.arg}[{inner}]"
        return f"{self.op.value}({inner})"


def conjuncts(n: Node) -> list[Node]:
    """The top-level operands of a chain of `and`s."""
    return conjuncts(n.srcs[0]) + conjuncts(n.srcs[1]) if n.op is Op.AND else [n]


def const(value: int | float | bool, span: Span | None = None) -> Node:
    t = T.BOOL if isinstance(value, bool) else T.INT if isinstance(value, int) else T.FLOAT
    return Node(Op.CONST, t, (), value, span)


@dataclass(frozen=True)
class Param:
    name: str
    type: T
    default: int | float | bool | None
    span: Span | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Input:
    name: str
    dtype: str
    shape: tuple[Node, ...]
    span: Span | None = field(default=None, compare=False)
    learnable: bool = False   # gets a gradient (float inputs read in the score)


@dataclass(frozen=True)
class Layout:
    """Where q/k/v live: contiguous (bhsd, bshd; training and inference) or serving (paged, ragged)."""

    kind: str = "bhsd"


@dataclass(frozen=True)
class Kernel:
    """One attention spec, lowered. `mask`/`score` are None when the spec omits them."""

    name: str
    source: str            # the spec's own text, for the generated header
    file: str
    heads_q: int | None
    heads_kv: int | None
    layout: Layout
    normalizer: str
    params: tuple[Param, ...]
    consts: tuple[tuple[str, int | float | bool], ...]
    inputs: tuple[Input, ...]
    mask: Node | None
    score: Node | None
    scale: Node | None     # None: 1/sqrt(d_qk)
    span: Span | None = field(default=None, compare=False)

    def input(self, name: str) -> Input:
        return next(i for i in self.inputs if i.name == name)


_BINARY = ARITH | COMPARE | LOGIC | {Op.DIV, Op.FLOORDIV, Op.MOD}


def _check(n: Node, k: Kernel, where: str, allowed_vars: set[str]) -> None:
    def fail(msg: str) -> None:
        raise AttnError(f"internal IR error in {k.name}.{where}: {msg} at {n!r}", n.span)

    arity = ARITY.get(n.op, 2 if n.op in _BINARY else None)
    if arity is not None and len(n.srcs) != arity:
        fail(f"{n.op.value} takes {arity} operands")
    ts = [s.type for s in n.srcs]
    if n.op is Op.CONST and not isinstance(n.arg, (int, float, bool)):
        fail("constant is not a number")
    if n.op is Op.VAR and n.arg not in allowed_vars:
        fail(f"variable {n.arg} not allowed here")
    if n.op is Op.PARAM and n.arg not in {p.name for p in k.params}:
        fail(f"unknown param {n.arg}")
    if n.op is Op.LOAD:
        inp = next((i for i in k.inputs if i.name == n.arg), None)
        if inp is None or len(inp.shape) != len(n.srcs) or any(t is not T.INT for t in ts):
            fail("bad load")
    if n.op in ARITH | {Op.DIV, Op.NEG, Op.ABS} | UNARY_FLOAT and T.BOOL in ts:
        fail("bool in arithmetic")
    if n.op in (Op.FLOORDIV, Op.MOD) and (ts != [T.INT, T.INT] or n.type is not T.INT):
        fail("integer division on non-ints")
    if n.op in COMPARE | LOGIC | {Op.NOT} and n.type is not T.BOOL:
        fail("predicate is not bool")
    if n.op in LOGIC | {Op.NOT} and any(t is not T.BOOL for t in ts):
        fail("logic on non-bools")
    if n.op is Op.WHERE and ts[0] is not T.BOOL:
        fail("where condition is not bool")
    if n.op in UNARY_FLOAT | {Op.DIV} and n.type is not T.FLOAT:
        fail("float op typed as non-float")
    for s in n.srcs:
        _check(s, k, where, allowed_vars)


def verify(k: Kernel) -> Kernel:
    """Check IR invariants between stages; a failure here is a compiler bug, not a user error."""
    idx = {"b", "h", "q_idx", "kv_idx", "q_len", "kv_len"}
    if k.mask is not None:
        if k.mask.type is not T.BOOL:
            raise AttnError(f"internal IR error in {k.name}: mask is {k.mask.type.value}", k.mask.span)
        _check(k.mask, k, "mask", idx)
    if k.score is not None:
        if k.score.type is not T.FLOAT:
            raise AttnError(f"internal IR error in {k.name}: score is {k.score.type.value}", k.score.span)
        _check(k.score, k, "score", idx | {"score"})
    if k.scale is not None:
        _check(k.scale, k, "scale", set())
    for inp in k.inputs:
        if inp.dtype not in DTYPES:
            raise AttnError(f"internal IR error: dtype {inp.dtype}", inp.span)
    if k.layout.kind not in LAYOUTS or k.normalizer not in NORMALIZERS:
        raise AttnError(f"internal IR error in {k.name}: layout/normalizer")
    if k.heads_q is not None and k.heads_kv is not None and k.heads_q % k.heads_kv:
        raise AttnError(f"internal IR error in {k.name}: heads")
    return k


def dump(k: Kernel) -> str:
    """Human-readable IR, for `attngen compile --emit ir`."""
    lines = [f"kernel {k.name}  layout={k.layout.kind}  normalizer={k.normalizer}"
             f"  heads=({k.heads_q}, {k.heads_kv})"]
    for name, v in k.consts:
        lines.append(f"  const {name} = {v!r}")
    for p in k.params:
        lines.append(f"  param {p.name}: {p.type.value} = {p.default!r}")
    for i in k.inputs:
        lines.append(f"  input {i.name}: {i.dtype}{list(i.shape)}{' learnable' if i.learnable else ''}")
    lines.append(f"  scale = {k.scale!r}" if k.scale is not None else "  scale = 1/sqrt(d_qk)")
    lines.append(f"  mask  = {k.mask!r}")
    lines.append(f"  score = {k.score!r}")
    return "\n".join(lines)
