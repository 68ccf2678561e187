"""Build generated kernels for a GPU target ahead of time, with no GPU present.

`triton.compile` on an ASTSource runs the whole NVIDIA pipeline (TTIR -> PTX -> cubin via
the bundled ptxas) on the CPU. CI uses it to prove every kernel builds for sm_90 (Hopper),
uses wgmma, and fits in shared memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

H100_SHARED_BYTES = 227 * 1024  # opt-in shared memory per block on sm_90


@contextmanager
def _compiled_mode():
    """@triton.jit yields an interpreter wrapper while TRITON_INTERPRET is set; build without it."""
    old = os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if old is not None:
            os.environ["TRITON_INTERPRET"] = old


def build(path: Path, kernel: str = "fwd", dtype: str = "fp16", d_qk: int = 128, d_v: int = 128, arch: int = 90,
          block_m: int = 128, block_n: int = 64, num_warps: int = 8, num_stages: int = 2, i64: bool = False,
          block_map: bool = True, ratio: tuple[int, int] = (2, 1), cols: int = 128,
          constexprs: dict | None = None, aligned: bool = True, maxnreg: int | None = None) -> dict:
    """Compile one kernel ("fwd", "dkdv", "dq"; "blockmap" and "blocklists" where the mask
    reads tensors; "serve", "combine" for serving layouts) of the generated module at `path`.
    block_map: the attention kernels' BLOCK_MAP path; ratio, cols: the list kernel's RATIO_R, RATIO_C
    and COLS (block_m, block_n: the map's tile); `constexprs` sets the serving kernels' own (HP, PAGED, ...).
    aligned: specialize pointers, strides and the lengths as 16-divisible, as the JIT does for contiguous
    tensors and lengths like 8192 (the build then shows the loads the GPU will really run: vectorized, and
    pipelined with cp.async). maxnreg: Triton's cap on registers per thread, as a launch may set it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .runtime import import_path

    values = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_DQK=triton.next_power_of_2(d_qk),
                  BLOCK_DV=triton.next_power_of_2(d_v), D_QK=d_qk, D_V=d_v, TRACE=False, HAS_DLSE=True,
                  DETERMINISTIC=False, INPUT_GRADS=True, DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", I64=i64,
                  FAST_MATH=dtype != "fp32", LOGIT_POS=True, BLOCK_MAP=block_map, RATIO_R=ratio[0], RATIO_C=ratio[1],
                  COLS=cols)
    d1 = max(16, 1 << (d_qk.bit_length() - 1))
    values.update(HP=1, BLOCK_D1=d1, BLOCK_D2=max(16, triton.next_power_of_2(max(d_qk - d1, 1))), HAS_D2=d_qk > d1,
                  PAGED=True, PAGE=16, SPLIT=False, MERGE=False, STREAM=False, BLOCK_T=1, BLOCK_S=8, TMA=False,
                  STAGES=2, REGS=240, V_IN_K=False, CUT=False)
    with _compiled_mode():
        mod = import_path(Path(path), f"attngen_aot_{Path(path).stem}_{os.getpid()}")
        if kernel.endswith("_sm90"):  # the ring depth the module launches the Gluon kernel with
            values["STAGES"] = mod._gluon_launch(kernel, d_qk, d_v)["STAGES"]
        values["TILES"] = getattr(mod, "_MAP_TILES", 1)  # the tiles a block-map program takes, as the host launches
        values.update(constexprs or {})
        fn, args = mod.KERNELS[kernel]
        sig, const, attrs = {}, {}, {}
        descs = _desc_types(mod, kernel, dtype, d_qk, d_v, block_m, block_n) if any(
            a.endswith(":desc") for a in args) else []
        for i, item in enumerate(args):
            name, ty = item.split(":")
            if ty == "desc":  # a host-side TMA descriptor, typed as the JIT types it
                sig[name] = descs.pop(0)
            elif ty == "constexpr":  # head-dim strides: 1, as for contiguous tensors
                sig[name], const[name] = "constexpr", 1 if name.startswith("stride_") else values[name]
            elif ty == "none":  # optional pointers (trace, deterministic buffers) left out
                sig[name], const[name] = "constexpr", None
            else:
                sig[name] = f"*{dtype}" if ty == "*q" else ty
                if aligned and (ty.startswith("*") or name.startswith("stride_") or name in ("q_len", "kv_len")):
                    attrs[(i,)] = [["tt.divisibility", 16]]  # what the JIT finds for contiguous tensors
        source = ASTSource
        if getattr(fn, "is_gluon", lambda: False)():  # the Hopper forward (forward_sm90.py.jinja)
            from triton.experimental.gluon._runtime import GluonASTSource

            source, num_warps = GluonASTSource, 4  # 4: its loader; the consumers bring their own warpgroups
        k = triton.compile(source(fn, sig, const, attrs), target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": num_warps, "num_stages": num_stages,
                                    **({"maxnreg": maxnreg} if maxnreg else {})})
    ptx = k.asm["ptx"]
    return {"ptx": ptx, "shared": k.metadata.shared, "wgmma": "wgmma" in ptx,
            "setmaxnreg": "setmaxnreg" in ptx,  # warp specialization moving registers to the consumers
            "fast_tanh": "tanh.approx.f32" in ptx,
            "tma": "cp.async.bulk.tensor" in ptx, "cp_async": "cp.async.ca" in ptx or "cp.async.cg" in ptx,
            "global_loads": ptx.count("ld.global"),  # plain loads: latency a warp waits for, unlike TMA's
            "fits": k.metadata.shared <= H100_SHARED_BYTES}


def _desc_types(mod, kernel: str, dtype: str, d_qk: int, d_v: int, block_m: int, block_n: int) -> list[str]:
    """The Gluon backward kernels' descriptor parameters as the JIT types them (dtype, block, layout), from the
    generated module's own builders applied to small CPU tensors."""
    import torch
    from triton.runtime.jit import mangle_type

    dt = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    t = lambda d: torch.empty(1, 1, 256, d, dtype=dt)  # noqa: E731
    if kernel == "dkdv_sm90":
        row = torch.empty(1, 1, 256, dtype=torch.float32)
        descs = mod._dkdv_descs(t(d_qk), t(d_qk), t(d_v), t(d_v), t(d_qk), t(d_v), row, row, block_m, block_n)
    else:
        descs = mod._dq_descs(t(d_qk), t(d_qk), t(d_v), t(d_v), t(d_qk), block_m, block_n)
    return [mangle_type(d) for d in descs]


def build_all(jobs: list[dict]) -> list[dict]:
    """Build many kernels in one fresh process: once triton has been imported under
    TRITON_INTERPRET its standard library is interpreted and cannot be compiled.
    Each job holds `path` and `build` keyword arguments; results drop the PTX text."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "attngen.aot"], input=json.dumps(jobs), text=True,
                       capture_output=True, env=env, check=False)
    if r.returncode:
        raise RuntimeError(f"sm_90 build failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout)


def _main() -> None:
    out = []
    for job in json.loads(sys.stdin.read()):
        res = build(Path(job.pop("path")), **job)
        res.pop("ptx")
        out.append(res)
    print(json.dumps(out))


if __name__ == "__main__":
    _main()
