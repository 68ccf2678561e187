"""The benchmark of issue 4: attngen against FlexAttention and SDPA on the PERF_ANCHORS rows.

    PYTHONPATH=. python benchmarks/bench.py --out $OUT                  # the H100 run, all rows (< 10 min)
    PYTHONPATH=. python benchmarks/bench.py --only causal,document --skip-bwd
    PYTHONPATH=. python benchmarks/bench.py --smoke --out /tmp/bench    # CPU: tiny shapes, Triton interpreter
    PYTHONPATH=. python benchmarks/bench.py --shape 8,16,2048,64        # another training shape (B,H,S,D)

One process, the same inputs for every contestant: bf16, B=2, H=16, S=8192, D=128 (GQA row: 16 query
heads over 4 KV heads). Each row compiles its spec from a `.attn` file (`examples/` or
`benchmarks/specs/`), then:

1. Checks before timing. A dense fp32 reference (one (batch, head) at a time, from the row's Flex
   `mask_mod`/`score_mod` and the same bf16 inputs) gives the output and dq, dk, dv for a random dO.
   attngen's error against it must be at most K x Flex's error against it, plus a floor of a few ulps
   of the tensor's scale (max abs errors). A spec that disagrees with the row's mask_mod, or a fast
   wrong kernel, fails the row (FAIL, exit status 1); the row's timings are still reported. The same
   mask gives the exact element density (not the block sparsity) used for TFLOP/s.
2. Times, with `triton.testing.do_bench(..., return_mode="median")`: attngen; `torch.compile(
   flex_attention, dynamic=False)` (a fresh compile per row) with its `create_block_mask` BlockMask;
   SDPA with cuDNN and flash where SDPA can express the row (full, causal, GQA via enable_gqa).
   Forward and forward+backward. TFLOP/s: fwd = 4*B*H*S^2*D*density, fwd+bwd = 3.5 x fwd (the backward
   alone, fwd+bwd minus fwd, counts 2.5 x fwd). Ratios are peer_ms / attngen_ms (> 1: attngen faster),
   checked against the row's target from PERF_ANCHORS.md.
3. Times mask setup: attngen's `fn.block_map(q, k, v, *inputs, **params)` when the generated function
   has it (None means an arithmetic mask: 0 ms, and the prebuilt map is passed to the timed calls as
   `block_map=`, so the attention timings exclude setup as Flex's exclude create_block_mask); without
   it, 0 ms for arithmetic masks and n/a for masks that read a tensor. Against `create_block_mask`
   eager and `torch.compile(create_block_mask)`.

`--shape B,H,S,D` runs the rows at another shape (the GQA row keeps 16 query heads over 4 KV heads; the
window and prefix rows scale with S as at 8192: S/8 and S/4). The targets are the S=8192 ones.

Writes `<out>/<date>-<device>.json` and `.md` (default out: benchmarks/results; with `--shape`, the stem
ends in `-B8-H16-S2048-D64`). Exit status 1 when a
row fails its check or raises. `--smoke` runs every row at B=1, H=2 (GQA row 16/4), S=64, D=32 in
fp16 (the Triton interpreter computes bf16 dots wrongly); without CUDA it uses the interpreter, eager
flex_attention (no backward on CPU: the gradient baseline is then the dense reference in fp16),
no torch.compile and no SDPA backends, and times single calls with perf_counter.

Rows are a list of `AttnRow`; each kind of row has one function in `RUNNERS` and one table writer in
`TABLES`, so other kinds (decode) can be added beside `attention`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

if not torch.cuda.is_available():  # the Triton interpreter; must be set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from attngen.verify import kernels_run  # noqa: E402 - after TRITON_INTERPRET and the path

K_FACTOR = 2.0  # attngen's error may be at most K x Flex's (both against the fp32 reference) ...
ATOL = {torch.bfloat16: 4e-3, torch.float16: 5e-4, torch.float32: 1e-6}  # ... plus this x max(1, |ref|)
SETUP_FACTOR = 20.0  # target: attngen's block map >= 20x faster than create_block_mask for tensor masks


# ----------------------------------------------------------------------------- setup


@dataclass
class Env:
    """What every row shares: shapes, device, dtype, timer and the peers available here."""

    device: torch.device
    dtype: torch.dtype
    B: int
    H: int
    Hkv: int  # for GQA rows that do not declare their heads
    S: int
    D: int
    smoke: bool
    bwd: bool
    build: Path
    cuda: bool = field(init=False)
    compile: bool = field(init=False)

    def __post_init__(self):
        self.cuda = self.device.type == "cuda"
        self.compile = self.cuda  # torch.compile(flex_attention) and (create_block_mask) need a GPU here
        self.flex_bwd = self.cuda  # flex_attention has no backward on CPU

    def time_ms(self, f: Callable) -> float:
        """do_bench median on CUDA; one perf_counter call on the CPU (the smoke mode)."""
        if self.cuda:
            import triton

            return float(triton.testing.do_bench(f, return_mode="median"))
        t0 = time.perf_counter()
        f()
        return (time.perf_counter() - t0) * 1e3

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def make_env(a) -> Env:
    cuda = torch.cuda.is_available()
    if not cuda and not a.smoke:
        sys.exit("bench.py needs a CUDA GPU; use --smoke for the tiny CPU run")
    dev = torch.device("cuda" if cuda else "cpu")
    build = Path(tempfile.mkdtemp(prefix="attngen-bench-"))
    if a.smoke:
        return Env(dev, torch.float16, 1, 2, 1, 64, 32, True, not a.skip_bwd, build)
    B, H, S, D = a.shape or (2, 16, 8192, 128)
    return Env(dev, torch.bfloat16, B, H, H, S, D, False, not a.skip_bwd, build)


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """`--shape B,H,S,D`: four positive integers, D a power of two (the kernels' head-dim tiles)."""
    try:
        B, H, S, D = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected B,H,S,D (four integers), got {text!r}") from None
    if min(B, H, S, D) < 1 or D & (D - 1) or D < 16:
        raise argparse.ArgumentTypeError(f"{text!r}: B, H, S must be positive and D a power of two >= 16")
    return B, H, S, D


def info(env: Env) -> dict:
    import triton

    d = dict(device=torch.cuda.get_device_name() if env.cuda else f"cpu ({platform.processor() or 'unknown'})",
             torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
             cudnn=torch.backends.cudnn.version() if env.cuda else None, python=platform.python_version(),
             date=time.strftime("%Y-%m-%d"), time=time.strftime("%H:%M:%S"), command=" ".join(sys.argv),
             smoke=env.smoke, interpreter=os.environ.get("TRITON_INTERPRET") == "1" and not env.cuda)
    d["commit"] = os.environ.get("ATTNGEN_COMMIT")  # a copied tree (the GPU machine) may carry a stale .git
    if not d["commit"]:
        try:
            d["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                         text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            d["commit"] = None
    return d


def device_slug(env: Env, name: str) -> str:
    if env.smoke:
        return "smoke-" + ("cuda" if env.cuda else "cpu")
    s = re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-")
    return s or "gpu"


# ----------------------------------------------------------------------------- rows


@dataclass
class Ctx:
    """What a row's mods and inputs may read: shapes, the spec's params and consts, its input tensors."""

    env: Env
    B: int
    H: int
    Hkv: int
    S: int
    params: dict
    consts: dict
    inputs: dict = field(default_factory=dict)


@dataclass
class AttnRow:
    """One attention variant. `mask`/`score` build Flex's mask_mod/score_mod from a Ctx; the same
    functions (applied to broadcast index tensors) define the dense fp32 reference."""

    name: str
    title: str
    spec: str  # .attn file relative to the repository root; its first spec is used
    mask: Callable[[Ctx], Callable]
    score: Callable[[Ctx], Callable] | None = None
    params: Callable[[int], dict] = lambda S: {}  # the spec's runtime params for sequence length S
    inputs: Callable[[Ctx], dict] = lambda c: {}  # the spec's input tensors, in declaration order
    heads: tuple[int, int] | None = None  # (query heads, kv heads); None: the run's (MHA)
    sdpa: dict | None = None  # SDPA arguments when SDPA can express the row, e.g. {"is_causal": True}
    target: tuple[str, float] = ("flex", 1.2)  # attngen must be >= x times faster than this peer
    anchor: tuple[float, float] | None = None  # PERF_ANCHORS.md: Flex fwd, bwd TF/s on the H100
    per_batch: bool = False  # the mask depends on b (BlockMask with B rows)
    per_head: bool = False  # the mask depends on h (BlockMask with H rows)
    kind: str = "attention"


def _doc_ids(c: Ctx) -> dict:
    g = torch.Generator(device=c.env.device).manual_seed(1)
    ids = torch.randint(0, 16, (c.B, c.S), device=c.env.device, generator=g)
    return {"doc_id": torch.sort(ids, dim=-1).values.to(torch.int32)}  # 16 random documents per sequence


def _big_bird(c: Ctx) -> dict:
    """A BigBird layout of 64 x 64 blocks per head: each query block sees its neighbours, the first two key blocks
    and three random ones; the first two query blocks see everything (global)."""
    n = -(-c.S // 64)
    g = torch.Generator(device=c.env.device).manual_seed(2)
    i = torch.arange(n, device=c.env.device)
    lay = ((i[:, None] - i[None, :]).abs() <= 1) | (i[None, :] < 2) | (i[:, None] < 2)
    lay = lay.expand(c.H, n, n).clone()
    lay.scatter_(2, torch.randint(0, n, (c.H, n, 3), device=c.env.device, generator=g), True)
    return {"layout": lay}


def _alibi_slopes(c: Ctx) -> dict:
    i = torch.arange(c.H, device=c.env.device, dtype=torch.float32)
    return {"slopes": 2.0 ** (-8.0 * (i + 1) / c.H)}


def _causal(c):
    return lambda b, h, q, kv: q >= kv


ROWS: list[AttnRow] = [
    AttnRow("full", "full", "examples/full.attn", lambda c: lambda b, h, q, kv: q >= 0,
            sdpa={"is_causal": False}, target=("cudnn", 1.0), anchor=(482, 428)),
    AttnRow("causal", "causal", "examples/causal.attn", _causal,
            sdpa={"is_causal": True}, target=("cudnn", 1.0), anchor=(397, 380)),
    AttnRow("gqa", "causal, GQA 16/4", "benchmarks/specs/gqa_16_4.attn", _causal, heads=(16, 4),
            sdpa={"is_causal": True, "enable_gqa": True}, anchor=(400, 354)),
    AttnRow("sliding_window", "causal sliding window 1024", "examples/sliding_window.attn",
            lambda c: lambda b, h, q, kv: (q >= kv) & (q - kv < c.params["window"]),
            params=lambda S: {"window": S // 8}, anchor=(306, 298)),
    AttnRow("softcap", "tanh softcap 30, causal", "examples/softcap.attn", _causal,
            score=lambda c: lambda s, b, h, q, kv: c.params["cap"] * torch.tanh(s / c.params["cap"]),
            params=lambda S: {"cap": 30.0}, target=("flex", 2.0), anchor=(188, 193)),
    AttnRow("alibi", "ALiBi, causal", "examples/alibi.attn", _causal,
            score=lambda c: lambda s, b, h, q, kv: s + c.inputs["slopes"][h] * (kv - q),
            inputs=_alibi_slopes, anchor=(359, 375)),
    AttnRow("document", "document mask, 16 random docs, causal", "examples/document.attn",
            lambda c: lambda b, h, q, kv: (c.inputs["doc_id"][b, q] == c.inputs["doc_id"][b, kv]) & (q >= kv),
            inputs=_doc_ids, per_batch=True, target=("flex", 1.5), anchor=(185, 186)),
    AttnRow("block_sparse", "BigBird layout of 64 x 64 blocks, causal", "examples/block_sparse.attn",
            lambda c: lambda b, h, q, kv: c.inputs["layout"][h, q // 64, kv // 64] & (q >= kv),
            inputs=_big_bird, per_head=True),
    AttnRow("prefix_lm", "prefix-LM 2048", "examples/prefix_lm.attn",
            lambda c: lambda b, h, q, kv: (kv < c.params["prefix"]) | (q >= kv),
            params=lambda S: {"prefix": S // 4}, anchor=(398, 386)),
    AttnRow("chunked", "chunked 2048, causal", "benchmarks/specs/chunked_2048.attn",
            lambda c: lambda b, h, q, kv: (q // c.consts["chunk"] == kv // c.consts["chunk"]) & (q >= kv),
            anchor=(323, 321)),
    AttnRow("sink_window", "4 sink tokens + window 1024", "examples/sink_window.attn",
            lambda c: lambda b, h, q, kv: (q >= kv) & ((kv < c.consts["sinks"]) | (q - kv < c.params["window"])),
            params=lambda S: {"window": S // 8}, anchor=(277, 226)),
    AttnRow("dilated", "dilated by 2, causal", "benchmarks/specs/dilated_causal.attn",
            lambda c: lambda b, h, q, kv: (q >= kv) & ((q - kv) % c.consts["dilation"] == 0),
            target=("flex", 2.0), anchor=(168, 169)),
]


# ----------------------------------------------------------------------------- helpers


def load_spec(row: AttnRow, env: Env):
    """Compile the row's spec to a module and import it: (ir kernel, function, seconds to compile)."""
    from attngen import load_kernels
    from attngen.runtime import compile_file, import_path

    path = ROOT / row.spec
    t0 = time.perf_counter()
    kernels = load_kernels(str(path))
    name = next(iter(kernels))
    out = [p for p in compile_file(path, env.build / row.name) if p.stem == name][0]
    seconds = time.perf_counter() - t0
    mod = import_path(out, f"attngen_bench_{row.name}_{name}")
    return kernels[name], getattr(mod, name), seconds


def mask_reads_tensor(kernel) -> bool:
    from attngen.ir import Op

    return kernel.mask is not None and any(n.op is Op.LOAD for n in kernel.mask.walk())


def _no_tf32() -> None:
    """The reference's matmuls in true fp32."""
    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision"):
        try:
            m.fp32_precision = "ieee"
            return
        except (RuntimeError, AttributeError):
            pass
    m.allow_tf32 = False


def dense_reference(q, k, v, dout, mask_mod, score_mod, dtype, grad: bool) -> dict:
    """softmax(score_mod(scale q.k^T) masked) @ v, one (batch, head) at a time in `dtype` (fp32 for the
    reference): 'out' and, with grad, 'dq', 'dk', 'dv' of sum(out * dout), as float32; 'visible' counts
    the mask's true elements (summed over batch and heads)."""
    B, H, S, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = H // Hkv
    dev = q.device
    scale = 1.0 / math.sqrt(D)
    qi = torch.arange(S, device=dev)[:, None]
    ki = torch.arange(Sk, device=dev)[None, :]
    res = {"out": torch.empty(q.shape, dtype=torch.float32, device=dev)}
    if grad:
        res.update(dq=torch.empty(q.shape, dtype=torch.float32, device=dev),
                   dk=torch.zeros(k.shape, dtype=torch.float32, device=dev),
                   dv=torch.zeros(v.shape, dtype=torch.float32, device=dev))
    visible = 0
    for b in range(B):
        tb = torch.tensor(b, device=dev)
        for h in range(H):
            th = torch.tensor(h, device=dev)
            m = torch.broadcast_to(mask_mod(tb, th, qi, ki), (S, Sk))
            visible += int(m.sum())
            with torch.set_grad_enabled(grad):
                qh, kh, vh = (t.detach().to(dtype).requires_grad_(grad) for t in (q[b, h], k[b, h // G], v[b, h // G]))
                s = (qh @ kh.transpose(0, 1)) * scale
                if score_mod is not None:
                    s = score_mod(s, tb, th, qi, ki)
                s = torch.where(m, s, torch.tensor(float("-inf"), dtype=s.dtype, device=dev))
                p = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)  # a fully masked row gives 0
                o = p.to(vh.dtype) @ vh  # a score_mod reading float32 tensors promotes the scores
                if grad:
                    o.backward(dout[b, h].to(dtype))
                    res["dq"][b, h] = qh.grad
                    res["dk"][b, h // G] += kh.grad.float()
                    res["dv"][b, h // G] += vh.grad.float()
            res["out"][b, h] = o.detach()
    res["visible"] = visible
    return res


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    e = float((a.float() - ref).abs().max())
    return e if math.isfinite(e) else math.inf  # NaN never passes


def run_grad(f: Callable, q, k, v, dout) -> dict:
    """out, dq, dk, dv of sum(f(q, k, v) * dout), on fresh leaves."""
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = f(qg, kg, vg)
    out.backward(dout)
    return {"out": out.detach(), "dq": qg.grad, "dk": kg.grad, "dv": vg.grad}


def first_call_s(env: Env, f: Callable):
    env.sync()
    t0 = time.perf_counter()
    r = f()
    env.sync()
    return r, time.perf_counter() - t0


def tflops(flops: float, ms: float | None) -> float | None:
    return flops / ms / 1e9 if ms else None


def ratio(peer_ms: float | None, ours_ms: float | None) -> float | None:
    return peer_ms / ours_ms if peer_ms and ours_ms else None


# ----------------------------------------------------------------------------- the attention row


def bench_attention(row: AttnRow, env: Env) -> dict:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    r: dict = dict(kind=row.kind, name=row.name, title=row.title, spec=row.spec, ok=False, notes=[])
    Hq, Hkv = row.heads or (env.H, env.H)
    B, S, D, dev, dt = env.B, env.S, env.D, env.device, env.dtype
    kernel, fn, r["compile_s"] = load_spec(row, env)
    consts = dict(kernel.consts)
    c = Ctx(env, B, Hq, Hkv, S, row.params(S), consts)
    c.inputs = row.inputs(c)
    mask_mod = row.mask(c)
    score_mod = row.score(c) if row.score else None
    inputs, params = list(c.inputs.values()), c.params
    r.update(shape=dict(B=B, Hq=Hq, Hkv=Hkv, S=S, D=D), dtype=str(dt).replace("torch.", ""),
             params=params, consts=consts, tensor_mask=mask_reads_tensor(kernel))

    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(B, Hq, S, D, device=dev, dtype=dt, generator=g)
    k, v = (torch.randn(B, Hkv, S, D, device=dev, dtype=dt, generator=g) for _ in range(2))
    dout = torch.randn(B, Hq, S, D, device=dev, dtype=dt, generator=g)
    gqa = Hq != Hkv

    # mask setup: create_block_mask eager (the BlockMask used below) and compiled; attngen's block map
    bm_b, bm_h = B if row.per_batch else None, Hq if row.per_head else None
    block_mask = create_block_mask(mask_mod, bm_b, bm_h, S, S, device=dev)
    r["setup_cbm_eager_ms"] = env.time_ms(lambda: create_block_mask(mask_mod, bm_b, bm_h, S, S, device=dev))
    r["setup_cbm_compiled_ms"] = None
    if env.compile:
        cbm = torch.compile(create_block_mask)
        cbm(mask_mod, bm_b, None, S, S, device=dev)
        r["setup_cbm_compiled_ms"] = env.time_ms(lambda: cbm(mask_mod, bm_b, None, S, S, device=dev))
    build_map = getattr(fn, "block_map", None)
    bm_kw: dict = {}
    if build_map is None:
        r["setup_attngen_ms"] = None if r["tensor_mask"] else 0.0
        r["notes"].append("attngen has no block_map: setup " + ("n/a" if r["tensor_mask"] else "0 (arithmetic)"))
    else:
        try:
            bmap = build_map(q, k, v, *inputs, **params)
        except Exception as e:  # keep the row's other numbers; the call then builds what it needs itself
            r["setup_attngen_ms"] = None
            r["notes"].append(f"fn.block_map raised {type(e).__name__}: {str(e)[:160]}; timed without a map")
        else:
            if bmap is None:
                r["setup_attngen_ms"] = 0.0
            else:
                r["setup_attngen_ms"] = env.time_ms(lambda: build_map(q, k, v, *inputs, **params))
                bm_kw = {"block_map": bmap}

    ours = lambda q, k, v: fn(q, k, v, *inputs, **params, **bm_kw)
    flex_fn = torch.compile(flex_attention, dynamic=False) if env.compile else flex_attention  # fresh per row
    flex = lambda q, k, v: flex_fn(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=gqa)

    # 1. check against the fp32 reference (and count the mask's true density)
    _no_tf32()
    ref = dense_reference(q, k, v, dout, mask_mod, score_mod, torch.float32, env.bwd)
    density = ref.pop("visible") / (B * Hq * S * S)
    r["density"] = density
    if env.bwd:
        with kernels_run(fn) as r["kernels"]:
            got, r["first_call_s"] = first_call_s(env, lambda: run_grad(ours, q, k, v, dout))
        if env.flex_bwd:
            base, r["flex_first_call_s"] = first_call_s(env, lambda: run_grad(flex, q, k, v, dout))
        else:  # flex_attention has no CPU backward: the eager dense path in the same dtype stands in
            base = dense_reference(q, k, v, dout, mask_mod, score_mod, dt, True)
            with torch.no_grad():
                base["out"] = flex(q, k, v)
            r["notes"].append(f"gradient baseline: dense {r['dtype']} (no Flex backward on {dev.type})")
    else:
        with torch.no_grad(), kernels_run(fn) as r["kernels"]:
            got, r["first_call_s"] = first_call_s(env, lambda: {"out": ours(q, k, v)})
            base, r["flex_first_call_s"] = first_call_s(env, lambda: {"out": flex(q, k, v)})
    errors, why = {}, []
    for key in got:
        e, e_flex = max_err(got[key], ref[key]), max_err(base[key], ref[key])
        floor = ATOL[dt] * max(1.0, float(ref[key].abs().max()))
        errors[key] = dict(attngen=e, flex=e_flex, bound=K_FACTOR * e_flex + floor)
        if not e <= K_FACTOR * e_flex + floor:
            why.append(f"{key}: error {e:.3g} > {K_FACTOR} x Flex's {e_flex:.3g} + {floor:.2g}")
    r["errors"], r["ok"], r["why"] = errors, not why, "; ".join(why)
    ref_out = ref["out"]
    del got, base, ref
    print(f"  {row.name}: density {density:.4f}  check {'ok' if r['ok'] else 'FAIL ' + r['why']}", flush=True)

    # 2. timings (reported even when the check failed, so that a fast wrong kernel is visible)
    fwd_flops = 4.0 * B * Hq * S * S * D * density
    with torch.no_grad():
        r["attngen_fwd_ms"] = env.time_ms(lambda: ours(q, k, v))
        r["flex_fwd_ms"] = env.time_ms(lambda: flex(q, k, v))
    if env.bwd:
        qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))

        def fb(f):
            def step():
                qg.grad = kg.grad = vg.grad = None
                f(qg, kg, vg).backward(dout)
            return step

        r["attngen_fb_ms"] = env.time_ms(fb(ours))
        r["flex_fb_ms"] = env.time_ms(fb(flex)) if env.flex_bwd else None
    for peer in ("cudnn", "flash"):
        r[f"{peer}_fwd_ms"] = r[f"{peer}_fb_ms"] = None
    if row.sdpa is not None and env.cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        sdpa = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, **row.sdpa)
        for peer, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            try:
                with sdpa_kernel(backend):
                    with torch.no_grad():
                        o = sdpa(q, k, v)
                        r[f"{peer}_out_err"] = max_err(o, ref_out)  # for information; not a gate
                        r[f"{peer}_fwd_ms"] = env.time_ms(lambda: sdpa(q, k, v))
                    if env.bwd:
                        r[f"{peer}_fb_ms"] = env.time_ms(fb(sdpa))
            except RuntimeError as e:  # the backend cannot run this row (e.g. no GQA): skip with a note
                r["notes"].append(f"SDPA {peer}: skipped ({str(e).splitlines()[0][:160]})")
    elif row.sdpa is not None:
        r["notes"].append("SDPA cuDNN/flash need CUDA: skipped")
    del ref_out
    for key in [key for key in r if key.endswith("_ms") and not key.startswith("setup")]:
        pass_flops = fwd_flops * (3.5 if key.endswith("_fb_ms") else 1.0)
        r[key.replace("_ms", "_tflops")] = tflops(pass_flops, r[key])
    for peer in ("flex", "cudnn", "flash"):
        for p in ("fwd", "fb"):
            r[f"{peer}_{p}_ratio"] = ratio(r.get(f"{peer}_{p}_ms"), r.get(f"attngen_{p}_ms"))
    for who in ("attngen", "flex"):  # the backward alone, for PERF_ANCHORS' bwd column
        fwd_ms, fb_ms = r.get(f"{who}_fwd_ms"), r.get(f"{who}_fb_ms")
        r[f"{who}_bwd_tflops"] = tflops(2.5 * fwd_flops, fb_ms - fwd_ms) if fwd_ms and fb_ms and fb_ms > fwd_ms \
            else None

    # 3. targets
    peer, x = row.target
    r["target"] = f">= {x:g}x {peer}"
    met = {p: (None if r[f"{peer}_{p}_ratio"] is None else r[f"{peer}_{p}_ratio"] >= x) for p in ("fwd", "fb")}
    if not env.bwd:
        met.pop("fb")
    r["target_met"] = met
    if r["tensor_mask"]:
        sa, se = r["setup_attngen_ms"], r["setup_cbm_eager_ms"]
        r["setup_target"] = f">= {SETUP_FACTOR:g}x faster than create_block_mask"
        r["setup_target_met"] = None if sa is None else (sa == 0 or se / sa >= SETUP_FACTOR)
    else:
        r["setup_target"] = "0 ms"
        r["setup_target_met"] = r["setup_attngen_ms"] == 0.0
    return r


RUNNERS: dict[str, Callable] = {"attention": bench_attention}


def title_at(row: AttnRow, S: int) -> str:
    """The row's title, which names its S=8192 params, with the params that differ at this S (--shape)."""
    here, base = row.params(S), row.params(8192)
    moved = [f"{k}={v}" for k, v in here.items() if base.get(k) != v]
    return row.title + (f" (here {', '.join(moved)})" if moved else "")


# ----------------------------------------------------------------------------- report


def _f(x, fmt: str = ".3f", none: str = "-") -> str:
    if x is None:
        return none
    if isinstance(x, bool):
        return "yes" if x else "NO"
    return format(x, fmt)


def _met(m: dict | None) -> str:
    if not m:
        return "-"
    return ", ".join(f"{p}: {'n/a' if v is None else 'yes' if v else 'no'}" for p, v in m.items())


def md_attention(rows: list[dict], result: dict) -> list[str]:
    cfg = result["config"]
    out = ["## Correctness (before timing)", "",
           f"Max abs error against a dense fp32 reference on the same inputs; attngen must stay within "
           f"{cfg['k_factor']:g} x Flex's error + {cfg['atol']:g} x max(1, |ref|) ({cfg['dtype']}). "
           "Cell: attngen (Flex).", "",
           "Kernels: the generated kernels that ran (`*_sm90_*`: Gluon on Hopper; the others: Triton).", "",
           "| row | spec | density | out | dq | dk | dv | ok | kernels |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e = r.get("errors", {})
        cell = lambda key: f"{e[key]['attngen']:.1e} ({e[key]['flex']:.1e})" if key in e else "-"
        out.append(f"| {r['title']} | `{r['spec']}` | {_f(r.get('density'), '.4f')} | {cell('out')} | {cell('dq')} | "
                   f"{cell('dk')} | {cell('dv')} | {'ok' if r['ok'] else 'FAIL'} | {', '.join(r.get('kernels', []))} |")
    out += ["", "## Forward", "", "ms (TFLOP/s by mask density). Ratio: peer ms / attngen ms (> 1: attngen faster). "
            "Anchor: Flex TF/s in PERF_ANCHORS.md.", "",
            "| row | attngen | Flex | cuDNN | SDPA flash | vs Flex | vs cuDNN | vs flash | Flex anchor | target | "
            "met |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]

    def t(r, who, p):
        ms = r.get(f"{who}_{p}_ms")
        return "-" if ms is None else f"{ms:.3f} ({r[f'{who}_{p}_tflops']:.0f})"

    def cells(r, p: str, extra: list[str]) -> str:
        """One row of the forward (p="fwd") or forward+backward (p="fb") table."""
        anchor = r.get("anchor")
        met = {p: r["target_met"].get(p)} if "target_met" in r else None
        return " | ".join([r["title"], *(t(r, who, p) for who in ("attngen", "flex", "cudnn", "flash")),
                           *(_f(r.get(f"{peer}_{p}_ratio"), ".2f") for peer in ("flex", "cudnn", "flash")), *extra,
                           _f(anchor[p == "fb"] if anchor else None, ".0f"), r.get("target", "-"), _met(met)])

    out += [f"| {cells(r, 'fwd', [])} |" for r in rows]
    if any(r.get("attngen_fb_ms") is not None for r in rows):
        out += ["", "## Forward + backward", "",
                "ms (TFLOP/s at 3.5 x the forward's count). bwd TF/s: the backward alone, (fwd+bwd - fwd) at 2.5 x.",
                "",
                "| row | attngen | Flex | cuDNN | SDPA flash | vs Flex | vs cuDNN | vs flash | attngen bwd TF/s | "
                "Flex bwd TF/s | Flex bwd anchor | target | met |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        out += [f"| {cells(r, 'fb', [_f(r.get(f'{w}_bwd_tflops'), '.0f') for w in ('attngen', 'flex')])} |"
                for r in rows]
    out += ["", "## Mask setup", "",
            "ms per call. attngen: `fn.block_map(...)` when the generated function has it (0: arithmetic mask, "
            "bounds derived at compile time; n/a: a tensor mask without block_map).", "",
            "| row | tensor mask | attngen | create_block_mask | compiled create_block_mask | "
            "cbm / attngen | target | met |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sa, se = r.get("setup_attngen_ms"), r.get("setup_cbm_eager_ms")
        rat = "inf" if sa == 0 and se else _f(se / sa if sa and se else None, ".1f")
        out.append(f"| {r['title']} | {'yes' if r.get('tensor_mask') else 'no'} | {_f(sa, '.3f', 'n/a')} | {_f(se)} | "
                   f"{_f(r.get('setup_cbm_compiled_ms'))} | {rat} | {r.get('setup_target', '-')} | "
                   f"{_f(r.get('setup_target_met'), none='n/a')} |")
    out += ["", "## First calls and compile", "",
            "Seconds: `attngen compile` (spec to source), and the first call of attngen and Flex (Triton JIT / "
            "torch.compile, fwd+bwd when timed) with the caches as this run found them.", "",
            "| row | attngen compile | attngen first call | Flex first call |", "|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['title']} | {_f(r.get('compile_s'), '.2f')} | {_f(r.get('first_call_s'), '.2f')} | "
                   f"{_f(r.get('flex_first_call_s'), '.2f')} |")
    notes = [(r["title"], n) for r in rows for n in r.get("notes", [])]
    if notes:
        out += ["", "Notes:"] + [f"- {t}: {n}" for t, n in notes]
    return out


TABLES: dict[str, Callable] = {"attention": md_attention}


def markdown(result: dict) -> str:
    i, cfg = result["info"], result["config"]
    out = [f"# attngen benchmark: {i['date']}, {i['device']}", "",
           f"torch {i['torch']}, triton {i['triton']}, CUDA {i['cuda']}, cuDNN {i['cudnn']}, commit {i['commit']}. "
           f"Command: `{i['command']}`.", "",
           f"{cfg['dtype']}, B={cfg['B']}, H={cfg['H']}, S={cfg['S']}, D={cfg['D']} (rows may fix their heads); "
           f"{cfg['timer']} in one "
           f"process on the same inputs. Flex: {cfg['flex']}, with the BlockMask of create_block_mask."
           f"{' SMOKE RUN: tiny shapes, numbers mean nothing.' if i['smoke'] else ''}",
           "", f"**{sum(r['ok'] for r in result['rows'])} of {len(result['rows'])} rows pass their checks.**", ""]
    for kind, write in TABLES.items():
        rows = [r for r in result["rows"] if r.get("kind") == kind]
        if rows:
            out += write(rows, result) + [""]
    broken = [r for r in result["rows"] if r.get("error")]
    if broken:
        out += ["## Errors", ""] + [f"- {r['name']}: `{r['error']}`" for r in broken] + [""]
    return "\n".join(out)


def summary_line(r: dict) -> str:
    if r.get("error"):
        return f"FAIL {r['name']:15s} {r['error']}"
    s = (f"{'ok  ' if r['ok'] else 'FAIL'} {r['name']:15s} dens {r['density']:.3f}  fwd attngen "
         f"{_f(r.get('attngen_fwd_tflops'), '6.0f')} TF/s flex {_f(r.get('flex_fwd_tflops'), '6.0f')}"
         f" x{_f(r.get('flex_fwd_ratio'), '.2f')}")
    if r.get("cudnn_fwd_ratio"):
        s += f" cudnn x{r['cudnn_fwd_ratio']:.2f}"
    if r.get("attngen_fb_ms") is not None:
        s += (f" | fwd+bwd {_f(r.get('attngen_fb_tflops'), '5.0f')} TF/s x{_f(r.get('flex_fb_ratio'), '.2f')} "
              f"flex")
        if r.get("cudnn_fb_ratio"):
            s += f" x{r['cudnn_fb_ratio']:.2f} cudnn"
    s += f" | target {r['target']}: {_met(r['target_met'])}"
    s += f" | setup {_f(r.get('setup_attngen_ms'), '.3f', 'n/a')} vs cbm {_f(r.get('setup_cbm_eager_ms'), '.3f')} ms"
    return s


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for the .json and .md")
    ap.add_argument("--only", help="comma-separated row names: " + ",".join(r.name for r in ROWS))
    ap.add_argument("--skip-bwd", action="store_true", help="forward only")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU: Triton interpreter)")
    ap.add_argument("--shape", type=parse_shape, help="B,H,S,D instead of 2,16,8192,128 (bf16)")
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="start no row after this many seconds (the device allows 600 s a command)")
    a = ap.parse_args(argv)
    if a.shape and a.smoke:
        ap.error("--shape and --smoke: choose one (the smoke run has its own tiny shapes)")
    rows = ROWS
    if a.only:
        names = a.only.split(",")
        unknown = set(names) - {r.name for r in ROWS}
        if unknown:
            ap.error(f"unknown rows {sorted(unknown)}; have {', '.join(r.name for r in ROWS)}")
        rows = [r for r in ROWS if r.name in names]
    env = make_env(a)
    inf = info(env)
    print(json.dumps(inf), flush=True)
    torch._dynamo.config.recompile_limit = 256  # fresh compiles per row: flex (fwd, fwd+bwd), create_block_mask
    if hasattr(torch._dynamo.config, "accumulated_recompile_limit"):
        torch._dynamo.config.accumulated_recompile_limit = 4096
    t_all = time.perf_counter()
    timer = "do_bench medians" if env.cuda else "single perf_counter calls"
    result = dict(info=inf, config=dict(dtype=str(env.dtype).replace("torch.", ""), B=env.B, H=env.H, S=env.S,
                                        D=env.D, bwd=env.bwd, k_factor=K_FACTOR, atol=ATOL[env.dtype], timer=timer,
                                        flex="torch.compile(flex_attention, dynamic=False), fresh per row"
                                        if env.compile else "eager flex_attention"),
                  rows=[], ok=False, seconds=0.0)
    results = result["rows"]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{inf['date']}-{device_slug(env, inf['device'])}"
    if a.shape:
        stem += "-B{}-H{}-S{}-D{}".format(*a.shape)
    for row in rows:
        t0 = time.perf_counter()
        if t0 - t_all > a.budget_s:  # leave time to write what we have before the device's limit
            r = dict(kind=row.kind, name=row.name, title=row.title, spec=row.spec, ok=False,
                     error=f"skipped: the run passed its budget of {a.budget_s:.0f}s")
        else:
            print(f"{row.name} ({row.spec})", flush=True)
            try:
                r = RUNNERS[row.kind](row, env)
            except Exception as e:  # one broken row must not lose the others' numbers
                traceback.print_exc()
                r = dict(kind=row.kind, name=row.name, title=row.title, spec=row.spec, ok=False,
                         error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
        r["anchor"], r["title"] = row.anchor, title_at(row, env.S)
        r["seconds"] = time.perf_counter() - t0
        results.append(r)
        print(summary_line(r), f"({r['seconds']:.1f}s)", flush=True)
        if env.cuda:
            torch.cuda.empty_cache()
        # written after every row, so that a run cut short still leaves its numbers
        result.update(ok=all(r["ok"] for r in results), seconds=time.perf_counter() - t_all)
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
        (out / f"{stem}.md").write_text(markdown(result))
    fails = [r["name"] for r in results if not r["ok"]]
    print(f"\n{len(results) - len(fails)} of {len(results)} rows ok{': FAIL ' + ', '.join(fails) if fails else ''}; "
          f"{result['seconds']:.0f}s; wrote {out / stem}.json and .md", flush=True)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
