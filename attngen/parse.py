"""Stage 1: spec text -> AST. Lark LALR with positions; parse failures become AttnErrors."""

from __future__ import annotations

import hashlib
import io
from functools import cache

import lark
from lark import Lark, Token, Transformer, v_args

from . import ast
from .errors import AttnError, Span
from .resources import resource_dir

_KEYWORD_HINT = ("each clause starts with one of: heads, param, const, input, let, mask, "
                 "score, scale, layout")


@cache
def _parser() -> Lark:
    """The LALR parser; its tables are saved in the user's cache (building them is a tenth of a
    compile), keyed by the grammar, the options and Lark's version."""
    from .runtime import writable_cache, write_atomic

    grammar = (resource_dir("grammar") / "attn.lark").read_text()
    opts = dict(parser="lalr", propagate_positions=True, maybe_placeholders=True)
    key = hashlib.sha256(f"{lark.__version__}\0{sorted(opts.items())}\0{grammar}".encode()).hexdigest()[:16]
    folder = writable_cache("parser")
    path = folder / f"attn-{key}.lark" if folder else None
    if path and path.exists():
        try:
            with open(path, "rb") as f:
                return Lark.load(f)
        except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt below
            pass
    parser = Lark(grammar, **opts)
    if path:
        buf = io.BytesIO()
        parser.save(buf)
        try:
            write_atomic(path, buf.getvalue())
        except OSError:
            pass  # no cache this time
    return parser


def _span(file: str, meta) -> Span:
    return Span(file, meta.line, meta.column, meta.end_line, meta.end_column)


def _tok_span(file: str, tok: Token) -> Span:
    return Span(file, tok.line, tok.column, tok.end_line or tok.line,
                tok.end_column or tok.column + len(tok))


def _fold(items: list, meta_span: Span) -> ast.Expr:
    """Left-fold `a op b op c` into nested Binary nodes."""
    out = items[0]
    for i in range(1, len(items), 2):
        rhs = items[i + 1]
        span = Span(meta_span.file, out.span.line, out.span.col, rhs.span.end_line, rhs.span.end_col)
        out = ast.Binary(span, str(items[i]), out, rhs)
    return out


class _ToAst(Transformer):
    def __init__(self, file: str) -> None:
        super().__init__()
        self.file = file

    def _s(self, meta) -> Span:
        return _span(self.file, meta)

    # expressions
    @v_args(meta=True)
    def int_(self, meta, c):
        return ast.Num(self._s(meta), int(c[0]))

    @v_args(meta=True)
    def float_(self, meta, c):
        return ast.Num(self._s(meta), float(c[0]))

    @v_args(meta=True)
    def true(self, meta, c):
        return ast.Num(self._s(meta), True)

    @v_args(meta=True)
    def false(self, meta, c):
        return ast.Num(self._s(meta), False)

    @v_args(meta=True)
    def name(self, meta, c):
        return ast.Name(self._s(meta), str(c[0]))

    @v_args(meta=True)
    def call(self, meta, c):
        return ast.Call(self._s(meta), str(c[0]), tuple(a for a in c[1:] if a is not None))

    @v_args(meta=True)
    def index(self, meta, c):
        return ast.Index(self._s(meta), str(c[0]), tuple(c[1:]))

    @v_args(meta=True)
    def neg(self, meta, c):
        return ast.Unary(self._s(meta), "-", c[0])

    def pos(self, c):
        return c[0]

    @v_args(meta=True)
    def not_(self, meta, c):
        return ast.Unary(self._s(meta), "not", c[0])

    @v_args(meta=True)
    def binops(self, meta, c):
        return _fold(c, self._s(meta))

    @v_args(meta=True)
    def and_(self, meta, c):
        return _fold(sum(([x, "and"] for x in c), [])[:-1], self._s(meta))

    @v_args(meta=True)
    def or_(self, meta, c):
        return _fold(sum(([x, "or"] for x in c), [])[:-1], self._s(meta))

    @v_args(meta=True)
    def compare(self, meta, c):
        if len(c) == 1:
            return c[0]
        # a < b <= c  ==  (a < b) and (b <= c), as in Python
        pairs = [ast.Binary(Span(self.file, c[i].span.line, c[i].span.col, c[i + 2].span.end_line,
                                 c[i + 2].span.end_col), str(c[i + 1]), c[i], c[i + 2])
                 for i in range(0, len(c) - 2, 2)]
        out = pairs[0]
        for p in pairs[1:]:
            out = ast.Binary(self._s(meta), "and", out, p)
        return out

    @v_args(meta=True)
    def ifexp(self, meta, c):
        return ast.IfExp(self._s(meta), c[1], c[0], c[2])

    # clauses
    @v_args(meta=True)
    def head_item(self, meta, c):
        return (str(c[0]), int(c[1]), self._s(meta))

    @v_args(meta=True)
    def heads(self, meta, c):
        return ast.Heads(self._s(meta), tuple(c))

    @v_args(meta=True)
    def param(self, meta, c):
        return ast.Param(self._s(meta), str(c[0]), str(c[1]), c[2], const=False)

    @v_args(meta=True)
    def const(self, meta, c):
        return ast.Param(self._s(meta), str(c[0]), str(c[1]), c[2], const=True)

    @v_args(meta=True)
    def input(self, meta, c):
        learnable = c[-1] is not None
        return ast.Input(self._s(meta), str(c[0]), str(c[1]), tuple(c[2:-1]), learnable)

    @v_args(meta=True)
    def sparse(self, meta, c):
        return ast.Sparse(self._s(meta), str(c[0]), str(c[1]), tuple(x for x in c[2:-2] if x is not None), c[-2],
                          c[-1])

    @v_args(meta=True)
    def let(self, meta, c):
        return ast.Let(self._s(meta), str(c[0]), c[1])

    @v_args(meta=True)
    def mask_def(self, meta, c):
        return ast.Let(self._s(meta), str(c[0]), c[1], is_mask=True)

    @v_args(meta=True)
    def mask(self, meta, c):
        return ast.Body(self._s(meta), "mask", c[0])

    @v_args(meta=True)
    def score(self, meta, c):
        return ast.Body(self._s(meta), "score", c[0])

    @v_args(meta=True)
    def scale(self, meta, c):
        return ast.Body(self._s(meta), "scale", c[0])

    @v_args(meta=True)
    def layout(self, meta, c):
        return ast.Layout(self._s(meta), str(c[0]))

    @v_args(meta=True)
    def spec(self, meta, c):
        return ast.Spec(str(c[0]), tuple(c[1:]), self._s(meta))


