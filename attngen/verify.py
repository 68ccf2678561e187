"""The main job: compile every example and check it against the interpreter.

On a GPU the kernels run natively; without one they run under the Triton interpreter
(TRITON_INTERPRET=1, set before triton is imported). Tolerance calibrates itself, as
Inductor does for flex: the kernel's error against an fp64 golden must be at most
K times the error of the interpreter run in the same dtype, plus a few ulps of the
tensor's scale. Outputs, the LSE and every gradient (dq, dk, dv, learnable inputs) are checked.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from .ir import SERVING

# fp32 gets more room: the kernel's logits live in log2 units (1.44x larger, so up to 2x coarser
# ulps than the interpreter's natural-log logits) and gradient sums like d slope = sum ds*(kv - q)
# amplify that; in 16-bit dtypes the interpreter's own rounding dominates
K_FACTOR = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0}
# a floor for when the interpreter happens to be nearly exact: a few ulps of the output scale
ATOL = {"float32": 1e-6, "float16": 5e-4, "bfloat16": 4e-3}


def _heads(kernel, hq: int, hkv: int) -> dict:
    """Head counts for a test shape, respecting those the spec declares."""
    hq = kernel.heads_q or hq
    return {"Hq": hq, "Hkv": kernel.heads_kv or (hkv if hq % hkv == 0 else hq)}


@dataclass(frozen=True)
class Shape:
    B: int
    Hq: int
    Hkv: int
    Sq: int
    Sk: int
    Dqk: int
    Dv: int

    def __str__(self) -> str:
        return f"B{self.B}-H{self.Hq}/{self.Hkv}-S{self.Sq}x{self.Sk}-D{self.Dqk}/{self.Dv}"

    def fit(self, kernel) -> Shape:
        """Respect head counts the spec declares."""
        return replace(self, **_heads(kernel, self.Hq, self.Hkv))


@dataclass(frozen=True)
class ServeShape:
    """A serving batch: per-sequence query and key counts (query i sits at kv_len - q_len + i)."""

    Hq: int
    Hkv: int
    q_lens: tuple[int, ...]
    kv_lens: tuple[int, ...]
    Dqk: int
    Dv: int
    page: int = 16           # paged layout only

    def __str__(self) -> str:
        return (f"B{len(self.q_lens)}-H{self.Hq}/{self.Hkv}-q{max(self.q_lens, default=0)}-"
                f"kv{max(self.kv_lens, default=0)}-D{self.Dqk}/{self.Dv}-p{self.page}")

    def fit(self, kernel) -> ServeShape:
        return replace(self, **_heads(kernel, self.Hq, self.Hkv))


CPU_SHAPES = (
    Shape(2, 4, 2, 77, 77, 32, 32),      # lengths not multiples of the block; GQA; batch > 1
    Shape(1, 2, 2, 64, 64, 64, 64),      # exact multiples
    Shape(1, 2, 1, 40, 97, 48, 24),      # q_len != kv_len, MQA, head dims not powers of two
    Shape(1, 2, 2, 50, 50, 192, 128),    # qk 192 / v 128
)
# serving layouts: mixed lengths (a page size that divides nothing, an empty sequence, one cached
# token, more queries than keys) and a decode batch; MLA's 576/512 dims on the GPU
CPU_SERVE = (ServeShape(4, 2, (3, 1, 0, 2), (37, 1, 0, 1), 32, 32, 5),
             ServeShape(8, 2, (1, 1, 1), (45, 1, 23), 32, 32, 16))
GPU_SERVE = (ServeShape(32, 8, (1,) * 8, (4096, 100, 1, 0, 3000, 4095, 2048, 17), 128, 128, 16),
             ServeShape(16, 4, (512, 7, 1), (4096, 7, 600), 128, 128, 1),
             ServeShape(16, 1, (1, 2, 1), (4096, 1000, 3), 576, 512, 64))
GPU_SHAPES = (
    Shape(2, 16, 16, 4096, 4096, 64, 64),
    Shape(1, 16, 4, 4096, 4096, 128, 128),
    Shape(1, 8, 8, 1000, 3000, 128, 128),
    Shape(1, 8, 8, 2048, 2048, 192, 128),
)


def params_for(kernel, shape: Shape) -> dict:
    """Defaults, except that big int params (windows, prefixes) shrink to fit the test length."""
    out = {}
    for p in kernel.params:
        v = p.default
        if p.type.value == "int" and v is not None and v >= shape.Sk // 2:
            v = max(2, shape.Sk // 4)
        out[p.name] = v if v is not None else (1 if p.type.value == "int" else 1.0)
    return out


def make_inputs(kernel, shape: Shape, dtype, device, seed: int):
    """Fresh random q, k, v and spec inputs (never zeros), from a fixed seed."""
    import torch

    from .interpreter import _TORCH_DTYPES, Env, evaluate

    g = torch.Generator(device="cpu").manual_seed(seed)
    s = shape

    def rnd(*dims):
        return torch.randn(*dims, generator=g).to(device=device, dtype=dtype)

    if kernel.layout.kind == "bshd":
        q, k, v = rnd(s.B, s.Sq, s.Hq, s.Dqk), rnd(s.B, s.Sk, s.Hkv, s.Dqk), rnd(s.B, s.Sk, s.Hkv, s.Dv)
    else:
        q, k, v = rnd(s.B, s.Hq, s.Sq, s.Dqk), rnd(s.B, s.Hkv, s.Sk, s.Dqk), rnd(s.B, s.Hkv, s.Sk, s.Dv)
    dims = dict(b=s.B, h=s.Hq, h_kv=s.Hkv, q_len=s.Sq, kv_len=s.Sk)
    env = Env(dict(dims), {}, {}, torch.float64, None)
    inputs = {}
    for inp in kernel.inputs:
        shp = [int(evaluate(d, env)) for d in inp.shape]
        dt = _TORCH_DTYPES[inp.dtype]
        if dt.is_floating_point:
            t = torch.randn(*shp, generator=g) * 0.5
        elif dt == torch.bool:
            t = torch.rand(*shp, generator=g) < 0.5
        else:  # small sorted ids: document ids, segment ids, positions
            t = torch.randint(0, 4, shp, generator=g).sort(-1).values if shp else torch.randint(0, 4, ())
        inputs[inp.name] = t.to(device=device, dtype=dt)
    return q, k, v, inputs


@dataclass
class Result:
    name: str
    shape: str
    dtype: str
    errors: dict[str, tuple[float, float]]   # tensor -> (kernel error, interpreter error) vs fp64
    ok: bool
    why: str = ""

    @property
    def worst(self) -> str:
        """The tensor whose error is largest relative to the interpreter's."""
        return max(self.errors, key=lambda n: self.errors[n][0] / max(self.errors[n][1], 1e-30))

    def line(self) -> str:
        o, lse = self.errors["out"], self.errors["lse"]
        s = f"out {o[0]:.1e} ({o[1]:.1e})  lse {lse[0]:.1e} ({lse[1]:.1e})"
        grads = [n for n in self.errors if n not in ("out", "lse")]
        if grads:
            w = max(grads, key=lambda n: self.errors[n][0] / max(self.errors[n][1], 1e-30))
            s += f"  grads ok, worst {w} {self.errors[w][0]:.1e} ({self.errors[w][1]:.1e})" if self.ok else ""
        return s


