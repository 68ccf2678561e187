"""The main job: compile every example and check it against the interpreter.

On a GPU the kernels run natively; without one they run under the Triton interpreter
(TRITON_INTERPRET=1, set before triton is imported). Tolerance calibrates itself, as
Inductor does for flex: the kernel's error against an fp64 golden must be at most
K times the error of the interpreter run in the same dtype, plus a few ulps.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

K_FACTOR = 2.0
# a floor for when the interpreter happens to be nearly exact: a few ulps of the output scale
ATOL = {"float32": 1e-6, "float16": 5e-4, "bfloat16": 4e-3}


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
        hq = kernel.heads_q or self.Hq
        hkv = kernel.heads_kv or (self.Hkv if hq % self.Hkv == 0 else hq)
        return Shape(self.B, hq, hkv, self.Sq, self.Sk, self.Dqk, self.Dv)


CPU_SHAPES = (
    Shape(2, 4, 2, 77, 77, 32, 32),      # lengths not multiples of the block; GQA; batch > 1
    Shape(1, 2, 2, 64, 64, 64, 64),      # exact multiples
    Shape(1, 2, 1, 40, 97, 48, 24),      # q_len != kv_len, MQA, head dims not powers of two
    Shape(1, 2, 2, 50, 50, 192, 128),    # qk 192 / v 128
)
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

    from .interpret import _TORCH_DTYPES, Env, evaluate

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
    err: float
    ref_err: float
    lse_err: float
    lse_ref_err: float
    ok: bool
    why: str = ""


def _maxdiff(a, b) -> float:
    import torch

    a, b = a.double(), b.double()
    both_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    d = torch.where(both_inf, torch.zeros_like(a), (a - b).abs())
    return float(d.max()) if d.numel() else 0.0


def check(kernel, fn, shape: Shape, dtype, device, seed: int = 0, config: dict | None = None) -> Result:
    """Run the generated function and the interpreter; compare both against fp64."""
    import torch

    from .interpret import interpret

    shape = shape.fit(kernel)
    q, k, v, inputs = make_inputs(kernel, shape, dtype, device, seed)
    params = params_for(kernel, shape)
    out, lse = fn(q, k, v, **inputs, **params, return_lse=True, config=config)
    up = lambda t: t.double() if t.is_floating_point() else t  # noqa: E731
    gold, gold_lse = interpret(kernel, up(q), up(k), up(v), return_lse=True,
                               **{n: up(t) for n, t in inputs.items()}, **params)
    ref_dev = device if dtype != torch.float16 or device.type == "cuda" else "cpu"
    ref, ref_lse = interpret(kernel, q.to(ref_dev), k.to(ref_dev), v.to(ref_dev), return_lse=True,
                             **{n: t.to(ref_dev) for n, t in inputs.items()}, **params)
    name = str(dtype).replace("torch.", "")
    err, ref_err = _maxdiff(out, gold), _maxdiff(ref.to(device), gold)
    lerr, lref = _maxdiff(lse, gold_lse), _maxdiff(ref_lse.to(device).float(), gold_lse)
    why = []
    if torch.isnan(out).any() or torch.isnan(lse).any():
        why.append("NaN in output")
    if not torch.equal(torch.isneginf(lse), torch.isneginf(gold_lse)):
        why.append("fully masked rows differ")
    if err > K_FACTOR * ref_err + ATOL[name]:
        why.append(f"out error {err:.3g} > {K_FACTOR} x {ref_err:.3g} + {ATOL[name]}")
    if lerr > K_FACTOR * lref + ATOL[name]:
        why.append(f"lse error {lerr:.3g} > {K_FACTOR} x {lref:.3g} + {ATOL[name]}")
    return Result(kernel.name, str(shape), name, err, ref_err, lerr, lref, not why, "; ".join(why))


def compiled(spec_path: Path, out_dir: Path, sparse: bool = True):
    """Compile a spec file and import its functions: [(ir kernel, function)]."""
    from . import load_kernels
    from .runtime import compile_file, import_path

    kernels = load_kernels(str(spec_path))
    out = []
    for path in compile_file(spec_path, out_dir, sparse=sparse):
        mod = import_path(path, f"attngen_verify_{path.stem}_{'s' if sparse else 'd'}")
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
    specs = sorted(p for a in paths for p in (Path(a).glob("*.attn") if Path(a).is_dir() else [Path(a)]))
    where = f"GPU {torch.cuda.get_device_name()}" if gpu else "CPU (Triton interpreter)"
    print(f"attngen verify: {len(specs)} spec files on {where}")
    failures = 0
    total = 0
    with tempfile.TemporaryDirectory(prefix="attngen-verify-") as tmp:
        for spec in specs:
            for kernel, fn in compiled(spec, Path(tmp)):
                for dt in names:
                    for shape in shapes:
                        t0 = time.time()
                        r = check(kernel, fn, shape, getattr(torch, dt), device, seed=total)
                        total += 1
                        failures += not r.ok
                        print(f"{'ok  ' if r.ok else 'FAIL'} {r.name:18s} {r.dtype:8s} {r.shape:28s} "
                              f"err {r.err:.2e} (interp {r.ref_err:.2e})  lse {r.lse_err:.2e} "
                              f"({r.lse_ref_err:.2e})  {time.time() - t0:.1f}s {r.why}", flush=True)
    print(f"{total - failures} passed, {failures} failed")
    return 1 if failures else 0
