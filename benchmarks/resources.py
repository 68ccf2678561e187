"""The compiler's resource report for the benchmark rows, built on a machine without a GPU.

For every kernel the host launches at the benchmark shape (bf16, D=128 on an H100), at the tiles it picks there,
attngen.aot builds the PTX for sm_90 and ptxas -v reports registers per thread and spill bytes; Triton reports the
shared memory. Spills are what limits a consumer that holds dK, dV and two score tiles (docs/language.md).

    python benchmarks/resources.py > benchmarks/results/<date>-sm90-resources.md

The Gluon kernels are warp-specialized: ptxas reports the launch allocation, and setmaxnreg then gives each consumer
warpgroup 240 registers (the loader keeps 32). Their spills are the consumers'.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def launches(mod, params: dict | None = None, seq: int = 8192) -> list[tuple[str, dict]]:
    """(kernel, aot.build keywords) for what the host runs on an H100 at D=128, bf16, aligned tensors, with the
    row's params at S=seq (a banded mask whose keys see many queries takes the Gluon dK/dV: _long_band; whose
    queries see many keys, the Gluon forward and dQ: _long_rows)."""
    defaults = {name: default for name, (_, default) in mod.PARAMS.items()}
    params = {**defaults, **(params or {})}
    long_band = hasattr(mod, "_long_band") and mod._long_band(seq, seq, params)
    long_rows = hasattr(mod, "_long_rows") and mod._long_rows(seq, seq, params)
    gluon_fwd = "fwd_sm90" in mod.KERNELS and (not mod.BANDED or long_rows)
    gluon_bwd = "dkdv_sm90" in mod.KERNELS and not mod.BANDED
    block_map = "blockmap" in mod.KERNELS
    out = []
    tiles = getattr(mod, "SM90_TILES", {})
    if gluon_fwd:
        out.append(("fwd_sm90", dict(block_m=tiles["fwd_sm90"][0], block_n=tiles["fwd_sm90"][1], num_warps=4)))
    else:
        c = mod._fwd_defaults(128, 128, True, True)  # aligned tensors on an H100: TMA loads (_forward_tma)
        out.append(("fwd", dict(block_m=c["BLOCK_M"], block_n=c["BLOCK_N"], num_warps=c["num_warps"],
                                num_stages=c["num_stages"], constexprs={"TMA": True}, maxnreg=c.get("maxnreg"))))
    dkdv, dq = mod._bwd_defaults(128, 128, True)
    for name, c in (("dq", dq), ("dkdv", dkdv)):
        if gluon_bwd or (name == "dkdv" and long_band) or (name == "dq" and long_rows):
            name += "_sm90"
            out.append((name, dict(block_m=tiles[name][0], block_n=tiles[name][1], num_warps=4)))
        else:
            out.append((name, dict(block_m=c["BLOCK_M"], block_n=c["BLOCK_N"], num_warps=c["num_warps"],
                                   num_stages=c["num_stages"])))
    for _, kw in out:
        kw["block_map"] = block_map
    return out


def ptxas(ptx: str) -> tuple[int, int, int]:
    """(registers per thread, spill store bytes, spill load bytes) from ptxas -v for sm_90a."""
    import triton

    exe = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "k.ptx").write_text(ptx)
        r = subprocess.run([str(exe), "-arch=sm_90a", "-v", "k.ptx", "-o", "k.cubin"], cwd=d, capture_output=True,
                           text=True, check=True)
    text = r.stdout + r.stderr
    regs = int(re.search(r"Used (\d+) registers", text)[1])
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return regs, int(spill[1]), int(spill[2])


def main() -> None:
    import triton.language  # noqa: F401 - compiled, before bench (which sets TRITON_INTERPRET without a GPU)
    from bench import ROWS

    from attngen.aot import build
    from attngen.runtime import compile_file, import_path

    print("| row | kernel | tiles (BLOCK_M x BLOCK_N, warps, stages) | registers | spill stores / loads (bytes) "
          "| shared memory (KB) |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        for row in ROWS:
            (path,) = compile_file(ROOT / row.spec, Path(d))
            mod = import_path(path, f"attngen_resources_{path.stem}")
            for kernel, kw in launches(mod, row.params(8192)):
                r = build(path, kernel=kernel, dtype="bf16", d_qk=128, d_v=128, **kw)
                regs, stores, loads = ptxas(r["ptx"])
                tiles = f"{kw['block_m']} x {kw['block_n']}, {kw['num_warps']}, {kw.get('num_stages', '-')}"
                print(f"| {row.name} | {kernel} | {tiles} | {regs} | {stores} / {loads} | {r['shared'] / 1024:.0f} |",
                      flush=True)


if __name__ == "__main__":
    main()
