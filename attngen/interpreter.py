"""The eager interpreter: executes the IR densely in plain PyTorch.

It is the definition of the IR's meaning and the oracle for every generated
kernel. Any dtype works (float64 for goldens) and autograd flows through q, k,
v and floating-point inputs. Fully masked rows give output 0 and LSE -inf.
"""

from __future__ import annotations

import math

import torch

from .errors import AttnError
from .ir import Kernel, Node, Op, T

_TORCH_DTYPES = {"bool": torch.bool, "int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16,
                 "int32": torch.int32, "int64": torch.int64, "float16": torch.float16,
                 "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def _floordiv(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.div(torch.as_tensor(a), b, rounding_mode="floor")
    return a // b


def _mod(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.remainder(torch.as_tensor(a), b)
    return a % b


def _t(x, like: torch.Tensor | None = None):
    return x if isinstance(x, torch.Tensor) else torch.tensor(x, device=like.device if like is not None else None)


_UNARY = {Op.EXP: torch.exp, Op.LOG: torch.log, Op.SQRT: torch.sqrt, Op.TANH: torch.tanh,
          Op.SIGMOID: torch.sigmoid}
_BIN = {Op.ADD: lambda a, b: a + b, Op.SUB: lambda a, b: a - b, Op.MUL: lambda a, b: a * b,
        Op.FLOORDIV: _floordiv, Op.MOD: _mod,
        Op.LT: lambda a, b: a < b, Op.LE: lambda a, b: a <= b, Op.GT: lambda a, b: a > b,
        Op.GE: lambda a, b: a >= b, Op.EQ: lambda a, b: a == b, Op.NE: lambda a, b: a != b}


class Env:
    """Values for VAR/PARAM/LOAD: broadcastable tensors or Python scalars."""

    def __init__(self, vars: dict, params: dict, inputs: dict, float_dtype: torch.dtype,
                 device: torch.device) -> None:
        self.vars, self.params, self.inputs = vars, params, inputs
        self.float_dtype, self.device = float_dtype, device
        self.memo: dict[Node, object] = {}


def evaluate(n: Node, env: Env):
    """Evaluate an IR expression; integer ops use Python semantics, floats use env.float_dtype."""
    if n in env.memo:
        return env.memo[n]
    op = n.op
    if op is Op.CONST:
        out = n.arg
    elif op is Op.VAR:
        out = env.vars[n.arg]
    elif op is Op.PARAM:
        out = env.params[n.arg]
    elif op is Op.LOAD:
        out = _load(n, env)
    else:
        xs = [evaluate(s, env) for s in n.srcs]
        if op is Op.NEG:
            out = -xs[0]
        elif op is Op.DIV:
            a, b = (_t(x, None).to(env.float_dtype) if not isinstance(x, float) else x for x in xs)
            out = a / b
        elif op in _BIN:
            out = _BIN[op](*xs)
        elif op is Op.AND:
            out = xs[0] & xs[1] if isinstance(xs[0], torch.Tensor) or isinstance(xs[1], torch.Tensor) \
                else xs[0] and xs[1]
        elif op is Op.OR:
            out = xs[0] | xs[1] if isinstance(xs[0], torch.Tensor) or isinstance(xs[1], torch.Tensor) \
                else xs[0] or xs[1]
        elif op is Op.NOT:
            out = ~xs[0] if isinstance(xs[0], torch.Tensor) else not xs[0]
        elif op is Op.WHERE:
            c, a, b = xs
            if isinstance(c, bool) and not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
                out = a if c else b
            else:
                out = torch.where(_t(c), _as_float(a, env) if n.type is T.FLOAT else _t(a),
                                  _as_float(b, env) if n.type is T.FLOAT else _t(b))
        elif op in (Op.MIN, Op.MAX):
            a, b = xs
            if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
                f = torch.minimum if op is Op.MIN else torch.maximum
                if n.type is T.FLOAT:
                    a, b = _as_float(a, env), _as_float(b, env)
                out = f(_t(a), _t(b))
            else:
                out = min(a, b) if op is Op.MIN else max(a, b)
        elif op is Op.ABS:
            out = abs(xs[0])
        elif op in _UNARY:
            out = _UNARY[op](_as_float(xs[0], env))
        else:
            raise AttnError(f"interpreter: unknown op {op}")
    if n.type is T.FLOAT and op not in (Op.CONST, Op.PARAM):
        out = _as_float(out, env)
    env.memo[n] = out
    return out


def _as_float(x, env: Env):
    if isinstance(x, torch.Tensor):
        return x if x.dtype == env.float_dtype else x.to(env.float_dtype)
    return torch.tensor(float(x), dtype=env.float_dtype, device=env.device)


def _load(n: Node, env: Env):
    """Read an input tensor; positions outside its bounds read 0 (False), as in the kernel.
    That makes guards like `kv_idx < c or table[b, kv_idx - c]` well defined."""
    t = env.inputs[n.arg]
    idx = [torch.as_tensor(evaluate(s, env), device=t.device).long() for s in n.srcs]
    idx = torch.broadcast_tensors(*idx)
    inside = torch.ones(idx[0].shape, dtype=torch.bool, device=t.device)
    for i, size in zip(idx, t.shape):
        inside &= (i >= 0) & (i < size)
    safe = tuple(torch.where(inside, i, torch.zeros_like(i)) for i in idx)
    out = t[safe] if t.numel() else torch.zeros(inside.shape, dtype=t.dtype, device=t.device)
    out = torch.where(inside, out, torch.zeros_like(out))
    return out.to(env.float_dtype) if t.dtype.is_floating_point else out


def _positions(B: int, H: int, Sq: int, Sk: int, device) -> dict:
    ar = lambda n: torch.arange(n, device=device)  # noqa: E731
    return {"b": ar(B).view(B, 1, 1, 1), "h": ar(H).view(1, H, 1, 1),
            "q_idx": ar(Sq).view(1, 1, Sq, 1), "kv_idx": ar(Sk).view(1, 1, 1, Sk),
            "q_len": Sq, "kv_len": Sk}


def dense_mask(k: Kernel, B: int, H: int, Sq: int, Sk: int, params: dict, inputs: dict,
               device=None) -> torch.Tensor:
    """The mask as a dense bool tensor broadcast to [B, H, Sq, Sk]; all True without a mask."""
    if k.mask is None:
        return torch.ones(B, H, Sq, Sk, dtype=torch.bool, device=device)
    env = Env(_positions(B, H, Sq, Sk, device), params, inputs, torch.float32, device)
    m = evaluate(k.mask, env)
    return torch.as_tensor(m, device=device).expand(B, H, Sq, Sk)


def resolve_params(k: Kernel, given: dict) -> dict:
    out = {}
    for p in k.params:
        if p.name in given:
            out[p.name] = given[p.name]
        elif p.default is not None:
            out[p.name] = p.default
        else:
            raise TypeError(f"{k.name}: missing required param {p.name!r}")
    extra = set(given) - {p.name for p in k.params}
    if extra:
        raise TypeError(f"{k.name}: unexpected param(s) {sorted(extra)}")
    return out


def interpret(k: Kernel, q: torch.Tensor, kk: torch.Tensor, v: torch.Tensor, *,
              scale: float | None = None, return_lse: bool = False, **kwargs):
    """Run spec `k` densely. q: [B, Hq, Sq, Dqk], k: [B, Hkv, Sk, Dqk], v: [B, Hkv, Sk, Dv]
    in the spec's layout; inputs and params by keyword. Computes in q's dtype."""
    if k.layout.kind == "bshd":
        q, kk, v = (x.transpose(1, 2) for x in (q, kk, v))
    inputs = {i.name: kwargs.pop(i.name) for i in k.inputs if i.name in kwargs}
    missing = [i.name for i in k.inputs if i.name not in inputs]
    if missing:
        raise TypeError(f"{k.name}: missing input tensor(s) {missing}")
    params = resolve_params(k, kwargs)
    B, Hq, Sq, D = q.shape
    Hkv, Sk = kk.shape[1], kk.shape[2]
    dt, dev = q.dtype, q.device
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads are not a multiple of {Hkv} kv heads")
    kk = kk.repeat_interleave(Hq // Hkv, dim=1)
    v = v.repeat_interleave(Hq // Hkv, dim=1)
    env = Env(_positions(B, Hq, Sq, Sk, dev), params, inputs, dt, dev)
    if scale is None:
        scale = evaluate(k.scale, env) if k.scale is not None else 1.0 / math.sqrt(D)
    s = (q @ kk.transpose(-1, -2)) * float(scale)
    if k.score is not None:
        env.vars["score"] = s
        s = _as_float(evaluate(k.score, env), env).expand(B, Hq, Sq, Sk)
    if k.mask is not None:
        m = torch.as_tensor(evaluate(k.mask, env), device=dev).expand(B, Hq, Sq, Sk)
        s = s.masked_fill(~m, float("-inf"))
    # a softmax that gives 0 (not NaN) on fully masked rows, with finite gradients
    mx = s.detach().amax(-1, keepdim=True)
    mx = torch.where(torch.isinf(mx), torch.zeros_like(mx), mx)
    e = torch.exp(s - mx)
    den = e.sum(-1, keepdim=True)
    empty = den == 0
    den_safe = torch.where(empty, torch.ones_like(den), den)
    out = (e / den_safe) @ v
    if k.layout.kind == "bshd":
        out = out.transpose(1, 2)
    if not return_lse:
        return out
    lse = torch.where(empty, torch.full_like(den, float("-inf")), torch.log(den_safe) + mx).squeeze(-1)
    return out, lse
