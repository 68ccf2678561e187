"""Stage 3: sympy. Simplifies mask and score, folds the softmax scale into the exp2 base,
and derives from the mask algebra which key blocks each query block can see.

Block ranges. The mask is put in DNF; each conjunct becomes a *segment*. In a
conjunct, an atom that is linear in kv_idx (or in kv_idx // C) with an integer
coefficient bounds kv_idx by a function of q_idx; if that function is monotone
in q_idx, its values at the block's first and last row bound the whole block:

    visible  ⊆ [max_i min(lo_i(q0), lo_i(q1)), min_i max(hi_i(q0), hi_i(q1))]
    all true ⊇ [max_i max(lo_i(q0), lo_i(q1)), min_i min(hi_i(q0), hi_i(q1))]

Atoms in q_idx alone that are half-lines are checked at q0 and q1; atoms in
neither are scalar guards. Any other atom that reads kv_idx (a tensor load, a
modulus, `!=`) is *residual*: it keeps the segment's range but makes every
block partial. A block that is full for one conjunct is full for the mask.

Runs. A top-level conjunct `T[p.., q_idx] == T[p.., kv_idx]` (a document id, say) is residual here, so
such masks get a runtime block map. Its kernel first compares spans: where the ids of a tile's rows
and those of its columns span disjoint ranges, no pair is equal (empty); where all are one id, every
pair is (full, if the rest of the mask, with its own sympy ranges `Plan.rest`, is). Only the other
tiles evaluate the mask. That holds for any ids; for non-decreasing ids (sorted documents, whose
positions form runs) disjoint spans are also necessary, so only truly partial tiles get evaluated.

Cells. A top-level conjunct `T[p.., q_idx // R, kv_idx // C]` (read as bool, or `!= 0`; a `sparse` clause) is a
block layout, residual here too. The map kernel reads one cell for a tile that lies inside one: zero hides the
tile, any other value leaves it to `Plan.rest`. Only tiles across cells evaluate the mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import sympy as sp
from sympy.logic.boolalg import to_dnf

from .errors import AttnError
from .ir import Kernel, Node, Op, T, conjuncts, const, verify

LOG2E = 1.0 / math.log(2.0)
MAX_SEGMENTS = 4


class sigmoid(sp.Function):  # noqa: N801 - printed like the spec's function
    """Logistic sigmoid, with its derivative so that sympy can differentiate scores."""

    def fdiff(self, argindex=1):
        s = sigmoid(self.args[0])
        return s * (1 - s)


class NotRepresentableError(Exception):
    """sympy produced a form the IR cannot express; callers keep the original IR."""


@dataclass
class Symbols:
    """The sympy symbol for every IR leaf, with the IR type to convert back to."""

    table: dict[str, sp.Symbol] = field(default_factory=dict)
    types: dict[str, tuple[Op, T]] = field(default_factory=dict)
    loads: dict[str, tuple[type, T]] = field(default_factory=dict)

    @classmethod
    def for_kernel(cls, k: Kernel) -> Symbols:
        s = cls()
        for name in ("b", "h", "q_idx", "kv_idx"):
            s.add(name, Op.VAR, T.INT, integer=True, nonnegative=True)
        for name in ("q_len", "kv_len"):
            s.add(name, Op.VAR, T.INT, integer=True, positive=True)
        s.add("kv0", Op.VAR, T.INT, integer=True, nonnegative=True)  # the origin of a split logit's positions
        s.add("score", Op.VAR, T.FLOAT, real=True)
        s.add("qk", Op.VAR, T.FLOAT, real=True)
        s.add("sm_scale", Op.VAR, T.FLOAT, positive=True)
        for p in k.params:
            kw = {"integer": True} if p.type is T.INT else {"real": True} if p.type is T.FLOAT else {}
            s.add(p.name, Op.PARAM, p.type, **kw)
        for i in k.inputs:
            t = T.BOOL if i.dtype == "bool" else T.FLOAT if "float" in i.dtype else T.INT
            # bool tensors are 0/1 ints in sympy; a read is Ne(f(...), 0) (Boolean)
            kw = {"real": True} if t is T.FLOAT else {"integer": True}
            s.loads[i.name] = (sp.Function(f"in_{i.name}", **kw), t)
        return s

    def add(self, name: str, op: Op, t: T, **assumptions) -> None:
        self.table[name] = sp.Symbol(name, **assumptions)
        self.types[name] = (op, t)

    def __getitem__(self, name: str) -> sp.Symbol:
        return self.table[name]


# ---------------------------------------------------------------- IR -> sympy

_SP_BIN = {Op.ADD: lambda a, b: a + b, Op.SUB: lambda a, b: a - b, Op.MUL: lambda a, b: a * b,
           Op.DIV: lambda a, b: a / b, Op.FLOORDIV: lambda a, b: sp.floor(a / b),
           Op.MOD: sp.Mod, Op.LT: sp.Lt, Op.LE: sp.Le, Op.GT: sp.Gt, Op.GE: sp.Ge,
           Op.EQ: sp.Eq, Op.NE: sp.Ne, Op.AND: sp.And, Op.OR: sp.Or, Op.MIN: sp.Min, Op.MAX: sp.Max}
_SP_UN = {Op.NEG: lambda a: -a, Op.NOT: sp.Not, Op.ABS: sp.Abs, Op.EXP: sp.exp, Op.LOG: sp.log,
          Op.SQRT: sp.sqrt, Op.TANH: sp.tanh, Op.SIGMOID: sigmoid}


def to_sympy(n: Node, syms: Symbols):
    if n.op is Op.CONST:
        v = n.arg
        if isinstance(v, bool):
            return sp.true if v else sp.false
        if isinstance(v, int):
            return sp.Integer(v)
        return sp.oo if v == math.inf else -sp.oo if v == -math.inf else sp.Float(v)
    if n.op in (Op.VAR, Op.PARAM):
        return syms[n.arg]
    if n.op is Op.LOAD:
        fn, t = syms.loads[n.arg]
        f = fn(*(to_sympy(s, syms) for s in n.srcs))
        return sp.Ne(f, 0) if t is T.BOOL else f
    xs = [to_sympy(s, syms) for s in n.srcs]
    if n.op is Op.WHERE:
        c, a, b = xs
        return sp.ITE(c, a, b) if n.type is T.BOOL else sp.Piecewise((a, c), (b, True))
    if n.op in _SP_BIN:
        if n.op in (Op.EQ, Op.NE) and all(s.type is T.BOOL for s in n.srcs):
            eq = sp.Equivalent(*xs)
            return eq if n.op is Op.EQ else sp.Not(eq)
        return _SP_BIN[n.op](*xs)
    return _SP_UN[n.op](*xs)


# ---------------------------------------------------------------- sympy -> IR

_REL = {sp.StrictLessThan: Op.LT, sp.LessThan: Op.LE, sp.StrictGreaterThan: Op.GT,
        sp.GreaterThan: Op.GE, sp.Equality: Op.EQ, sp.Unequality: Op.NE}
_FN = {sp.exp: Op.EXP, sp.log: Op.LOG, sp.tanh: Op.TANH, sigmoid: Op.SIGMOID, sp.Abs: Op.ABS}
TENSOR_VARS = frozenset({"q_idx", "kv_idx", "score", "qk"})


def _bin(op: Op, a: Node, b: Node) -> Node:
    if op in (Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE, Op.AND, Op.OR):
        t = T.BOOL
    elif op is Op.DIV:
        t = T.FLOAT
    else:
        t = T.FLOAT if T.FLOAT in (a.type, b.type) else T.INT
    return Node(op, t, (a, b))


def _is_tensor(e) -> bool:
    """Does e vary per element of a tile (as opposed to per program)?"""
    return any(s.name in TENSOR_VARS for s in e.free_symbols) or any(
        _is_tensor(a) for f in e.atoms(sp.Function) if f.func.__name__.startswith("in_") for a in f.args)


def from_sympy(e, syms: Symbols) -> Node:
    """Convert back, grouping per-program (scalar) factors and terms before per-element ones."""
    if e is sp.true or e is sp.false:
        return const(bool(e))
    if isinstance(e, sp.Integer):
        return const(int(e))
    if e is sp.oo or e is -sp.oo:
        return const(math.inf if e is sp.oo else -math.inf)
    if isinstance(e, (sp.Rational, sp.Float)) or e in (sp.pi, sp.E):
        return const(float(e))
    if isinstance(e, sp.Symbol):
        op, t = syms.types[e.name]
        return Node(op, t, (), e.name)
    if isinstance(e, sp.Function) and e.func.__name__.startswith("in_"):
        name = e.func.__name__[3:]
        return Node(Op.LOAD, syms.loads[name][1], tuple(from_sympy(a, syms) for a in e.args), name)
    if isinstance(e, sp.Add):
        return _assoc(e.args, syms, add=True)
    if isinstance(e, sp.Mul):
        # split into per-program and per-element numerator/denominator so that scalars fold first
        parts: dict[tuple[bool, bool], list] = {(t, d): [] for t in (False, True) for d in (False, True)}
        for a in e.args:
            if isinstance(a, sp.Pow) and a.exp.is_number and a.exp < 0:
                parts[(_is_tensor(a), True)].append(a.base ** (-a.exp))
            elif isinstance(a, sp.Rational) and not isinstance(a, sp.Integer) and a.p in (1, -1):
                parts[(False, False)].append(sp.Integer(a.p))
                parts[(False, True)].append(sp.Integer(a.q))
            else:
                parts[(_is_tensor(a), False)].append(a)
        out = None
        for tensor in (False, True):
            num, den = parts[(tensor, False)], parts[(tensor, True)]
            if not num and not den:
                continue
            x = _assoc(num, syms, add=False) if num else const(1.0 if den else 1)
            if den:
                x = _bin(Op.DIV, x, _assoc(den, syms, add=False))
            out = x if out is None else _bin(Op.MUL, out, x)
        return out
    if isinstance(e, sp.Pow):
        if e.exp == sp.Rational(1, 2):
            return Node(Op.SQRT, T.FLOAT, (from_sympy(e.base, syms),))
        if e.exp.is_Integer and 0 < e.exp <= 4:
            b = from_sympy(e.base, syms)
            out = b
            for _ in range(int(e.exp) - 1):
                out = _bin(Op.MUL, out, b)
            return out
        if e.exp.is_number and e.exp < 0:
            return _bin(Op.DIV, const(1.0), from_sympy(e.base ** (-e.exp), syms))
        # x ** y = exp(y * log(x)): NaN for x < 0 either way
        return Node(Op.EXP, T.FLOAT, (_bin(Op.MUL, from_sympy(e.exp, syms),
                                           Node(Op.LOG, T.FLOAT, (from_sympy(e.base, syms),))),))
    if isinstance(e, sp.floor):
        num, den = sp.fraction(sp.together(e.args[0]))
        if num.is_integer and den.is_integer:
            n_, d_ = from_sympy(num, syms), from_sympy(den, syms)
            return n_ if den == 1 else Node(Op.FLOORDIV, T.INT, (n_, d_))
        raise NotRepresentableError(str(e))
    if isinstance(e, sp.Mod):
        a, b = (from_sympy(x, syms) for x in e.args)
        if a.type is not T.INT or b.type is not T.INT:
            raise NotRepresentableError(str(e))
        return Node(Op.MOD, T.INT, (a, b))
    if type(e) in _REL:
        lhs, rhs = e.lhs, e.rhs
        if isinstance(e, (sp.Equality, sp.Unequality)) and rhs == 0 and _is_bool_load(lhs, syms):
            load = from_sympy(lhs, syms)
            return load if isinstance(e, sp.Unequality) else Node(Op.NOT, T.BOOL, (load,))
        if rhs == 0 and isinstance(lhs, sp.Add):  # x - y >= 0  ->  x >= y
            pos = [a for a in lhs.args if not a.could_extract_minus_sign()]
            neg = [-a for a in lhs.args if a.could_extract_minus_sign()]
            if pos and neg:
                lhs, rhs = sp.Add(*pos), sp.Add(*neg)
        return _bin(_REL[type(e)], from_sympy(lhs, syms), from_sympy(rhs, syms))
    if isinstance(e, (sp.And, sp.Or)):
        op = Op.AND if isinstance(e, sp.And) else Op.OR
        args = sorted(e.args, key=lambda a: (_is_tensor(a), sp.default_sort_key(a)))
        out = from_sympy(args[0], syms)
        for a in args[1:]:
            out = _bin(op, out, from_sympy(a, syms))
        return out
    if isinstance(e, sp.Not):
        return Node(Op.NOT, T.BOOL, (from_sympy(e.args[0], syms),))
    if isinstance(e, sp.Equivalent) and len(e.args) == 2:
        return _bin(Op.EQ, *(from_sympy(a, syms) for a in e.args))
    if isinstance(e, (sp.Min, sp.Max)):
        op = Op.MIN if isinstance(e, sp.Min) else Op.MAX
        args = [from_sympy(a, syms) for a in e.args]
        out = args[0]
        for a in args[1:]:
            out = _bin(op, out, a)
        return out
    if isinstance(e, sp.Piecewise):
        *pairs, (last, cond) = e.args
        if cond is not sp.true:
            raise NotRepresentableError(str(e))
        out = from_sympy(last, syms)
        for val, c in reversed(pairs):
            a = from_sympy(val, syms)
            out = Node(Op.WHERE, T.FLOAT if T.FLOAT in (a.type, out.type) else a.type,
                       (from_sympy(c, syms), a, out))
        return out
    if isinstance(e, sp.ITE):
        c, a, b = (from_sympy(x, syms) for x in e.args)
        return Node(Op.WHERE, T.BOOL, (c, a, b))
    if isinstance(e, (sp.Heaviside, sp.sign)):  # from derivatives of min/max/abs/clamp
        x = from_sympy(e.args[0], syms)
        zero = 0.5 if isinstance(e, sp.Heaviside) else 0.0
        if isinstance(e, sp.Heaviside) and len(e.args) > 1:
            zero = float(e.args[1])
        neg = 0.0 if isinstance(e, sp.Heaviside) else -1.0
        z = const(0)
        inner = Node(Op.WHERE, T.FLOAT, (_bin(Op.LT, x, z), const(neg), const(zero)))
        return Node(Op.WHERE, T.FLOAT, (_bin(Op.GT, x, z), const(1.0), inner))
    if type(e) in _FN:
        x = from_sympy(e.args[0], syms)
        op = _FN[type(e)]
        return Node(op, x.type if op is Op.ABS else T.FLOAT, (x,))
    raise NotRepresentableError(f"{type(e).__name__}: {e}")


def _is_bool_load(e, syms: Symbols) -> bool:
    name = e.func.__name__[3:] if isinstance(e, sp.Function) else ""
    return name in syms.loads and syms.loads[name][1] is T.BOOL


def _assoc(args, syms: Symbols, add: bool) -> Node:
    """Fold a sum or product with per-program parts first: (s1 * s2) * tile, not s1 * (s2 * tile).
    In sums, positive terms come first so that negative ones print as subtractions."""
    if not add:
        args = sorted(args, key=lambda a: (_is_tensor(a), sp.default_sort_key(a)))
        if args and args[0] == -1 and len(args) > 1:
            rest = _assoc(args[1:], syms, add=False)
            return Node(Op.NEG, rest.type, (rest,))
        out = from_sympy(args[0], syms)
        for a in args[1:]:
            out = _bin(Op.MUL, out, from_sympy(a, syms))
        return out
    groups = [[a for a in args if _is_tensor(a) == t] for t in (False, True)]
    parts = []
    for g in groups:
        g = sorted(g, key=lambda a: (a.could_extract_minus_sign(), sp.default_sort_key(a)))
        if g:
            parts.append(g)
    if len(parts) == 2 and all(a.could_extract_minus_sign() for a in parts[0]):
        parts = [parts[1] + parts[0]]  # tile - scalar reads better than (-scalar) + tile
    out = None
    for a in (a for g in parts for a in g):
        neg = a.could_extract_minus_sign() and out is not None
        y = from_sympy(-a if neg else a, syms)
        out = y if out is None else _bin(Op.SUB if neg else Op.ADD, out, y)
    return out


_FLIP = {sp.StrictLessThan: sp.StrictGreaterThan, sp.LessThan: sp.GreaterThan}


def canonical(e):
    """Write every relational as `x > 0`, `x >= 0`, `x == 0` or `x != 0` with x = lhs - rhs,
    so that equal conditions written differently merge (and drop) in And/Or."""
    def fix(r):
        x = sp.expand(r.lhs - r.rhs)
        t = type(r)
        if t in _FLIP:
            x, t = -x, _FLIP[t]
        if t in (sp.Equality, sp.Unequality) and x.could_extract_minus_sign():
            x = -x
        return t(x, 0)
    return e.replace(lambda a: isinstance(a, sp.Rel), fix)


def sympify(n: Node, syms: Symbols):
    return canonical(to_sympy(n, syms))


def roundtrip(n: Node | None, syms: Symbols) -> Node | None:
    """Simplify an IR expression through sympy; keep the original if sympy's form is not printable."""
    if n is None:
        return None
    try:
        out = from_sympy(sympify(n, syms), syms)
    except NotRepresentableError:
        return n
    if n.type is T.FLOAT and out.type is not T.FLOAT:
        out = Node(Op.ADD, T.FLOAT, (out, const(0.0)))
    return out