def _maxdiff(a, b) -> float:
    import torch

    a, b = a.double(), b.double()
    both_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    d = torch.where(both_inf, torch.zeros_like(a), (a - b).abs())
    return float(d.max()) if d.numel() else 0.0


def _run(fn, q, k, v, inputs, params, grad: bool, dout, dlse, **kw):
    """Outputs and, with grad, the gradients of sum(out*dout) + sum(lse*dlse) (finite lse only)."""
    import torch

    learn = [n for n, t in inputs.items() if t.is_floating_point()]
    leaves = {"q": q, "k": k, "v": v, **{n: inputs[n] for n in learn}}
    if grad:
        leaves = {n: t.detach().clone().requires_grad_() for n, t in leaves.items()}
    ins = {**inputs, **{n: leaves[n] for n in learn}}
    with torch.set_grad_enabled(grad):
        out, lse = fn(leaves["q"], leaves["k"], leaves["v"], **ins, **params, return_lse=True, **kw)
    res = {"out": out.detach(), "lse": lse.detach()}
    if grad:
        fin = torch.isfinite(lse.detach())
        loss = (out.double() * dout.to(out.device)).sum() + (lse.double()[fin] * dlse.to(out.device)[fin]).sum()
        loss.backward()
        for n, t in leaves.items():
            res["d" + n] = t.grad if t.grad is not None else torch.zeros_like(t)
    return res


