"""The generated module: deterministic, self-contained, documented, and buildable for sm_90."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
from conftest import DEVICE, EXAMPLES, ROOT

from attngen.codegen import compile_source


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_module_is_deterministic_and_self_contained(path):
    src = path.read_text()
    first = compile_source(src, str(path))
    assert first == compile_source(src, str(path))
    for name, code in first.items():
        tree = ast.parse(code)
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        stdlib = {"concurrent.futures", "contextvars", "functools", "math", "os"}
        assert imported <= stdlib | {"torch", "triton", "triton.language", "triton.experimental",
                            "triton.experimental.gluon", "triton.experimental.gluon.language.nvidia.hopper",
                            "triton.experimental.gluon.nvidia.hopper",
                            "triton.backends.nvidia.driver", "triton.runtime"}, imported  # (the last two: _fast_launch)
        doc = ast.get_docstring(tree)
        assert f"attention {name}" in doc and "Constexprs" in doc and "segment" in doc and "d score / d qk" in doc
        assert f"def {name}(" in code and "class _Attention(torch.autograd.Function)" in code


def test_bytes_identical_across_processes():
    path = EXAMPLES[0]
    code = ("import hashlib, sys; from attngen.codegen import compile_source; "
            f"print(hashlib.sha256(str(compile_source(open({str(path)!r}).read(), 'x')).encode()).hexdigest())")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                           env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout for seed in ("1", "2")}
    assert len(outs) == 1 and len(next(iter(outs))) == 65


def test_hostile_names_are_rejected_or_inert(tmp_path):
    from attngen import AttnError
    from attngen.lower import lower
    from attngen.parse import parse

    for src in ['attention x { param a__b: int = 1 }', 'attention x { param tl: int = 1 }',
                'attention x { mask "\\n import os" }', 'attention x { param out: int = 1 }',
                'attention x { input q: float32[h] }', 'attention x { param None: int = 1 }',
                'attention x { param float: int = 1 }', 'attention x { param inputs: int = 1 }',
                'attention x { input math: float32[h] }', 'attention x { param isinstance: int = 1 }',
                'attention x { param deterministic: bool = true }', 'attention x { input block_map: bool[b] }',
                'attention ' + 'a' * 65 + ' { }']:
        with pytest.raises(AttnError):
            lower(parse(src))
    # names that match kernel locals are inert: user names are prefixed in the kernel
    code = compile_source("attention x { input Q: float32[h]\n param acc: float = 1.0\n"
                          " score score * acc + Q[h] }")["x"]
    assert "inp_Q" in code and "prm_acc" in code
    # a huge literal is rendered from its parsed value
    code = compile_source("attention x { score score + 1e308 * 10.0 }")["x"]
    assert 'float("inf")' in code


# the backward jobs are `_bwd_config`'s cuda defaults for D=128 (test_sm90_jobs_are_the_bwd_defaults)
BWD_DEFAULTS = {"dkdv": dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=4),
                "dq": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)}
SM90_JOBS = (dict(kernel="fwd", dtype="fp16", d_qk=128, d_v=128, num_warps=8),
             dict(kernel="fwd", dtype="bf16", d_qk=64, d_v=64, num_warps=4, num_stages=3),
             *(dict(kernel=kern, dtype="bf16", d_qk=128, d_v=128, block_m=c["BLOCK_M"], block_n=c["BLOCK_N"],
                    num_warps=c["num_warps"], num_stages=c["num_stages"]) for kern, c in BWD_DEFAULTS.items()),
             dict(kernel="fwd", dtype="bf16", d_qk=128, d_v=128, num_warps=8, i64=True),
             # banded masks' forward on Hopper: TMA loads, one stage, 128 registers (module _fwd_defaults)
             dict(kernel="fwd", dtype="bf16", d_qk=128, d_v=128, block_m=64, block_n=64, num_warps=4, num_stages=1,
                  maxnreg=128, constexprs={"TMA": True}))


# the Gluon kernels, each at the module's own tiles (its SM90_TILES)
GLUON_JOBS = {f"gluon {kern} {dtype} D={d}": dict(kernel=kern, dtype=dtype, d_qk=d, d_v=d)
              for kern in ("fwd_sm90", "dkdv_sm90", "dq_sm90") for dtype, d in (("bf16", 128), ("fp16", 64))}


CUT_JOB = "gluon fwd_sm90 bf16 D=128, last round cut"


def _sm90_tiles(source: str) -> dict:
    """A generated module's SM90_TILES, read from its source (the builds run in another process)."""
    (line,) = [ln for ln in source.splitlines() if ln.startswith("SM90_TILES = ")]
    return ast.literal_eval(line.split(" = ", 1)[1])