# ---------------------------------------------------------------- block ranges

@dataclass(frozen=True)
class Segment:
    """One DNF conjunct: kv_idx in [max(lo), min(hi)] for rows where the q-atoms hold."""

    lo: tuple[tuple[Node, int], ...]  # lower bounds on kv_idx: (f(q_idx), +1/-1/0 monotone direction)
    hi: tuple[tuple[Node, int], ...]  # upper bounds (inclusive)
    q_atoms: tuple[Node, ...]     # half-line predicates on q_idx alone
    guards: tuple[Node, ...]      # per-program predicates (no q_idx, no kv_idx)
    residual: bool                # some atom must be checked per element: no full blocks


@dataclass(frozen=True)
class InputGrad:
    """One read of a learnable input in the score: where it reads, and d score / d (the read)."""

    name: str
    index: tuple[Node, ...]
    partial: Node


@dataclass(frozen=True)
class Plan:
    """What the kernels need: the simplified mask, the exp2-domain logit, the segments both ways,
    and the derivatives for the backward pass."""

    mask: Node | None             # evaluated on partial blocks
    logit: Node                   # log2-domain score as a function of qk, sm_scale, indices
    segments: tuple[Segment, ...]     # key blocks per query block (forward, dQ)
    segments_t: tuple[Segment, ...]   # query blocks per key block (dK/dV)
    sparse: bool                  # False: the analysis was off or gave up (dense loops)
    dlogit: Node                  # d score / d qk in natural units (sm_scale included)
    input_grads: tuple[InputGrad, ...]
    notes: tuple[str, ...] = ()
    logit_scale: Node | None = None   # c where the logit is c * qk and c depends on sm_scale alone
    split: Split | None = None        # the logit as a qk term, a key term and a query term
    runs: tuple[Run, ...] = ()        # conjuncts T[.., q_idx] == T[.., kv_idx] (see the module docstring)
    rest: tuple[Segment, ...] = ()    # forward segments of the mask without its runs and cells
    cells: tuple[Cells, ...] = ()     # conjuncts T[.., q_idx // rows, kv_idx // cols]: block layouts