def _compare(ours: dict, gold: dict, ref: dict, name: str, device, learnable=(), k: float | None = None
             ) -> tuple[dict, list[str]]:
    """Each tensor's error against the fp64 golden must stay within K x the interpreter's own error
    in the same dtype (K_FACTOR, or k) plus a floor of a few ulps of its scale. Returns (errors, reasons to fail)."""
    import torch

    k = K_FACTOR[name] if k is None else k
    errors, why = {}, []
    if torch.isnan(ours["out"]).any() or torch.isnan(ours["lse"]).any():
        why.append("NaN in output")
    if not torch.equal(torch.isneginf(ours["lse"]), torch.isneginf(gold["lse"]).to(device)):
        why.append("fully masked rows differ")
    for key in gold:
        a, b, c = ours[key], gold[key].to(device), ref[key].to(device)
        if key == "lse":
            c = c.float()
        e, r = _maxdiff(a, b), _maxdiff(c, b)
        errors[key] = (e, r)
        finite = b[torch.isfinite(b)]
        scale = max(1.0, float(finite.abs().max()) if finite.numel() else 1.0)
        # a learnable input's gradient sums O(S^2) terms that cancel (each row's ds sums to 0):
        # give it a floor of ~80 ulps of its scale instead of ~8
        floor = ATOL[name] * scale * (10.0 if key[1:] in learnable else 1.0)
        if torch.isnan(a).any():
            why.append(f"NaN in {key}")
        elif e > k * r + floor:
            why.append(f"{key} error {e:.3g} > {k} x {r:.3g} + {floor:.2g}")
    return errors, why


def check(kernel, fn, shape: Shape, dtype, device, seed: int = 0, config: dict | None = None,
          grad: bool = True, deterministic: bool = False, inputs: dict | None = None,
          k_factor: float | None = None, repeat: int = 1) -> Result:
    """Run the generated function and the interpreter; compare both against fp64, outputs and
    (with grad) every gradient: q, k, v and the learnable inputs. `inputs` replaces some of the
    random input tensors (e.g. document ids with a chosen structure); `k_factor` replaces K_FACTOR.
    `repeat` > 1 runs the function that often and compares the last run: a repeated call goes through the
    remembered launch decisions and direct launches, where a first call decides afresh and JIT-launches."""
    import torch

    from .interpreter import interpret

    shape = shape.fit(kernel)
    q, k, v, made = make_inputs(kernel, shape, dtype, device, seed)
    inputs = {**made, **(inputs or {})}
    learnable = {i.name for i in kernel.inputs if i.learnable}
    params = params_for(kernel, shape)
    g = torch.Generator().manual_seed(seed + 1)
    layout_out = (shape.B, shape.Sq, shape.Hq, shape.Dv) if kernel.layout.kind == "bshd" else \
        (shape.B, shape.Hq, shape.Sq, shape.Dv)
    dout = torch.randn(*layout_out, generator=g, dtype=torch.float64)
    dlse = torch.randn(shape.B, shape.Hq, shape.Sq, generator=g, dtype=torch.float64)
    interp = lambda q, k, v, **kw: interpret(kernel, q, k, v, **kw)  # noqa: E731
    up = lambda t: t.double() if t.is_floating_point() else t  # noqa: E731
    fixed = {n: t for n, t in inputs.items() if n not in learnable}
    learn = {n: t for n, t in inputs.items() if n in learnable}

    def call(f, q, k, v, ins, **kw):
        return _run(lambda q, k, v, **a: f(q, k, v, **{**fixed_of(ins), **a}), q, k, v,
                    {n: ins[n] for n in learn}, params, grad, dout, dlse, **kw)

    def fixed_of(ins):
        return {n: ins[n] for n in fixed}

    for _ in range(repeat):
        ours = call(fn, q, k, v, inputs, config=config, deterministic=deterministic)
    gold = call(interp, up(q), up(k), up(v), {n: up(t) for n, t in inputs.items()})
    ref_dev = device if dtype != torch.float16 or device.type == "cuda" else torch.device("cpu")
    ref = call(interp, q.to(ref_dev), k.to(ref_dev), v.to(ref_dev), {n: t.to(ref_dev) for n, t in inputs.items()})
    name = str(dtype).replace("torch.", "")
    errors, why = _compare(ours, gold, ref, name, device, learnable, k_factor)
    return Result(kernel.name, str(shape), name, errors, not why, "; ".join(why))