def test_sm90_jobs_are_the_bwd_defaults(examples):
    """The sm_90 build checks the backward launch configurations the GPU gets by default."""
    import torch

    fn = examples["causal"][1]
    cfgs = sys.modules[fn.__module__]._bwd_config(128, 128, torch.device("cuda"), None)
    assert {k: cfgs[k] for k in BWD_DEFAULTS} == BWD_DEFAULTS


@pytest.fixture(scope="module")
def sm90_builds(tmp_path_factory):
    """Every example's kernel built for sm_90 in one subprocess: {(module, job index): result}."""
    from attngen.aot import build_all
    from attngen.runtime import compile_file

    d = tmp_path_factory.mktemp("sm90")
    jobs, keys = [], []
    for path in EXAMPLES:
        for mod in compile_file(path, d):
            for i, job in enumerate(SM90_JOBS):
                jobs.append({"path": str(mod), **job})
                keys.append((mod.stem, i))
            # the host's fallback (`_launch`) when a backward pipeline does not fit: one stage fewer
            for job in SM90_JOBS:
                if job["kernel"] in ("dkdv", "dq"):
                    jobs.append({"path": str(mod), **job, "num_stages": job["num_stages"] - 1})
                    keys.append((mod.stem, f"{job['kernel']}, a stage fewer"))
            for label, job in GLUON_JOBS.items():  # the Gluon Hopper kernels the module has, at the host's tiles
                if f'    "{job["kernel"]}": (' in mod.read_text():  # its KERNELS entry
                    bm, bn = _sm90_tiles(mod.read_text())[job["kernel"]]
                    jobs.append({"path": str(mod), **job, "block_m": bm, "block_n": bn})
                    keys.append((mod.stem, label))
            if '    "fwd_merge": (' in mod.read_text():  # the Gluon forward that cuts its last round, and the merge
                bm, bn = _sm90_tiles(mod.read_text())["fwd_sm90"]
                for label, job in ((CUT_JOB, dict(kernel="fwd_sm90", block_n=bn, constexprs={"CUT": True})),
                                   ("fwd_merge", dict(kernel="fwd_merge", num_warps=4, constexprs={"ROWS": 32}))):
                    jobs.append({"path": str(mod), "dtype": "bf16", "d_qk": 128, "d_v": 128, "block_m": bm, **job})
                    keys.append((mod.stem, label))
            if "_blockmap_kernel" in mod.read_text():  # the runtime block map's kernels, and the sympy path
                for label, job in (("blockmap", dict(kernel="blockmap", block_m=64, block_n=64, num_warps=2)),
                                   ("blocklists", dict(kernel="blocklists", ratio=(2, 1), cols=128, num_warps=4)),
                                   ("fwd without map", dict(kernel="fwd", dtype="bf16", d_qk=128, d_v=128,
                                                            num_warps=8, block_map=False))):
                    jobs.append({"path": str(mod), **job})
                    keys.append((mod.stem, label))
                jobs.append({"path": str(mod), "kernel": "fwd", "dtype": "bf16", "d_qk": 192, "d_v": 128,
                             "block_m": 64, "block_n": 32, "num_stages": 1})
                keys.append((mod.stem, len(SM90_JOBS)))
    return dict(zip(keys, build_all(jobs)))