@dataclass(frozen=True)
class Run:
    """A conjunct T[prefix.., q_idx] == T[prefix.., kv_idx]: `q` and `kv` are its two loads."""

    q: Node
    kv: Node


@dataclass(frozen=True)
class Cells:
    """A conjunct T[prefix.., q_idx // rows, kv_idx // cols], read as bool or compared `!= 0` (a `sparse`
    clause): a block layout. `load` is the read."""

    load: Node
    rows: int
    cols: int


@dataclass(frozen=True)
class Split:
    """A logit c * qk + f(kv_idx) + g(q_idx) (ALiBi's), written about an origin kv0 as
    c * qk + key - shift with key = f(kv_idx) - f(kv0) and shift = -g(q_idx) - f(kv0). The kernels form
    c * qk + key (key: a vector over a block's keys) and move shift into the row statistics (P = exp2(logit - LSE)
    = exp2(c * qk + key - (LSE + shift))), so no 2-D index tile lives beside the accumulators (ALiBi's Gluon
    dK/dV spilled 860 bytes with one). kv0 is the program's first row, query or key: key stays within a block's
    span (where shift is large, the entry's probability is negligible). The Triton kernels split for 16-bit inputs
    only: in float32 the backward recomputes the forward's logits bit for bit, which different origins would not."""

    qk: Node      # c: reads no position
    key: Node     # reads kv_idx and kv0, not q_idx
    shift: Node   # reads q_idx and kv0, not kv_idx