def serving_case(kernel, shape: ServeShape, dtype, device, seed: int, values_in_keys: bool = False,
                 poison_before: tuple[int, ...] | None = None):
    """Random inputs for a paged or ragged spec: (args, kwargs) for the generated function; the same
    call works for the interpreter. Unused page slots hold NaN, so a kernel that reads past kv_len
    (or, with poison_before[b], before that position) shows NaN instead of passing by luck."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    s = shape.fit(kernel)
    B = len(s.q_lens)

    def rnd(*dims):
        return torch.randn(*dims, generator=g).to(device=device, dtype=dtype)

    cu_q = torch.tensor([0, *s.q_lens], dtype=torch.int64).cumsum(0).to(torch.int32).to(device)
    q = rnd(int(cu_q[-1]), s.Hq, s.Dqk)
    keys = [rnd(n, s.Hkv, s.Dqk) for n in s.kv_lens]
    vals = [k[..., : s.Dv].clone() if values_in_keys else rnd(n, s.Hkv, s.Dv) for k, n in zip(keys, s.kv_lens)]
    if kernel.layout.kind == "ragged":
        kr = torch.cat(keys)
        args = (q, kr, kr[..., : s.Dv] if values_in_keys else torch.cat(vals), cu_q,
                torch.tensor([0, *s.kv_lens], dtype=torch.int64).cumsum(0).to(torch.int32).to(device))
    else:
        pages = [-(-n // s.page) for n in s.kv_lens]
        max_pages = max(pages, default=0) + 1
        P = sum(pages) + 1                                      # the last page: poison
        order = torch.randperm(P - 1, generator=g).tolist()    # pages scattered through the pool
        kc = torch.full((P, s.page, s.Hkv, s.Dqk), float("nan"), dtype=dtype, device=device)
        vc = kc[..., : s.Dv] if values_in_keys else torch.full((P, s.page, s.Hkv, s.Dv), float("nan"),
                                                               dtype=dtype, device=device)
        table = torch.full((B, max_pages), P - 1, dtype=torch.int32)
        nxt = 0
        for b, n in enumerate(s.kv_lens):
            for i in range(pages[b]):
                p = order[nxt]
                nxt += 1
                table[b, i] = p
                rows = slice(i * s.page, min(n, (i + 1) * s.page))
                kc[p, : rows.stop - rows.start] = keys[b][rows]
                if not values_in_keys:
                    vc[p, : rows.stop - rows.start] = vals[b][rows]
        ref_table = table.clone()
        if poison_before is not None:  # pages wholly before a position: point them at the poison page
            for b, first in enumerate(poison_before):
                table[b, : max(first, 0) // s.page] = P - 1
        args = (q, kc, vc, table.to(device), torch.tensor(s.kv_lens, dtype=torch.int32, device=device))
        return args, {"cu_seqlens_q": cu_q}, ref_table.to(device)
    return args, {}, None


def check_serving(kernel, fn, shape: ServeShape, dtype, device, seed: int = 0, config: dict | None = None,
                  values_in_keys: bool = False, poison_before: tuple[int, ...] | None = None,
                  repeat: int = 1) -> Result:
    """A paged or ragged kernel against the interpreter, both against an fp64 golden (forward only); the last
    of `repeat` runs is compared (see check)."""
    import torch

    from .interpreter import interpret

    s = shape.fit(kernel)
    args, kw, ref_table = serving_case(kernel, s, dtype, device, seed, values_in_keys, poison_before)
    q, kc, vc, *rest = args
    *_, inputs = make_inputs(kernel, Shape(len(s.q_lens), s.Hq, s.Hkv, max(s.q_lens, default=1),
                                             max(s.kv_lens, default=1), s.Dqk, s.Dv), dtype, device, seed)
    params = params_for(kernel, Shape(1, 1, 1, 1, max(s.kv_lens, default=1), 1, 1))
    for _ in range(repeat):
        out, lse = fn(*args, **inputs, **params, **kw, return_lse=True, config=config)
    if kernel.layout.kind == "paged":
        named = dict(block_table=ref_table, kv_lens=rest[1], **kw)
    else:
        named = dict(cu_seqlens_q=rest[0], cu_seqlens_k=rest[1])
    clean = lambda t: torch.nan_to_num(t, nan=0.0)  # noqa: E731  (poisoned slots are never visible)
    up = lambda t: t.double() if t.is_floating_point() else t  # noqa: E731
    gold = interpret(kernel, up(q), clean(up(kc)), clean(up(vc)), **named, **{n: up(t) for n, t in inputs.items()},
                     **params, return_lse=True)
    ref_dev = device if dtype != torch.float16 or device.type == "cuda" else torch.device("cpu")
    ref = interpret(kernel, q.to(ref_dev), clean(kc).to(ref_dev), clean(vc).to(ref_dev),
                    **{n: t.to(ref_dev) for n, t in named.items()}, **{n: t.to(ref_dev) for n, t in inputs.items()},
                    **params, return_lse=True)
    name = str(dtype).replace("torch.", "")
    errors, why = _compare({"out": out, "lse": lse}, {"out": gold[0], "lse": gold[1]},
                           {"out": ref[0], "lse": ref[1]}, name, device)
    return Result(kernel.name, str(s), name, errors, not why, "; ".join(why))


def compiled(spec_path: Path, out_dir: Path, sparse: bool = True, layout: str | None = None):
    """Compile a spec file and import its functions: [(ir kernel, function)]."""
    from . import load_kernels
    from .runtime import compile_file, import_path

    kernels = load_kernels(str(spec_path), layout)
    out = []
    for path in compile_file(spec_path, out_dir, sparse=sparse, layout=layout):
        mod = import_path(path, f"attngen_verify_{path.stem}_{'s' if sparse else 'd'}_{layout or ''}")
        out.append((kernels[path.stem], getattr(mod, path.stem)))
    return out


def main(paths: list[str], dtypes: list[str] | None = None, quick: bool = False) -> int:
    import torch

    gpu = torch.cuda.is_available()
    if not gpu and not os.environ.get("TRITON_INTERPRET"):
        # must be set before triton is imported: re-run ourselves under the interpreter
        os.environ["TRITON_INTERPRET"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "attngen.cli", "verify", *paths,
                                  *sum((["--dtype", d] for d in dtypes or []), []),
                                  *(["--quick"] if quick else [])])
    device = torch.device("cuda" if gpu else "cpu")
    names = dtypes or (["bfloat16", "float16"] if gpu else ["float32", "float16"])
    shapes = (GPU_SHAPES if gpu else CPU_SHAPES)[: 1 if quick else None]
    specs = sorted(p for a in paths for p in (Path(a).rglob("*.attn") if Path(a).is_dir() else [Path(a)]))
    where = f"GPU {torch.cuda.get_device_name()}" if gpu else "CPU (Triton interpreter)"
    print(f"attngen verify: {len(specs)} spec files on {where}")
    failures = 0
    total = 0
    with tempfile.TemporaryDirectory(prefix="attngen-verify-") as tmp:
        for spec in specs:
            for kernel, fn in compiled(spec, Path(tmp)):
                serving = kernel.layout.kind in SERVING
                for dt in names:
                    for shape in (GPU_SERVE if gpu else CPU_SERVE) if serving else shapes:
                        t0 = time.time()
                        if serving:  # MLA-sized heads only where the spec fixes one KV head
                            r = check_serving(kernel, fn, shape, getattr(torch, dt), device, seed=total,
                                              values_in_keys=shape.Dv < shape.Dqk)
                        else:
                            r = check(kernel, fn, shape, getattr(torch, dt), device, seed=total)
                        total += 1
                        failures += not r.ok
                        print(f"{'ok  ' if r.ok else 'FAIL'} {r.name:16s} {r.dtype:8s} {r.shape:28s} "
                              f"{r.line()}  {time.time() - t0:.1f}s {r.why}", flush=True)
    print(f"{total - failures} passed, {failures} failed")
    return 1 if failures else 0


@contextlib.contextmanager
def kernels_run(fn: Callable) -> Iterator[list[str]]:
    """The generated kernels that launch inside the block, by name without the spec's prefix (e.g.
    fwd_sm90_kernel: the Gluon Hopper forward; bwd_dkdv_kernel: the Triton dK/dV), in launch order. Empty when
    `fn` is not a generated function (a wrapper's module has no `_launch` to watch)."""
    mod = sys.modules.get(fn.__module__)
    names: list[str] = []
    real = getattr(mod, "_launch", None)
    if real is None:
        yield names
        return

    def spy(kernel, grid, *args, **kw):
        name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", "?")
        short = name.removeprefix(f"{fn.__name__}_")
        if short not in names:
            names.append(short)
        return real(kernel, grid, *args, **kw)

    mod._launch = spy
    try:
        yield names
    finally:
        mod._launch = real