# each example's kernels, rendered once at collection: whether its mask or score reads an input tensor (its
# kernels then load it from global memory)
READS_TENSORS = {n: "\nINPUTS = {}\n" not in src for p in EXAMPLES for n, src in compile_source(p.read_text()).items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(READS_TENSORS))
def test_builds_for_sm90(sm90_builds, name):
    """Every example compiles for the H100 on this CPU machine: wgmma in the PTX, shared memory fits."""
    results = {k: r for k, r in sm90_builds.items() if k[0] == name}
    assert results
    for (_, i), r in results.items():
        numbered = isinstance(i, int) and i < len(SM90_JOBS)
        # no matrix product in the block map's kernels
        no_dot = i in ("blockmap", "blocklists", "fwd_merge")
        assert r["wgmma"] or no_dot, f"{name} job {i}: no wgmma in the PTX"
        # a costly score may overflow a backward pipeline: the host then runs it a stage shallower
        kern = SM90_JOBS[i]["kernel"] if numbered else None
        fallback = kern in ("dkdv", "dq") and results[(name, f"{kern}, a stage fewer")]["fits"]
        assert r["fits"] or fallback, f"{name} job {i}: {r['shared']} bytes of shared memory"
        if numbered and not no_dot and SM90_JOBS[i].get("num_stages", 2) > 1:
            # loads from global memory are software-pipelined (needs the constexpr head-dim strides)
            assert r["cp_async"] or r["tma"], f"{name} job {i}: loads not pipelined"
        if numbered and SM90_JOBS[i].get("maxnreg"):  # the banded forward's descriptors
            assert r["tma"], f"{name} job {i}: no TMA copies"
        gluon = i in GLUON_JOBS or i == CUT_JOB
        if gluon:  # warp-specialized: TMA loads, and setmaxnreg moving registers to the consumers
            assert r["tma"] and r["setmaxnreg"], f"{name} {i}: not the warp-specialized TMA kernel"
        if gluon and "dkdv" in i and not READS_TENSORS[name]:  # every input by TMA, LSE and delta too: no step
            # waits on a plain load (a score that reads an input tensor, as temperature's temp[h], loads it)
            assert r["global_loads"] == 0, f"{name} {i}: {r['global_loads']} loads from global memory"
        if name in ("softcap", "gemma_local", "gemma_global") and (numbered or gluon) and not no_dot:
            assert r["fast_tanh"], f"{name} job {i}: 16-bit kernels should use tanh.approx.f32"


SERVING_SPECS = """
attention window_paged { layout paged  heads q = 32, kv = 8  mask q_idx >= kv_idx and q_idx - kv_idx < 1024 }
attention doc_ragged { layout ragged  input doc: int32[b, kv_len]  mask doc[b, q_idx] == doc[b, kv_idx] }
attention mla_paged { layout paged  heads kv = 1  mask q_idx >= kv_idx }
"""
SERVING_JOBS = {  # decode (packed heads, split-KV) and prefill tiles
    "window_paged": [dict(kernel="serve", block_m=16, num_warps=4, num_stages=3, constexprs=dict(HP=4, SPLIT=True)),
                     dict(kernel="serve", block_m=16, num_warps=4, num_stages=3,
                          constexprs=dict(HP=4, SPLIT=True, MERGE=True)),
                     dict(kernel="serve", block_m=16, num_warps=4, num_stages=3,
                          constexprs=dict(HP=4, STREAM=True, BLOCK_T=64)),
                     dict(kernel="serve", block_m=128, num_warps=8, constexprs=dict(HP=4, PAGE=1)),
                     dict(kernel="combine", d_qk=128, d_v=128)],
    "doc_ragged": [dict(kernel="serve", block_m=128, num_warps=8, constexprs=dict(PAGED=False))],
    "mla_paged": [dict(kernel="serve", d_qk=576, d_v=512, block_m=64, block_n=32, num_warps=4, num_stages=1,
                       constexprs=dict(HP=64, SPLIT=True)),
                  # the decode default: values read from the key tile, two 64-key stages
                  dict(kernel="serve", d_qk=576, d_v=512, block_m=16, block_n=64, num_warps=4, num_stages=2,
                       constexprs=dict(HP=16, SPLIT=True, V_IN_K=True))],
}