def _direction(e, q) -> int | None:
    """+1/-1 if e is monotone non-decreasing/non-increasing in q, 0 if free of q, None if unknown."""
    if not e.has(q):
        return 0
    if e == q:
        return 1
    if isinstance(e, sp.Add):
        ds = {_direction(a, q) for a in e.args} - {0}
        return ds.pop() if len(ds) == 1 and None not in ds else None
    if isinstance(e, sp.Mul):
        with_q = [a for a in e.args if a.has(q)]
        rest = sp.Mul(*[a for a in e.args if not a.has(q)])
        if len(with_q) != 1:
            return None
        d = _direction(with_q[0], q)
        if d is None:
            return None
        if rest.is_nonnegative:
            return d
        if rest.is_nonpositive:
            return -d
        return None
    if isinstance(e, sp.floor):
        return _direction(e.args[0], q)
    if isinstance(e, (sp.Min, sp.Max)):
        ds = {_direction(a, q) for a in e.args} - {0}
        return ds.pop() if len(ds) == 1 and None not in ds else None
    return None


def _unsafe(e) -> bool:
    """Bounds must be plain arithmetic: no loads, conditionals or float functions."""
    return bool(e.atoms(sp.Piecewise, sp.Mod, sp.Abs)) or any(
        f.func.__name__.startswith("in_") for f in e.atoms(sp.Function))


