"""The eager interpreter: executes the IR densely in plain PyTorch.

It is the definition of the IR's meaning and the oracle for every generated
kernel. Any dtype works (float64 for goldens) and autograd flows through q, k,
v and floating-point inputs. Fully masked rows give output 0 and LSE -inf.
"""

from __future__ import annotations

import math

import torch

from .errors import AttnError
from .ir import SERVING, Kernel, Node, Op, T

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
    in the spec's layout; inputs and params by keyword. Computes in q's dtype.
    Serving layouts take their extra tensors by keyword too (see `_unpack_serving`)."""
    if k.layout.kind in SERVING:
        return _interpret_serving(k, q, kk, v, scale, return_lse, kwargs)
    if k.layout.kind == "bshd":
        q, kk, v = (x.transpose(1, 2) for x in (q, kk, v))
    inputs, params = _split_kwargs(k, kwargs)
    B, Hq, Sq, _ = q.shape
    env = Env(_positions(B, Hq, Sq, kk.shape[2], q.device), params, inputs, q.dtype, q.device)
    out, lse = _attend(k, q, kk, v, env, scale, None)
    if k.layout.kind == "bshd":
        out = out.transpose(1, 2)
    return (out, lse) if return_lse else out


def _split_kwargs(k: Kernel, kwargs: dict) -> tuple[dict, dict]:
    inputs = {i.name: kwargs.pop(i.name) for i in k.inputs if i.name in kwargs}
    missing = [i.name for i in k.inputs if i.name not in inputs]
    if missing:
        raise TypeError(f"{k.name}: missing input tensor(s) {missing}")
    return inputs, resolve_params(k, kwargs)


def _attend(k: Kernel, q, kk, v, env: Env, scale, valid):
    """Dense attention in [B, H, S, D]; `valid` (broadcastable bool) masks padding as well."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = kk.shape[1], kk.shape[2]
    dev = q.device
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads are not a multiple of {Hkv} kv heads")
    kk = kk.repeat_interleave(Hq // Hkv, dim=1)
    v = v.repeat_interleave(Hq // Hkv, dim=1)
    if scale is None:
        scale = evaluate(k.scale, env) if k.scale is not None else 1.0 / math.sqrt(D)
    s = (q @ kk.transpose(-1, -2)) * float(scale)
    if k.score is not None:
        env.vars["score"] = s
        s = _as_float(evaluate(k.score, env), env).expand(B, Hq, Sq, Sk)
    m = torch.ones((), dtype=torch.bool, device=dev) if k.mask is None else torch.as_tensor(evaluate(k.mask, env),
                                                                                              device=dev)
    if valid is not None:
        m = m & valid
    if k.mask is not None or valid is not None:
        s = s.masked_fill(~m.expand(B, Hq, Sq, Sk), float("-inf"))
    # a softmax that gives 0 (not NaN) on fully masked rows, with finite gradients
    mx = s.detach().amax(-1, keepdim=True)
    mx = torch.where(torch.isinf(mx), torch.zeros_like(mx), mx)
    e = torch.exp(s - mx)
    den = e.sum(-1, keepdim=True)
    empty = den == 0
    den_safe = torch.where(empty, torch.ones_like(den), den)
    out = (e / den_safe) @ v
    lse = torch.where(empty, torch.full_like(den, float("-inf")), torch.log(den_safe) + mx).squeeze(-1)
    return out, lse


def _unpack_serving(k: Kernel, q, kk, v, kwargs: dict):
    """Paged or ragged tensors -> padded [B, H, S, D] ones, per-sequence lengths, and how to pack back.
    paged: q [B, Sq, H, D] or [total_q, H, D] (cu_seqlens_q=), k/v pages [P, page, H_kv, D],
    block_table= [B, max_pages], kv_lens= [B]. ragged: q [total_q, H, D], k/v [total_k, H_kv, D],
    cu_seqlens_q= and cu_seqlens_k= [B + 1]."""
    cu_q = kwargs.pop("cu_seqlens_q", None)
    if k.layout.kind == "paged":
        bt, kv_lens = kwargs.pop("block_table"), kwargs.pop("kv_lens").long()
        B, page = bt.shape[0], kk.shape[1]
        if q.dim() == 4:
            cu_q = torch.arange(B + 1, device=q.device) * q.shape[1]
            q = q.reshape(-1, *q.shape[2:])
        seqs_k = []
        for b in range(B):
            n = int(kv_lens[b])
            pages = bt[b, : -(-n // page)].long()
            seqs_k.append((kk[pages].reshape(-1, *kk.shape[2:])[:n], v[pages].reshape(-1, *v.shape[2:])[:n]))
    else:
        cu_k = kwargs.pop("cu_seqlens_k").long()
        B = cu_k.shape[0] - 1
        kv_lens = cu_k[1:] - cu_k[:-1]
        seqs_k = [(kk[cu_k[b]:cu_k[b + 1]], v[cu_k[b]:cu_k[b + 1]]) for b in range(B)]
    cu_q = cu_q.long()
    q_lens = cu_q[1:] - cu_q[:-1]
    mq, mk = int(q_lens.max()) if B else 0, int(kv_lens.max()) if B else 0

    def pad(rows, n):  # [len, H, D] -> [H, n, D]
        return torch.nn.functional.pad(rows, (0, 0, 0, 0, 0, n - rows.shape[0])).transpose(0, 1)

    Q = torch.stack([pad(q[cu_q[b]:cu_q[b + 1]], mq) for b in range(B)]) if B else \
        q.new_zeros(0, q.shape[1], 0, q.shape[2])
    K = torch.stack([pad(sk, mk) for sk, _ in seqs_k]) if B else kk.new_zeros(0, kk.shape[-2], 0, kk.shape[-1])
    V = torch.stack([pad(sv, mk) for _, sv in seqs_k]) if B else v.new_zeros(0, v.shape[-2], 0, v.shape[-1])

    def pack(dense):  # [B, H, mq, ...] -> [total_q, H, ...]
        rows = [dense[b, :, : int(q_lens[b])].transpose(0, 1) for b in range(B)]
        return torch.cat(rows) if rows else dense.new_zeros(0, *dense.shape[1:2], *dense.shape[3:])
    return Q, K, V, q_lens, kv_lens, pack


def _interpret_serving(k: Kernel, q, kk, v, scale, return_lse: bool, kwargs: dict):
    shape_q = q.shape
    Q, K, V, q_lens, kv_lens, pack = _unpack_serving(k, q, kk, v, kwargs)
    inputs, params = _split_kwargs(k, kwargs)
    B, H, mq, _ = Q.shape
    mk, dev = K.shape[2], q.device
    ql, kl = q_lens.view(B, 1, 1, 1).to(dev), kv_lens.view(B, 1, 1, 1).to(dev)
    pos = _positions(B, H, mq, mk, dev)
    pos.update(q_len=ql, kv_len=kl, q_idx=pos["q_idx"] + (kl - ql))  # bottom-right aligned
    valid = (pos["kv_idx"] < kl) & (torch.arange(mq, device=dev).view(1, 1, mq, 1) < ql)
    out, lse = _attend(k, Q, K, V, Env(pos, params, inputs, q.dtype, dev), scale, valid)
    out, lse = pack(out), pack(lse.unsqueeze(-1)).squeeze(-1)
    if len(shape_q) == 4:  # paged with [B, Sq, H, D] queries
        out, lse = out.view(*shape_q[:3], out.shape[-1]), lse.view(*shape_q[:3])
    return (out, lse) if return_lse else out
