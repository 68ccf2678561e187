"""Autotuning: time launch configurations of a compiled attention function on the caller's own inputs
and keep the fastest, cached on disk per (generated module, device, shapes, dtypes).

The generated defaults come from sweeps on the H100 at one training shape (benchmarks/sweep.py); other
GPUs, head dims and lengths may prefer other tiles. `tune` searches one kernel at a time: the forward
alone, then dK/dV and dQ inside a forward+backward with the others fixed. Every candidate's outputs (and
gradients) must agree with the default configuration's, so a configuration that computes something else
is never chosen, however fast.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from .runtime import writable_cache, write_atomic

# (BLOCK_M, BLOCK_N, num_warps, num_stages); a pipeline too deep for shared memory steps down by itself
FWD = [(bm, bn, w, s) for bm, bn in ((64, 64), (64, 128), (128, 32), (128, 64), (128, 128))
       for w in (4, 8) for s in (2, 3)]
DKDV = [(bm, bn, w, s) for bm, bn in ((32, 128), (64, 64), (64, 128), (128, 64))
        for w in (4, 8) for s in (2, 3, 4)]
DQ = [(bm, bn, w, s) for bm, bn in ((64, 64), (64, 128), (128, 32), (128, 64))
      for w in (4, 8) for s in (2, 3)]
KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
ROUNDS = 3     # interleaved re-timings of the finalists
MARGIN = 0.03  # a challenger must be this much faster than the default (H100 runs vary by 1-3%)


def tune(fn: Callable, *args, backward: bool | None = None, candidates: dict | None = None, cache: bool = True,
         timer: Callable | None = None, verbose: bool = False, **kwargs) -> dict:
    """The fastest launch configuration of `fn` (a generated attention function) for these arguments,
    as a `config=` dict: {"fwd": {...}, "dkdv": {...}, "dq": {...}} plus the caller's own top-level keys.

    backward: also tune the backward kernels (default: when q, k or v requires grad).
    candidates: {"fwd" | "dkdv" | "dq": [(BLOCK_M, BLOCK_N, num_warps, num_stages), ...]} replaces the
        built-in lists (FWD, DKDV, DQ) for the kernels it names; the default configuration is always tried.
    cache: read and write the result under the attngen cache directory (tune/), keyed by the generated
        module's source, the device, the argument shapes and dtypes and the non-tensor arguments.
    timer: f -> milliseconds (default triton.testing.do_bench's median on CUDA; the tests pass their own).
    Specs with a runtime block map: build the map with the tuned config, `fn.block_map(..., config=cfg)`.
    """
    mod = sys.modules.get(getattr(fn, "__module__", ""))
    if mod is None or not hasattr(mod, "_bwd_config"):
        raise ValueError(f"tune: {getattr(fn, '__name__', fn)!r} is not a generated attention function "
                         "(serving layouts are not tuned: their splits already follow the batch)")
    if len(args) < 3 or not all(isinstance(a, torch.Tensor) for a in args[:3]):
        raise ValueError("tune: pass the call's arguments as to the function: q, k, v (and the spec's input "
                         "tensors) positionally, params by keyword")
    q, k, v = args[:3]
    if timer is None:
        if q.device.type != "cuda":
            raise ValueError(f"tune: timing needs a CUDA device (q is on {q.device}); pass timer= to test")
        timer = _do_bench
    base = dict(kwargs.pop("config", None) or {})
    kwargs.pop("block_map", None)  # each candidate builds its own: the map's tile follows the config
    kwargs.pop("return_lse", None)  # the same kernels either way; the output alone is compared and timed
    if backward is None:
        backward = any(t.requires_grad for t in (q, k, v))
    lists = {"fwd": FWD, "dkdv": DKDV, "dq": DQ, **(candidates or {})}

    key = _key(mod, fn, args, kwargs, base, backward, lists)
    store = writable_cache("tune") if cache else None
    path = store / "tune.json" if store else None
    table = _read(path)
    if key in table:
        return json.loads(json.dumps(table[key]["config"]))

    dqk, dv = q.shape[-1], v.shape[-1]
    default = {"fwd": mod._config(dqk, dv, q.device, None, mod._forward_tma(k, v, base)),
               **mod._bwd_config(dqk, dv, q.device, None)}
    default = {k: _pick(v) for k, v in default.items()}
    # the Gluon Hopper kernels (where they run by default) have no tiles to tune: each is its kernel's first
    # candidate, and the Triton tilings compete with it (GLUON=False)
    out_like, k_like, v_like = (mod._empty_out(q, v), *(torch.empty(t.shape, dtype=t.dtype, device=t.device)
                                                      for t in (k, v)))
    # with the call's params: a banded mask's default kernels depend on them (_long_rows, _long_band)
    params = {n: kwargs.get(n, default) for n, (_, default) in mod.PARAMS.items()}
    if any(p is mod._REQUIRED for p in params.values()):
        params = None  # the call itself says which is missing
    gluon = {"fwd": hasattr(mod, "_sm90") and mod._sm90(q, k, v, out_like, base, None, params),
             "dkdv": hasattr(mod, "_sm90_dkdv") and mod._sm90_dkdv(q, k, v, out_like, k_like, v_like, base, None,
                                                                    params),
             # learnable inputs may want gradients, which only the Triton dQ computes: no Gluon candidate then
             "dq": hasattr(mod, "_sm90_dq") and mod._sm90_dq(q, k, v, out_like, out_like, torch.empty_like(q), base,
                                                             None, bool(mod.LEARNABLE), params)}
    grad_args = [a.detach().requires_grad_() if i < 3 and isinstance(a, torch.Tensor) else a
                 for i, a in enumerate(args)]
    gen = torch.Generator(device=q.device).manual_seed(0)

    def run(cfg: dict, with_grad: bool):
        config = _merge(base, cfg)
        bmap = {"block_map": fn.block_map(*args, config=config, **kwargs)} if hasattr(fn, "block_map") else {}

        def forward():
            with torch.no_grad():
                return fn(*args, config=config, **bmap, **kwargs)

        def step():
            for a in grad_args[:3]:
                a.grad = None
            out = fn(*grad_args, config=config, **bmap, **kwargs)
            out.backward(dout)
            return (out, *(a.grad for a in grad_args[:3]))

        return step if with_grad else forward

    out0 = run(default, False)()
    dout = torch.randn(out0.shape, dtype=out0.dtype, device=q.device, generator=gen)
    best, report = dict(default), {}
    for kernel in ("fwd", "dkdv", "dq") if backward else ("fwd",):
        with_grad = kernel != "fwd"
        ref = _outputs(run(best, with_grad))
        first = GLUON if gluon.get(kernel) else tuple(default[kernel][k] for k in KEYS)
        runs, times = {}, {}  # candidate -> its timed function; its first-pass ms
        for cand in dict.fromkeys([first, *lists[kernel]]):
            try:
                f = run({**best, kernel: _settings(cand, gluon.get(kernel, False))}, with_grad)
                if not _agrees(_outputs(f), ref):
                    report[f"{kernel} {cand}"] = "rejected: outputs differ from the default configuration's"
                    continue
                times[cand], runs[cand] = timer(f), f
            except Exception as e:  # noqa: BLE001 - configurations that cannot run are skipped
                report[f"{kernel} {cand}"] = f"skipped: {type(e).__name__}: {str(e)[:80]}"
                continue
            report[f"{kernel} {cand}"] = times[cand]
            if verbose:
                print(f"tune {fn.__name__} {kernel} {cand}: {times[cand]:.4f} ms", flush=True)
        if first not in runs:
            raise RuntimeError(f"tune: the default {kernel} configuration {first} did not run: {report}")
        # one pass is noisy (clocks drift over a minute of timing): the default and the three fastest
        # others are timed again, interleaved, and a challenger must beat the default by MARGIN
        finalists = [first, *sorted((c for c in times if c != first), key=times.get)[:3]]
        rounds = {c: [] for c in finalists}
        for _ in range(ROUNDS):
            for c in finalists:
                rounds[c].append(timer(runs[c]))
        med = {c: sorted(r)[len(r) // 2] for c, r in rounds.items()}
        win = min(finalists, key=med.get)
        if med[win] > med[first] * (1 - MARGIN):
            win = first
        best[kernel] = _settings(win, gluon.get(kernel, False))
        report[f"final {kernel}"] = {str(c): med[c] for c in finalists}
    config = _merge(base, best)
    if path is not None:
        table = _read(path)  # another process may have written meanwhile
        table[key] = {"function": fn.__name__, "config": config, "ms": report}
        write_atomic(path, json.dumps(table, indent=1))
    return config


def _merge(base: dict, tiles: dict) -> dict:
    """The tuned tiles over the caller's own overrides: a section's other keys (TMA, ...) stay."""
    return {**base, **{sec: {**base.get(sec, {}), **c} for sec, c in tiles.items()}}


GLUON = "gluon"  # the candidate that is a kernel's Gluon Hopper version (forward, dQ, dK/dV)


def _settings(cand, gluon: bool) -> dict:
    """A candidate's config section: GLUON, or a Triton tiling (which says GLUON=False where Gluon could run)."""
    if cand == GLUON:
        return {"GLUON": True}
    return {**dict(zip(KEYS, cand)), **({"GLUON": False} if gluon else {})}


def _pick(cfg: dict) -> dict:
    """A launch configuration's tiles, and the register cap that a default measured with them carries."""
    return {k: cfg[k] for k in (*KEYS, "maxnreg") if k in cfg}


def _outputs(f) -> tuple:
    out = f()
    return tuple(t.detach().float().clone() for t in (out if isinstance(out, tuple) else (out,)) if t is not None)


def _agrees(got: tuple, ref: tuple) -> bool:
    """Equal up to the rounding that another tiling (another summation order) may change."""
    for a, b in zip(got, ref):
        scale = b.abs().max().item() if b.numel() else 0.0
        if a.shape != b.shape or not torch.isfinite(a).all() or (a - b).abs().max().item() > 0.02 * scale + 1e-5:
            return False
    return len(got) == len(ref)


def _do_bench(f) -> float:
    import triton

    return triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median")


def _key(mod, fn, args, kwargs, base, backward, lists) -> str:
    src = Path(mod.__file__).read_bytes() if getattr(mod, "__file__", None) else b""
    dev = args[0].device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    import triton

    sig = [(tuple(a.shape), str(a.dtype)) if isinstance(a, torch.Tensor) else repr(a) for a in args]
    parts = [fn.__name__, hashlib.sha256(src).hexdigest()[:16], name, triton.__version__, repr(sig),
             repr(sorted((k, repr(v)) for k, v in kwargs.items())), repr(sorted(base.items())), str(backward),
             repr(sorted(lists.items()))]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]


def _read(path: Path | None) -> dict:
    if path is None or not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # a damaged cache is rebuilt, not fatal
