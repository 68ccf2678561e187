"""The spec AST: frozen dataclasses that mirror the grammar, each with its source span."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import Span


@dataclass(frozen=True)
class Expr:
    span: Span = field(compare=False, repr=False)


@dataclass(frozen=True)
class Num(Expr):
    value: int | float | bool


@dataclass(frozen=True)
class Name(Expr):
    id: str


@dataclass(frozen=True)
class Call(Expr):
    fn: str
    args: tuple[Expr, ...]


@dataclass(frozen=True)
class Index(Expr):
    name: str
    args: tuple[Expr, ...]


@dataclass(frozen=True)
class Unary(Expr):
    op: str  # "-" or "not"
    x: Expr


@dataclass(frozen=True)
class Binary(Expr):
    op: str  # + - * / // % == != < <= > >= and or
    lhs: Expr
    rhs: Expr


@dataclass(frozen=True)
class IfExp(Expr):
    cond: Expr
    then: Expr
    other: Expr


@dataclass(frozen=True)
class Clause:
    span: Span = field(compare=False, repr=False)


@dataclass(frozen=True)
class Heads(Clause):
    items: tuple[tuple[str, int, Span], ...]


@dataclass(frozen=True)
class Param(Clause):
    name: str
    type: str
    default: Expr | None
    const: bool


@dataclass(frozen=True)
class Input(Clause):
    name: str
    dtype: str
    shape: tuple[Expr, ...]
    learnable: bool = False


@dataclass(frozen=True)
class Sparse(Clause):
    """`sparse NAME: DTYPE[lead..] block rows [, cols]`: an input of cells, one per rows x cols block of the
    (query, key) grid, indexed by the lead dims (b, h) and the block; a zero cell hides its block."""
    name: str
    dtype: str
    lead: tuple[Expr, ...]
    rows: Expr
    cols: Expr | None


@dataclass(frozen=True)
class Let(Clause):
    name: str
    expr: Expr
    is_mask: bool = False


@dataclass(frozen=True)
class Body(Clause):
    kind: str  # "mask" | "score" | "scale"
    expr: Expr


@dataclass(frozen=True)
class Layout(Clause):
    name: str


@dataclass(frozen=True)
class Spec:
    name: str
    clauses: tuple[Clause, ...]
    span: Span = field(compare=False, repr=False)


@dataclass(frozen=True)
class Module:
    file: str
    source: str
    defs: tuple[Let, ...]  # file-level `let` and named `mask` definitions
    specs: tuple[Spec, ...]