def _k_bounds(atom, k, q) -> list[tuple[str, object, int]] | None:
    """Solve a relational atom for kv_idx: [('lo'|'hi', bound(q), direction)], or None if residual."""
    if type(atom) not in _REL or isinstance(atom, sp.Unequality):
        return None
    e = sp.expand(atom.lhs - atom.rhs)
    rel = type(atom)
    scale = sp.Integer(1)
    floors = [f for f in e.atoms(sp.floor) if f.has(k)]
    if floors:  # kv_idx // C: substitute u = floor(k / C), then k = C*u + [0, C)
        if len(floors) != 1:
            return None
        num, den = sp.fraction(sp.together(floors[0].args[0]))
        if num != k or not den.is_positive or not den.is_integer:
            return None
        u = sp.Symbol("_u", integer=True)
        e = e.subs(floors[0], u)
        scale, k_var = den, u
    else:
        k_var = k
    if e.has(k) if k_var is not k else False:
        return None
    a = e.diff(k_var)
    r = sp.expand(e - a * k_var)
    if not (a.is_Integer and a != 0) or r.has(k_var) or r.has(k) or not r.is_integer or _unsafe(r):
        return None
    # integer relations: strict -> non-strict
    if rel is sp.StrictGreaterThan:
        r, rel = r - 1, sp.GreaterThan
    elif rel is sp.StrictLessThan:
        r, rel = r + 1, sp.LessThan
    a = int(a)
    out = []
    want_lo = (rel is sp.GreaterThan and a > 0) or (rel is sp.LessThan and a < 0) or rel is sp.Equality
    want_hi = (rel is sp.GreaterThan and a < 0) or (rel is sp.LessThan and a > 0) or rel is sp.Equality
    # a*x + r >= 0 with a > 0  <=>  x >= ceil(-r/a);   a*x + r <= 0 with a > 0  <=>  x <= floor(-r/a)
    if want_lo:
        out.append(("lo", -sp.floor(r / a) if a > 0 else -sp.floor(-r / -a)))
    if want_hi:
        out.append(("hi", sp.floor(-r / a) if a > 0 else sp.floor(r / -a)))
    if k_var is not k:  # u >= L  <=>  k >= C*L;   u <= H  <=>  k <= C*H + C - 1
        out = [(s, scale * b if s == "lo" else scale * b + scale - 1) for s, b in out]
    out = [(side, b, _direction(b, q)) for side, b in out]
    return None if any(d is None for *_, d in out) else out