_EXPECT_NAMES = {
    "NAME": "a name", "INT": "an integer", "FLOAT": "a number", "LBRACE": "'{'", "RBRACE": "'}'",
    "LPAR": "'('", "RPAR": "')'", "EQUAL": "'='", "COLON": "':'", "COMMA": "','",
    "RSQB": "']'", "LSQB": "'['", "ATTENTION": "'attention'", "ELSE": "'else'",
}


def _describe_expected(expected: set[str]) -> str:
    names = sorted({_EXPECT_NAMES.get(e, e.lower()) for e in expected})
    if len(names) > 6:
        names = names[:6] + ["..."]
    return ", ".join(names)


def _syntax_error(file: str, source: str, e: lark.exceptions.LarkError) -> AttnError:
    if isinstance(e, lark.UnexpectedCharacters):
        span = Span(file, e.line, e.column, e.line, e.column + 1)
        return AttnError(f"unexpected character {e.char!r}", span,
                         "names are letters, digits and '_'; '#' starts a comment")
    if isinstance(e, lark.UnexpectedEOF) or (isinstance(e, lark.UnexpectedToken) and e.token.type == "$END"):
        lines = source.rstrip("\n").split("\n")  # Lark counts lines by \n alone
        span = Span(file, len(lines), len(lines[-1]) + 1, len(lines), len(lines[-1]) + 2)
        return AttnError("unexpected end of file", span, "is a '}' or an operand missing?")
    if isinstance(e, lark.UnexpectedToken):
        tok = e.token
        what = repr(str(tok))
        hint = f"expected {_describe_expected(set(e.expected))}"
        if tok.type == "NAME" and {"RBRACE"} <= set(e.expected):
            hint = f"unknown clause {what}; {_KEYWORD_HINT}"
        elif tok.type == "EQUAL":
            hint = "use '==' to compare; '=' only appears in definitions"
        return AttnError(f"unexpected {what}", _tok_span(file, tok), hint)
    return AttnError(str(e))


def parse(source: str, file: str = "<spec>") -> ast.Module:
    """Parse spec source into an AST module, raising a positioned AttnError on bad syntax."""
    try:
        tree = _parser().parse(source)
    except lark.exceptions.UnexpectedInput as e:
        raise _syntax_error(file, source, e).with_source(source) from None
    items = _ToAst(file).transform(tree).children
    defs = tuple(i for i in items if isinstance(i, ast.Let))
    specs = tuple(i for i in items if isinstance(i, ast.Spec))
    return ast.Module(file, source, defs, specs)