@pytest.mark.slow
def test_serving_kernels_build_for_sm90(tmp_path):
    """Decode and prefill tiles of the paged/ragged kernels (split-KV ones with and without the in-kernel
    merge, and stream-K), MLA's 576/512 dims and the combine kernel build for the H100; tensor cores
    (wgmma for 64+ rows, mma for decode's 16) and shared memory fit."""
    from attngen.aot import build_all
    from attngen.runtime import compile_file

    (tmp_path / "s.attn").write_text(SERVING_SPECS)
    mods = {m.stem: m for m in compile_file(tmp_path / "s.attn", tmp_path)}
    jobs = [{"path": str(mods[name]), "dtype": "bf16", **job} for name, js in SERVING_JOBS.items() for job in js]
    for job, r in zip(jobs, build_all(jobs)):
        assert r["fits"], f"{job}: {r['shared']} bytes of shared memory"
        if job["kernel"] == "serve" and job["block_m"] >= 64:
            assert r["wgmma"], f"{job}: no wgmma"
        if job["kernel"] == "serve" and job.get("num_stages", 2) > 1:
            assert r["cp_async"], f"{job}: K/V loads not pipelined"


@pytest.mark.slow
def test_tma_forward_builds_for_sm90(tmp_path):
    """The TMA forward (tensor descriptors) builds for the H100 with bulk tensor copies and wgmma."""
    from attngen.aot import build_all
    from attngen.runtime import compile_file

    jobs = []
    for name in ("causal", "document"):
        (mod,) = compile_file(ROOT / "examples" / f"{name}.attn", tmp_path)
        jobs.append({"path": str(mod), "kernel": "fwd", "dtype": "bf16", "num_warps": 8, "num_stages": 3,
                     "constexprs": {"TMA": True}})
        jobs.append({"path": str(mod), "kernel": "dq", "dtype": "bf16", "block_m": 128, "block_n": 64,
                     "num_warps": 8, "num_stages": 3, "constexprs": {"TMA": True}})
    for job, r in zip(jobs, build_all(jobs)):
        assert r["wgmma"] and r["fits"], job
        assert r["tma"], f"{job}: no cp.async.bulk.tensor in the PTX"


@pytest.mark.parametrize("mask, expected", [
    ("q_idx >= kv_idx", False),                                          # causal: the range grows with q
    ("kv_idx < kv_len", False),                                          # full
    ("q_idx >= kv_idx and q_idx - kv_idx < 1024", True),                 # sliding window
    ("q_idx // 2048 == kv_idx // 2048 and q_idx >= kv_idx", True),      # chunked
    ("q_idx >= kv_idx and (kv_idx < 4 or q_idx - kv_idx < 1024)", True),  # sinks + window
    ("kv_idx < 2048 or q_idx >= kv_idx", False),                         # prefix-LM: one wide segment
    ("q_idx <= kv_idx", False),                                          # anti-causal: [q, end) is wide
    ("kv_idx >= q_idx - 256", False),                                    # a one-sided window: as wide
    ("kv_idx >= q_idx - 256 and kv_idx <= q_idx + 256", True),           # a two-sided one
])
def test_banded_masks_get_small_backward_tiles(mask, expected):
    """`banded`: every key range has a bounded width; the module then defaults to 64 x 64 backward tiles."""
    from attngen.analyze import plan
    from attngen.codegen import banded
    from attngen.lower import lower
    from attngen.parse import parse

    (kernel,) = lower(parse(f"attention m {{ mask {mask} }}"))
    assert banded(plan(kernel)) is expected
    code = compile_source(f"attention m {{ mask {mask} }}")["m"]
    assert f"BANDED = {expected}" in code