def _q_halfline(atom, q) -> bool:
    if type(atom) not in _REL or isinstance(atom, (sp.Equality, sp.Unequality)):
        return False
    e = atom.lhs - atom.rhs
    return _direction(e, q) is not None and not _unsafe(e)


def _segments(mask, syms: Symbols, row: str = "q_idx", col: str = "kv_idx"
              ) -> tuple[tuple[Segment, ...], list[str]] | None:
    """Segments of visible `col` indices per block of `row` indices (forward and dQ: rows are
    queries; dK/dV: rows are keys, so the same algebra gives the query range per key block)."""
    q, k = syms[row], syms[col]
    if mask is sp.false:
        return (), ["mask is always false"]
    if mask is sp.true:
        return (Segment((), (), (), (), False),), []
    try:
        dnf = to_dnf(mask, simplify=False)
    except Exception:  # pragma: no cover - sympy refuses exotic forms
        return None
    terms = dnf.args if isinstance(dnf, sp.Or) else (dnf,)
    if len(terms) > MAX_SEGMENTS:
        return None
    segs, notes = [], []
    for c in terms:
        atoms = c.args if isinstance(c, sp.And) else (c,)
        lo, hi, qa, guards, residual = [], [], [], [], False
        for a in atoms:
            if a.has(k):
                bounds = _k_bounds(a, k, q)
                if bounds is None:
                    residual = True
                    notes.append(f"residual (checked per element): {a}")
                for side, b, d in bounds or ():
                    bound = (from_sympy(b, syms), d)
                    target = lo if side == "lo" else hi
                    if bound not in target:
                        target.append(bound)
            elif a.has(q):
                if _q_halfline(a, q):
                    qa.append(from_sympy(a, syms))
                else:
                    residual = True
                    notes.append(f"residual row condition: {a}")
            else:
                guards.append(from_sympy(a, syms))
        segs.append(Segment(tuple(lo), tuple(hi), tuple(qa), tuple(guards), residual))
    return tuple(segs), notes


