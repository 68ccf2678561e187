"""Stage 3b: algebraic rewrites of the IR that change the problem the kernels solve.

Dilation. A mask with a top-level conjunct `(q_idx - kv_idx) % d == 0` (d a constant >= 2) only
pairs positions of the same residue r = q_idx % d. The kernel then runs d strided sub-problems:
q[r::d] against k[r::d], with q_idx -> d*q_idx + r and kv_idx -> d*kv_idx + r in the mask and
the score, where sympy folds the congruence to true. No FLOP is spent on the (d-1)/d of the pairs
that the congruence masks, and the sub-problems' block ranges (a causal diagonal, say) come from
the same analysis. The interpreter runs the original spec, so every test proves the rewrite.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .ir import Kernel, Node, Op, Param, T, conjuncts, const

# the rewritten kernel's extra params, set by the host per sub-problem (user names start with a letter)
RESIDUE, Q_LEN, KV_LEN = "_r", "_q_len", "_kv_len"


@dataclass(frozen=True)
class Rewritten:
    kernel: Kernel     # what the kernels compute
    dilation: int      # 1: unchanged


def _dilation(atom: Node) -> int | None:
    """d for `(q_idx - kv_idx) % d == 0` (either difference, either side of ==), else None."""
    if atom.op is not Op.EQ:
        return None
    a, b = atom.srcs
    if a.op is Op.CONST:
        a, b = b, a
    if not (b.op is Op.CONST and b.arg == 0 and a.op is Op.MOD):
        return None
    diff, d = a.srcs
    if d.op is not Op.CONST or isinstance(d.arg, bool) or not isinstance(d.arg, int) or d.arg < 2:
        return None
    names = {s.arg for s in diff.srcs if s.op is Op.VAR}
    return d.arg if diff.op is Op.SUB and names == {"q_idx", "kv_idx"} else None


def _substitute(n: Node | None, table: dict[str, Node]) -> Node | None:
    if n is None:
        return None
    if n.op is Op.VAR and n.arg in table:
        return table[n.arg]
    if not n.srcs:
        return n
    return replace(n, srcs=tuple(_substitute(s, table) for s in n.srcs))


def rewrite(k: Kernel, enabled: bool = True) -> Rewritten:
    """The kernel the templates should compile, and how the host must launch it."""
    if not enabled or k.mask is None or any(n.op is Op.LOAD for n in k.mask.walk()):
        return Rewritten(k, 1)  # masks that read tensors get a runtime block map instead
    ds = {_dilation(c) for c in conjuncts(k.mask)} - {None}
    if len(ds) != 1:
        return Rewritten(k, 1)
    d = ds.pop()
    r = Node(Op.PARAM, T.INT, (), RESIDUE)

    def pos(var: str) -> Node:  # d * idx + r, the original position of sub-problem index idx
        return Node(Op.ADD, T.INT, (Node(Op.MUL, T.INT, (const(d), Node(Op.VAR, T.INT, (), var))), r))
    table = {"q_idx": pos("q_idx"), "kv_idx": pos("kv_idx"),
             "q_len": Node(Op.PARAM, T.INT, (), Q_LEN), "kv_len": Node(Op.PARAM, T.INT, (), KV_LEN)}
    extra = tuple(Param(n, T.INT, None) for n in (RESIDUE, Q_LEN, KV_LEN))
    return Rewritten(replace(k, mask=_substitute(k.mask, table), score=_substitute(k.score, table),
                             params=k.params + extra), d)