@pytest.mark.parametrize("spec, expected", [
    ("mask q_idx >= kv_idx", True),                                      # causal: rows grow with q
    ("mask kv_idx < 2048 or q_idx >= kv_idx", True),                     # prefix-LM
    ("score score * 2.0", False),                                        # full: every row the same
    ("mask kv_idx < 100", False),                                        # a fixed key range
    ("mask q_idx >= kv_idx and q_idx - kv_idx < 1024", False),           # sliding: banded, plain order
    ("mask q_idx < 100", True),                                          # some rows see nothing
])
def test_skewed_masks_run_heaviest_first(spec, expected):
    """`skewed` rows differ in work: the forward, dQ and dK/dV kernels then take their programs from
    _heaviest_first; banded and uniform masks keep the plain grid order."""
    code = compile_source(f"attention m {{ {spec} }}")["m"]
    # forward, dQ, and the Gluon dQ where the module has it; the persistent Gluon forward maps its tiles alike
    assert (code.count("j, i_bh = _heaviest_first(8)") == 2 + ("_bwd_dq_sm90_kernel" in code)) is expected
    assert code.count("j, i_bh = _heaviest_first_of(tile, n_m, n_bh, 8)") == ("_fwd_sm90_kernel" in code) * expected
    assert code.count("j, i_bhk = _heaviest_first(8)") == (1 + ("_bwd_dkdv_sm90_kernel" in code)) * expected


def test_sink_tokens_put_their_key_blocks_first():
    """A banded mask with sink tokens: every later row sees the sinks' key block, so dK/dV (Triton, and Gluon
    where the module has it) takes its programs heaviest first in chunks of 32 key blocks; rows cost the same,
    so the forward and dQ keep the grid order. A window alone keeps it everywhere."""
    sinks = compile_source("attention m { mask q_idx >= kv_idx and (kv_idx < 4 or q_idx - kv_idx < 1024) }")["m"]
    assert sinks.count("j, i_bhk = _heaviest_first(32)") == 1 + ("_bwd_dkdv_sm90_kernel" in sinks)
    assert "j, i_bh = _heaviest_first" not in sinks
    window = compile_source("attention m { mask q_idx >= kv_idx and q_idx - kv_idx < 1024 }")["m"]
    assert "_heaviest_first(" not in window.replace("def _heaviest_first(", "")


@pytest.mark.parametrize("mask, first_row, first_key", [
    ("q_idx >= kv_idx", "last", "first"),                                 # causal: late rows, early keys heavy
    ("q_idx <= kv_idx", "first", "last"),                                 # its mirror
    ("kv_idx < 16 or q_idx < 16 or (q_idx - 64 <= kv_idx and kv_idx <= q_idx + 64)", "first", "first"),  # global
])
def test_the_heavier_end_goes_first(tmp_path, mask, first_row, first_key):
    """_row_order and _key_order (the generated helpers, run in the Triton interpreter over the whole grid) hand
    out every (block, batch x head) once, the heavier end's blocks in the first chunk: global query tokens' row
    block first, where the causal order would launch it last."""
    import torch

    from attngen.runtime import import_path

    name = f"order_{abs(hash(mask))}"  # its own module per case: an import of "m" would be cached
    (tmp_path / f"{name}.py").write_text(compile_source(f"attention m {{ mask {mask} }}")["m"])
    probe = tmp_path / "probe_order.py"
    probe.write_text(f"""import triton
import triton.language as tl
from {name} import _heaviest_first, _key_order, _row_order


@triton.jit
def probe(Out, q_len, kv_len, H, GROUP, KEYS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    j, bh = _heaviest_first(8)
    if KEYS:
        i = _key_order(j, bh // (H // GROUP), bh % (H // GROUP) * GROUP, tl.num_programs(0), q_len, kv_len, BLOCK_M,
                       BLOCK_N)
    else:
        i = _row_order(j, bh // H, bh % H, tl.num_programs(0), q_len, kv_len, BLOCK_M, BLOCK_N)
    pid = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    tl.store(Out + 2 * pid, i)
    tl.store(Out + 2 * pid + 1, bh)
""")
    sys.path.insert(0, str(tmp_path))
    try:
        mod = import_path(probe, f"probe_{name}")
    finally:
        sys.path.remove(str(tmp_path))
    n, heads, length = 24, 3, 24 * 32
    for keys, first in ((False, first_row), (True, first_key)):
        out = torch.full((n * heads, 2), -1, dtype=torch.int32, device=DEVICE)
        mod.probe[(n, heads)](out, length, length, heads, 1, KEYS=keys, BLOCK_M=32, BLOCK_N=32)
        assert sorted(map(tuple, out.tolist())) == [(i, b) for i in range(n) for b in range(heads)]
        assert out[0, 0].item() == (0 if first == "first" else n - 1), (keys, out[:8, 0].tolist())


