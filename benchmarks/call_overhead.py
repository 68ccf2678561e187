"""Host time per call with the GPU work stubbed out: the generated module's Python (argument checks, plans, argument
lists, launch bookkeeping) and, for forward+backward, the autograd engine, on this machine.

    python benchmarks/call_overhead.py [--specs causal,sliding_window,dilated,document] [--calls 300]

Every kernel is a stand-in whose compiled variant does nothing. It is reached through the module's own `_launch`,
plans and slots, and the host sees a Hopper GPU (compute capability 9, 132 SMs), so the Gluon rules apply. The
document spec gets a block map built ahead, as a training loop would. Also times `_check` alone. To A/B a host change,
run this on both checkouts. The docs' local host numbers come from here; Python on the GPU machines' hosts ran about 7x
slower.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import timeit
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from attngen.runtime import compile_file, import_path  # noqa: E402


class _NoKernel:
    """A generated kernel whose launches run nothing (kernel[grid](...) gives a stand-in compiled variant)."""

    def __init__(self, name: str):
        self.__name__, self.params = name, ()

    def __getitem__(self, grid):
        return lambda *args, **kw: None


def stub_launches(mod, name: str) -> None:
    """The module as on an H100 host whose launches cost nothing past our own bookkeeping."""
    mod._major, mod._sms, mod._builds_ahead, mod._ensure_allocator = (lambda t: 9), (lambda d: 132), \
        (lambda q: False), (lambda: None)
    for attr in [a for a, v in vars(mod).items() if a.startswith(name + "_") and hasattr(v, "run")]:
        setattr(mod, attr, _NoKernel(attr))
    mod._direct = lambda kernel, grid, args, kw, compiled: (0, lambda *a: None, ())
    mod._launched_direct = lambda fast, args: fast is not None and (fast[1](*args) or True)


def best_us(fn, calls: int) -> float:
    for _ in range(50):
        fn()
    runs = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - t0) / calls * 1e6)
    return min(runs)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--specs", default="causal,sliding_window,dilated,document", help="examples/<name>.attn")
    ap.add_argument("--calls", type=int, default=300)
    a = ap.parse_args(argv)
    B, H, S, D = 1, 2, 256, 128
    print(f"host us per call, launches stubbed (torch {torch.__version__}, B{B} H{H} S{S} D{D} bf16, CPU tensors)")
    print("| spec | forward | forward+backward |\n|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.specs.split(","):
            mod = import_path(compile_file(ROOT / "examples" / f"{name}.attn", tmp)[0], f"overhead_{name}")
            stub_launches(mod, name)
            fn = getattr(mod, name)
            g = torch.Generator().manual_seed(0)
            q, k, v, do = (torch.randn(B, H, S, D, generator=g).to(torch.bfloat16) for _ in range(4))
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            args, kw = [], {}
            if mod.INPUTS:  # the document spec: its ids, and the map a training loop builds once
                args = [torch.zeros(B, S, dtype=torch.int32)]
                kw["block_map"] = fn.block_map(q, k, v, *args)

            def fwd():
                fn(q, k, v, *args, **kw)

            def step():
                torch.autograd.grad(fn(*leaves, *args, **kw), leaves, do)

            print(f"| {name} | {best_us(fwd, a.calls):.1f} | {best_us(step, a.calls):.1f} |")
        mod = import_path(compile_file(ROOT / "examples/document.attn", tmp)[0], "overhead_check")
        q = torch.randn(2, 16, 1024, 128, dtype=torch.bfloat16)
        doc = torch.zeros(2, 1024, dtype=torch.int32)
        n = 20000
        t = timeit.timeit(lambda: mod._check(q, q, q, {"doc_id": doc}, {}), number=n) / n
        print(f"\n_check alone (document): {t * 1e6:.1f} us per call")


if __name__ == "__main__":
    main()