def _run(atom: Node) -> Run | None:
    """The Run of `T[p.., q_idx] == T[p.., kv_idx]` (either side), else None. The prefix indices must be
    the same and read neither position, so that one run of T serves a whole row of tiles."""
    if atom.op is not Op.EQ or any(s.op is not Op.LOAD for s in atom.srcs):
        return None
    a, b = atom.srcs
    if a.arg != b.arg or a.srcs[:-1] != b.srcs[:-1] or any(i.vars() & {"q_idx", "kv_idx"} for i in a.srcs[:-1]):
        return None
    last = {s.srcs[-1].arg: s for s in (a, b) if s.srcs[-1].op is Op.VAR}
    return Run(last["q_idx"], last["kv_idx"]) if set(last) == {"q_idx", "kv_idx"} else None


def _cells(atom: Node) -> Cells | None:
    """The Cells of `T[p.., q_idx // R, kv_idx // C]` (a bool read, or one `!= 0`) with constant R, C > 0 and
    prefix indices that read neither position, else None."""
    zero = [s for s in atom.srcs if s.op is Op.CONST and s.arg == 0]
    if atom.op is Op.NE and len(zero) == 1:
        atom = next(s for s in atom.srcs if s is not zero[0])
    elif atom.type is not T.BOOL:
        return None
    if atom.op is not Op.LOAD or len(atom.srcs) < 2:
        return None
    *pre, r, c = atom.srcs
    if any(i.vars() & {"q_idx", "kv_idx"} for i in pre):
        return None
    size = []
    for idx, var in ((r, "q_idx"), (c, "kv_idx")):
        a, d = idx.srcs if idx.op is Op.FLOORDIV else (None, None)
        if a is None or a.op is not Op.VAR or a.arg != var or d.op is not Op.CONST or d.type is not T.INT or d.arg < 1:
            return None
        size.append(d.arg)
    return Cells(atom, *size)


def _runs(mask: Node | None, syms: Symbols) -> tuple[tuple[Run, ...], tuple[Cells, ...], tuple[Segment, ...]]:
    """The mask's top-level runs and cells and the forward segments of what is left ((), (), () if none)."""
    if mask is None:
        return (), (), ()
    found = [(c, _run(c), _cells(c)) for c in conjuncts(mask)]
    runs = [r for _, r, _ in found if r is not None]
    cells = [x for _, r, x in found if r is None and x is not None]
    rest = [c for c, r, x in found if r is None and x is None]
    if not runs and not cells:
        return (), (), ()
    left = sp.true
    for c in rest:
        left = sp.And(left, sympify(c, syms))
    segs = _segments(left, syms)
    return (tuple(runs), tuple(cells), segs[0]) if segs is not None else ((), (), ())


def plan(k: Kernel, sparse: bool = True) -> Plan:
    """Run the sympy stage on a lowered kernel."""
    syms = Symbols.for_kernel(k)
    mask_sp = sympify(k.mask, syms) if k.mask is not None else sp.true
    mask = None if mask_sp is sp.true else simplify(k).mask
    score = sympify(k.score, syms) if k.score is not None else syms["score"]
    at_qk = {syms["score"]: syms["qk"] * syms["sm_scale"]}
    logit_sp = LOG2E * score.subs(at_qk)
    logit = _printable(logit_sp, syms, k, "the score")
    dlogit, grads = _derivatives(k, score, syms, at_qk)
    # a plain (scaled) score: the forward takes row maxima from qk itself and never forms c * qk
    c = sp.diff(logit_sp, syms["qk"])
    linear = c.free_symbols <= {syms["sm_scale"]} and sp.simplify(logit_sp - c * syms["qk"]) == 0
    scale = _printable(c, syms, k, "the score's scale") if linear and c != 0 else None
    split = _split(logit_sp, c, syms, k)
    everything = Segment((), (), (), (), mask is not None)
    if not sparse:
        return Plan(mask, logit, (everything,), (everything,), False, dlogit, grads, ("sparsity analysis off",),
                    scale, split)
    found = _segments(mask_sp, syms)
    found_t = _segments(mask_sp, syms, row="kv_idx", col="q_idx")
    if found is None or found_t is None:
        return Plan(mask, logit, (everything,), (everything,), False, dlogit, grads,
                    ("mask too complex for block ranges",), scale, split)
    runs, cells, rest = _runs(k.mask, syms)
    return Plan(mask, logit, found[0], found_t[0], True, dlogit, grads, tuple(found[1]), scale, split, runs, rest,
                cells)