@pytest.mark.parametrize("n0, n1, w", [(1, 1, 8), (5, 3, 8), (8, 4, 8), (17, 2, 8), (64, 32, 8), (10, 7, 8),
                                       (70, 5, 32), (40, 3, 32)])
def test_heaviest_first_is_a_bijection(tmp_path, n0, n1, w):
    """Every (row block, batch x head) pair gets exactly one program, heaviest chunk first (the
    generated helper run in the Triton interpreter over the whole grid)."""
    import torch

    from attngen.runtime import import_path

    code = compile_source("attention m { mask q_idx >= kv_idx }")["m"]
    a = code.index("@triton.jit\ndef _heaviest_first")
    helper = code[a:code.index("return j, r // w", a)] + "return j, r // w\n"
    probe = tmp_path / "probe.py"
    probe.write_text("import triton\nimport triton.language as tl\n\n\n" + helper + """

@triton.jit
def probe(Out, W: tl.constexpr):
    j, bh = _heaviest_first(W)
    pid = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    tl.store(Out + 2 * pid, j)
    tl.store(Out + 2 * pid + 1, bh)
""")
    mod = import_path(probe, f"probe_{n0}_{n1}_{w}")
    out = torch.full((n0 * n1, 2), -1, dtype=torch.int32, device=DEVICE)
    mod.probe[(n0, n1)](out, W=w)
    assert sorted(map(tuple, out.tolist())) == [(j, b) for j in range(n0) for b in range(n1)]
    assert out[: n1 * min(w, n0), 0].max() < min(w, n0)  # the first programs take the heaviest chunk


@pytest.mark.parametrize("name, early", [("softcap", True), ("causal", False)])
def test_gluon_dkdv_folds_a_nonlinear_dscore_before_the_wait(name, early):
    """Where d score / d qk reads qk (softcap), the Gluon dK/dV multiplies it into P^T before it waits for
    V dO^T, so its temporaries do not live across the wait (the kernel is checked on the GPU); a score linear
    in qk keeps the product after the wait."""
    path = ROOT / "examples" / f"{name}.attn"
    src = compile_source(path.read_text(), str(path))[name]
    step = src[src.index("def _dkdv90_step"):src.index("def _dkdv90_compute")]
    assert (step.index("_dscore(") < step.index("dpT = warpgroup_mma_wait")) == early
    assert '"dkdv_sm90": (64, 128)' in src


def test_strided_sub_problems_share_their_kernels():
    """A dilated mask's residue r is a plain argument of every entry kernel: specialized, residues 0 and 1 would
    compile each kernel twice (Triton folds 1 and marks multiples of 16). Kernels of other specs keep the default."""
    import re

    for spec, opts in (("dilated.attn", "(do_not_specialize=['prm__r'])"), ("causal.attn", "")):
        code = next(iter(compile_source((ROOT / "examples" / spec).read_text(), spec).values()))
        entries = dict((n, o) for o, n in re.findall(r"@(?:triton|gluon)\.jit(.*)\ndef \w+?_((?:fwd|bwd)\w*_kernel)\(",
                                                      code))
        assert set(entries) >= {"fwd_kernel", "bwd_dq_kernel", "bwd_dkdv_kernel", "fwd_sm90_kernel"}, entries
        assert set(entries.values()) == {opts}, entries