def _split(logit, c, syms: Symbols, k: Kernel) -> Split | None:
    """The logit's Split, when it reads positions and every term of logit - c * qk reads kv_idx or q_idx
    but not both (a term reading neither joins the query's). Terms must be polynomials in the positions, with
    no infinity and no tensor read at a position: f(kv_idx) - f(kv0) must stay finite (a -inf key bias at kv0
    would give NaN), and a -inf query term would empty a row, which a shift of the LSE cannot express."""
    q, kv, qk, kv0 = syms["q_idx"], syms["kv_idx"], syms["qk"], syms["kv0"]
    if not {q, kv} & logit.free_symbols or c.free_symbols & {q, kv, qk}:
        return None
    rest = sp.expand(logit - c * qk)
    if rest.has(qk, sp.oo, -sp.oo, sp.zoo, sp.nan):
        return None
    key, query = sp.Integer(0), sp.Integer(0)
    for term in sp.Add.make_args(rest):
        reads = term.free_symbols
        if {q, kv} <= reads or not term.is_polynomial(q, kv) or any(
                _is_tensor(f) for f in term.atoms(sp.Function) if f.func.__name__.startswith("in_")):
            return None
        if kv in reads:
            key += term
        else:
            query += term
    # factor_terms keeps differences of positions together (slope * (kv_idx - kv0)): exact in integers
    key, shift = sp.factor_terms(key - key.subs(kv, kv0)), sp.factor_terms(-query - key.subs(kv, kv0))
    return Split(*(_printable(e, syms, k, "the score") for e in (c, key, shift)))


def _printable(e, syms: Symbols, k: Kernel, what: str) -> Node:
    try:
        out = from_sympy(e, syms)
    except NotRepresentableError as err:
        raise AttnError(f"cannot print {what} after simplification: {err}", k.score.span if k.score else k.span,
                        "rewrite the score with the supported functions") from None
    if out.type is T.FLOAT:
        return out
    return const(float(out.arg)) if out.op is Op.CONST else Node(Op.ADD, T.FLOAT, (out, const(0.0)))


def _derivatives(k: Kernel, score, syms: Symbols, at_qk: dict) -> tuple[Node, tuple[InputGrad, ...]]:
    """d score / d qk (natural units, scale included) and d score / d (each learnable read)."""
    span = k.score.span if k.score is not None else k.span

    def diff(e, x, what: str):
        d = sp.diff(e, x)
        if d.has(sp.Derivative, sp.Subs, sp.DiracDelta):
            raise AttnError(f"sympy cannot differentiate the score with respect to {what}: {d}", span,
                            "the backward pass needs d score / d score; use differentiable functions")
        return d

    dlogit = _printable(diff(score, syms["score"], "score").subs(at_qk) * syms["sm_scale"], syms, k,
                        "the score's derivative")
    grads = []
    learnable = {i.name for i in k.inputs if i.learnable}
    reads = sorted((f for f in score.atoms(sp.Function) if f.func.__name__[3:] in learnable),
                   key=sp.default_sort_key)
    for f in reads:
        x = sp.Dummy("read", real=True)
        d = diff(score.xreplace({f: x}), x, f"input {f.func.__name__[3:]!r}").xreplace({x: f}).subs(at_qk)
        grads.append(InputGrad(f.func.__name__[3:], tuple(from_sympy(a, syms) for a in f.args),
                               _printable(d, syms, k, "the score's derivative")))
    return dlogit, tuple(grads)


def simplify(k: Kernel) -> Kernel:
    """The kernel with mask and score simplified by sympy (used to prove the rewrite in tests)."""
    syms = Symbols.for_kernel(k)
    return verify(replace(k, mask=roundtrip(k.mask, syms), score=roundtrip(k.score, syms)))
