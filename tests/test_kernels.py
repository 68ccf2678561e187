"""Every example's generated kernels (forward and backward) against the interpreter, with the
tolerance calibrated on an fp64 golden (kernel error <= K x interpreter error in the same dtype).
Gradients: dq, dk, dv and every learnable input, from a random dO and a random dLSE."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import DEVICE, StandInJit, compile_spec, example_names

from attngen.verify import CPU_SHAPES, GPU_SHAPES, Shape, check, make_inputs, params_for

SHAPES = GPU_SHAPES[1:2] + CPU_SHAPES if DEVICE.type == "cuda" else CPU_SHAPES
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("name", example_names())
def test_example_matches_interpreter(examples, name, dtype, shape):
    kernel, fn = examples[name]
    r = check(kernel, fn, shape, dtype, DEVICE, seed=sum(map(ord, name + str(shape))))
    assert r.ok, f"{name} {r.dtype} {r.shape}: {r.why}"


@pytest.mark.parametrize("name", ["dilated", "relative_bias"])
def test_repeated_calls_compare_the_last(examples, monkeypatch, name):
    """check(repeat=2), as the GPU scripts run it: the function runs twice and the second run is the one compared
    (on the GPU it goes through the remembered decisions and direct launches). A second run that went wrong would
    fail the check."""
    kernel, fn = examples[name]
    calls = []

    def counted(*a, **kw):
        calls.append(1)
        out = fn(*a, **kw)
        if len(calls) != 2:
            return out
        return (out[0] * 1.01, *out[1:]) if isinstance(out, tuple) else out * 1.01  # only the second run is wrong

    assert check(kernel, fn, CPU_SHAPES[0], torch.float32, DEVICE, seed=2, repeat=2).ok
    assert not check(kernel, counted, CPU_SHAPES[0], torch.float32, DEVICE, seed=2, repeat=2).ok
    calls.clear()
    assert check(kernel, counted, CPU_SHAPES[0], torch.float32, DEVICE, seed=2, repeat=1).ok


@pytest.mark.parametrize("name", example_names())
def test_dense_mode_matches_sparse(examples, examples_dense, name):
    """The suite with the sparsity analysis off: same results, and both correct."""
    shape = CPU_SHAPES[0]
    ks, fs = examples[name]
    kd, fd = examples_dense[name]
    r = check(kd, fd, shape, torch.float32, DEVICE, seed=3)
    assert r.ok, r.why
    q, k, v, inputs = make_inputs(ks, shape.fit(ks), torch.float32, DEVICE, seed=4)
    p = params_for(ks, shape.fit(ks))
    a, b = fs(q, k, v, **inputs, **p), fd(q, k, v, **inputs, **p)
    assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("config", [dict(BLOCK_M=16, BLOCK_N=32), dict(BLOCK_M=64, BLOCK_N=16)],
                         ids=lambda c: f"M{c['BLOCK_M']}N{c['BLOCK_N']}")
@pytest.mark.parametrize("name", ["sink_window", "chunked", "document", "local_global", "dilated"])
def test_other_block_sizes(examples, name, config):
    kernel, fn = examples[name]
    r = check(kernel, fn, Shape(1, 2, 1, 70, 83, 32, 16), torch.float32, DEVICE, seed=5, config=config)
    assert r.ok, r.why


SPECIAL = """
attention python_intdiv {
    # // and % follow Python on negative operands, in mask and score
    score score + ((q_idx - kv_idx) // 3) * 0.25 + ((kv_idx - q_idx) % 5) * 0.125
    mask  (kv_idx - q_idx) % 4 != 1 and (q_idx - kv_idx) // 7 >= -2
}
attention empty_rows {
    # every third row sees nothing: output 0, lse -inf, no NaN
    mask q_idx % 3 != 0 and q_idx >= kv_idx
}
attention neg_inf_score {
    # a score that returns -inf drops entries like a mask; row 5 is fully dropped
    score -inf if kv_idx > q_idx or q_idx == 5 else score
}
attention never {
    mask q_idx < 0
}
attention spec_scale {
    param t: float = 2.0
    scale 0.5 / t
    score score * t
}
attention big_logits {
    score score * 64.0
}
attention anti_causal {
    # keys at or after the query: the first row blocks are the heavy ones (run first: _row_order), and the last
    # key blocks (_key_order); not banded, although the range's lower end moves with q_idx
    mask q_idx <= kv_idx
}
attention separable {
    # a logit c * qk + f(kv_idx) + g(q_idx), f quadratic: 16-bit inputs take it split (analyze.Split: a key
    # vector per block, the query term in the row statistics); float32 keeps the unsplit logit
    score score * 0.75 + 0.0005 * kv_idx * kv_idx - 0.02 * q_idx + 0.125
    mask  q_idx + 8 >= kv_idx
}
attention dilated_alibi {
    # split and rewritten: the strided sub-problems' positions (2 * q_idx + r) enter the key and query terms
    input slopes: float32[h]
    score score + slopes[h] * (kv_idx - q_idx)
    mask  q_idx >= kv_idx and (q_idx - kv_idx) % 2 == 0
}
attention key_neg_inf {
    # a key term that can be -inf is not split: f(kv_idx) - f(kv0) would give NaN where f(kv0) = -inf
    score score + (-inf if kv_idx >= 20 else 0.0)
}
attention negative_scale {
    # s = c * qk with c < 0: the forward's full blocks take the row max as c * min(qk), or exp2 overflows
    mask q_idx >= kv_idx
    scale -8.0
}
"""


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("name", ["python_intdiv", "empty_rows", "neg_inf_score", "never", "spec_scale",
                                  "big_logits", "negative_scale", "anti_causal", "separable",
                                  "dilated_alibi", "key_neg_inf"])
def test_special_specs(build_dir, name, dtype):
    kernel, fn = compile_spec(SPECIAL, build_dir, tag="special")[name]
    # logits of |c| = 64 and 8 x qk in float32: the backward recomputes qk (as K Q^T in dK/dV) in another summation
    # order than the forward, and the logit's scale amplifies that rounding into P; the interpreter keeps one P.
    # dV's error was 9-10x the interpreter's with numpy's float32 products on an AVX-512 CPU, within 4x on others
    k = 16.0 if dtype == torch.float32 and name in ("big_logits", "negative_scale") else None
    for shape in (Shape(1, 2, 2, 45, 45, 32, 32), Shape(1, 1, 1, 1, 1, 16, 16), Shape(2, 2, 1, 33, 7, 16, 8)):
        r = check(kernel, fn, shape, dtype, DEVICE, seed=7, k_factor=k)
        assert r.ok, f"{shape}: {r.why}"


def test_split_logit_keeps_float32_exact(build_dir):
    """float32 inputs keep the unsplit logit: the split's origins differ between the forward (a query block) and the
    dK/dV (a key block), so its backward would not recompute the forward's logits bit for bit, and large logits
    (here slopes of either sign over 130 positions) turn that into dV errors above 4x the interpreter's."""
    kernel, fn = compile_spec(SPECIAL, build_dir, tag="special")["dilated_alibi"]
    r = check(kernel, fn, Shape(1, 2, 1, 130, 100, 16, 16), torch.float32, DEVICE, seed=7)
    assert r.ok, r.why


def test_fully_masked_rows_are_zero(build_dir):
    kernel, fn = compile_spec(SPECIAL, build_dir, tag="special")["empty_rows"]
    q, k, v, _ = make_inputs(kernel, Shape(1, 2, 2, 40, 40, 16, 16), torch.float32, DEVICE, 1)
    out, lse = fn(q, k, v, return_lse=True)
    assert torch.equal(out[:, :, ::3], torch.zeros_like(out[:, :, ::3]))
    assert torch.isneginf(lse[:, :, ::3]).all() and torch.isfinite(lse[:, :, 1::3]).all()


def test_tolerance_catches_a_wrong_kernel(build_dir):
    """The check must be able to fail: run the strict-causal kernel against the causal IR."""
    causal = compile_spec("attention c { mask q_idx >= kv_idx }", build_dir, tag="mut")["c"][0]
    strict = compile_spec("attention c { mask q_idx > kv_idx or q_idx == 0 }", build_dir, tag="mut2")["c"][1]
    r = check(causal, strict, Shape(1, 2, 2, 40, 40, 16, 16), torch.float32, DEVICE, seed=2)
    assert not r.ok


def test_scale_override_and_noncontiguous(examples):
    kernel, fn = examples["causal"]
    g = torch.Generator().manual_seed(11)
    q = torch.randn(1, 20, 2, 16, generator=g).to(DEVICE).transpose(1, 2)  # non-contiguous
    k = torch.randn(1, 2, 20, 16, generator=g).to(DEVICE)
    v = torch.randn(1, 2, 20, 16, generator=g).to(DEVICE)
    from attngen.interpreter import interpret

    out = fn(q, k, v, scale=0.3)
    ref = interpret(kernel, q.double(), k.double(), v.double(), scale=0.3)
    assert (out.double() - ref).abs().max() < 1e-5


def test_head_dim_stride_other_than_one(examples):
    """Head-dim strides are constexprs (1 for contiguous tensors); another stride compiles its own variant."""
    kernel, fn = examples["causal"]
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, 2, 24, 32, generator=g).to(DEVICE)[..., ::2] for _ in range(3))  # stride 2
    from attngen.interpreter import interpret

    ref = interpret(kernel, q.double(), k.double(), v.double())
    assert (fn(q, k, v).double() - ref).abs().max() < 1e-5


def test_call_validation(examples):
    kernel, fn = examples["document"]
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    doc = torch.zeros(1, 8, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="doc_id.dtype: expected int32"):
        fn(q, q, q, doc.long())
    with pytest.raises(ValueError, match=r"doc_id.shape: expected \[1, 8\]"):
        fn(q, q, q, doc[:, :4])
    with pytest.raises(ValueError, match="k head dim"):
        fn(q, q[..., :8], q, doc)
    with pytest.raises(ValueError, match="query heads"):
        examples["gqa"][1](q, q, q)
    with pytest.raises(ValueError, match="keyword 'windw': expected one of"):
        fn(q, q, q, doc, windw=3)
    with pytest.raises(ValueError, match="window: expected int"):
        examples["sliding_window"][1](q, q, q, window=2.5)


@pytest.mark.parametrize("config, message", [
    ({"num_warp": 4}, r"config\['num_warp'\]: expected one of BLOCK_M, .*, fwd, bwd, dkdv, dq, got 'num_warp'"),
    ({"fwd": {"BLOCK_M": 48}}, r"config\['fwd'\]\['BLOCK_M'\]: expected a power of two up to 256, got 48"),
    ({"BLOCK_N": "64"}, r"config\['BLOCK_N'\]: expected a power of two up to 256, got '64'"),
    ({"dq": {"BLOCK_N": 512}}, r"config\['dq'\]\['BLOCK_N'\]: expected a power of two up to 256, got 512"),
    ({"dkdv": {"TMA": True}}, r"config\['dkdv'\]\['TMA'\]: .*not a key of the 'dkdv' section"),
    ({"fwd": {"BLOCK_MAP": False}}, r"not a key of the 'fwd' section"),
    ({"fwd": 3}, r"config\['fwd'\]: expected a dict of launch overrides, got int"),
    ({"num_warps": True}, r"config\['num_warps'\]: expected 1, 2, 4, 8 or 16, got True"),
    ({"num_stages": 0}, r"config\['num_stages'\]: expected an int from 1 to 8, got 0"),
    ([("BLOCK_M", 64)], r"config: expected a dict of launch overrides, got list"),
])
def test_bad_config_names_the_problem(examples, config, message):
    """A typo in a launch override is an error, not ignored; a bad value is caught before Triton."""
    kernel, fn = examples["document"]
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    doc = torch.zeros(1, 8, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=message):
        fn(q, q, q, doc, config=config)
    with pytest.raises(ValueError, match=message):
        fn.block_map(q, q, q, doc, config=config)


def test_good_configs_pass_validation(examples):
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    doc = torch.zeros(1, 8, dtype=torch.int32, device=DEVICE)
    fn = examples["document"][1]
    for config in ({"BLOCK_MAP": False, "I64": True}, {"bwd": {"num_warps": 4}, "dq": {"TMA": False}},
                   {"fwd": {"BLOCK_M": 16, "BLOCK_N": 32, "num_stages": 1, "FAST_MATH": False}}):
        fn(q, q, q, doc, config=config)
    with pytest.raises(ValueError, match=r"config\['BLOCK_MAP'\]: expected one of"):  # no map in this spec
        examples["causal"][1](q, q, q, config={"BLOCK_MAP": False})
    # tl.dot needs 16-wide tiles on the GPU; the interpreter (the CPU tests) takes smaller ones
    mod = sys.modules[fn.__module__]
    mod._check_config({"BLOCK_N": 8}, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"config\['BLOCK_N'\]: expected at least 16 on the GPU"):
        mod._check_config({"BLOCK_N": 8}, torch.device("cuda"))


@pytest.mark.parametrize("name", ["relative_bias", "alibi", "temperature"])
def test_deterministic_mode_is_bit_identical(examples, name):
    """deterministic=True: two runs give identical learnable-input gradients, and they are right."""
    kernel, fn = examples[name]
    shape = Shape(2, 4, 2, 70, 70, 16, 16)
    r = check(kernel, fn, shape, torch.float32, DEVICE, seed=9, deterministic=True)
    assert r.ok, r.why
    q, k, v, inputs = make_inputs(kernel, shape, torch.float32, DEVICE, seed=10)
    runs = []
    for _ in range(2):
        table = {n: t.clone().requires_grad_() for n, t in inputs.items()}
        out = fn(q, k, v, **table, deterministic=True)
        out.square().sum().backward()
        runs.append([t.grad.clone() for t in table.values()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("deterministic", [False, True])
def test_unwanted_input_grads_are_skipped(examples, deterministic):
    """A learnable input that does not require grad: the dQ kernel skips its work (INPUT_GRADS off),
    q/k/v gradients are unchanged and bit-identical, the input gets none."""
    kernel, fn = examples["relative_bias"]
    q, k, v, inputs = make_inputs(kernel, Shape(1, 2, 2, 40, 40, 16, 16), torch.float32, DEVICE, seed=13)
    grads = []
    for wanted in (True, False):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        table = {n: t.clone().requires_grad_(wanted) for n, t in inputs.items()}
        fn(qq, kk, vv, **table, deterministic=deterministic).square().sum().backward()
        assert all((t.grad is not None) == wanted for t in table.values())
        grads.append([t.grad for t in (qq, kk, vv)])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["causal", "document", "relative_bias"])
def test_lse_only_on_request(examples, name):
    """The LSE is made only when asked for: without it the output is a tensor, with grad and without,
    and the q/k/v and learnable-input gradients are bit-identical to those of a call that returns it
    and gets no LSE gradient (dQ computes delta with or without a dLSE term)."""
    kernel, fn = examples[name]
    q, k, v, inputs = make_inputs(kernel, Shape(1, 2, 2, 45, 45, 16, 16), torch.float32, DEVICE, seed=14)
    learnable = {i.name for i in kernel.inputs if i.learnable}
    with torch.no_grad():
        assert isinstance(fn(q, k, v, **inputs), torch.Tensor)
    grads = []
    for want in (False, True):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        table = {n: t.clone().requires_grad_(n in learnable) for n, t in inputs.items()}
        res = fn(qq, kk, vv, **table, return_lse=want)
        out = res[0] if want else res
        assert isinstance(out, torch.Tensor) and out.requires_grad
        loss = out.square().sum() + (res[1][torch.isfinite(res[1])].sum() * 0 if want else 0)
        loss.backward()
        grads.append([t.grad for t in (qq, kk, vv)] + [table[n].grad for n in sorted(learnable)])
    assert len(grads[0]) == 3 + len(learnable) and all(g is not None for g in grads[0])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_launch_steps_down_a_pipeline_that_does_not_fit(examples):
    """`_launch`: OutOfResources (shared memory) -> one stage fewer, remembered for the next call."""
    from triton.runtime.errors import OutOfResources

    mod = sys.modules[examples["causal"][1].__module__]
    tried = []

    class Deep:  # fits in shared memory from 2 stages down, and never with BLOCK_M=512
        def __getitem__(self, grid):
            def go(*args, num_stages, BLOCK_M, **kw):
                tried.append(num_stages)
                if num_stages > 2 or BLOCK_M == 512:
                    raise OutOfResources(300000, 232448, "shared memory")
            return go

    kernel = Deep()
    mod._launch(kernel, (1,), 0, BLOCK_M=64, num_stages=4)
    mod._launch(kernel, (1,), 0, BLOCK_M=64, num_stages=4)
    assert tried == [4, 3, 2, 2]
    tried.clear()
    with pytest.raises(OutOfResources):  # even one stage does not fit: the error reaches the caller
        mod._launch(kernel, (1,), 0, BLOCK_M=512, num_stages=1)
    assert tried == [1]


def test_fully_masked_rows_have_zero_gradients(build_dir):
    kernel, fn = compile_spec(SPECIAL, build_dir, tag="special")["empty_rows"]
    q, k, v, _ = make_inputs(kernel, Shape(1, 2, 2, 40, 40, 16, 16), torch.float32, DEVICE, 1)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v, return_lse=True)
    (out.square().sum() + lse[torch.isfinite(lse)].sum()).backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[:, :, ::3], torch.zeros_like(q.grad[:, :, ::3]))


def test_missing_required_param(build_dir):
    kernel, fn = compile_spec("attention r { param w: int\n mask q_idx - kv_idx < w }", build_dir, tag="req")["r"]
    q = torch.randn(1, 1, 4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="w: expected a int"):
        fn(q, q, q)
    assert fn(q, q, q, w=2).shape == q.shape


@pytest.mark.parametrize("name", ["causal", "mqa", "relative_bias", "document"])
def test_64bit_offsets_path(examples, name):
    """The I64 variant (chosen when a tensor's largest offset reaches 2**31) computes the same."""
    kernel, fn = examples[name]
    r = check(kernel, fn, Shape(1, 8, 2, 40, 50, 16, 16), torch.float32, DEVICE, seed=12, config={"I64": True})
    assert r.ok, r.why


def test_64bit_offsets_are_chosen_by_size(examples):
    import sys

    mod = sys.modules[examples["causal"][1].__module__]
    assert not mod._i64(torch.empty(2, 2, 8, 16))
    # [B, S, H, D] with S * H * D = 2**31 + ...: meta tensors, so no memory is needed
    big = torch.empty_strided((1, 2**20 + 1, 16, 128), (2**31, 2048, 128, 1), device="meta")
    assert mod._i64(big.transpose(1, 2)) and not mod._i64(big[:, :1000].transpose(1, 2))


@pytest.mark.parametrize("name", ["causal", "document", "qk192_v128", "relative_bias"])
def test_tma_dq_path(examples, name):
    """The dQ kernel's tensor-descriptor path, with the forward's (so that qk is summed the same way)."""
    kernel, fn = examples[name]
    for shape in (Shape(2, 4, 2, 77, 77, 32, 32), Shape(1, 2, 1, 40, 97, 48, 24)):
        r = check(kernel, fn, shape, torch.float32, DEVICE, config={"fwd": {"TMA": True}, "dq": {"TMA": True}})
        assert r.ok, f"{shape}: {r.why}"


@pytest.mark.parametrize("name", ["causal", "document", "qk192_v128", "dilated"])
def test_tma_forward_path(examples, name):
    """The forward's tensor-descriptor path (Hopper TMA on the GPU; emulated by the Triton
    interpreter): zero-filled tails past kv_len and past the head dim, strided (dilated) views."""
    kernel, fn = examples[name]
    for shape in (Shape(2, 4, 2, 77, 77, 32, 32), Shape(1, 2, 1, 40, 97, 48, 24)):
        r = check(kernel, fn, shape, torch.float32, DEVICE, config={"fwd": {"TMA": True}}, grad=False)
        assert r.ok, f"{shape}: {r.why}"


@pytest.mark.parametrize("name", ["sliding_window", "document", "causal"])
def test_banded_forward_defaults_trade_stages_for_occupancy(examples, name):
    """On Hopper with TMA, banded masks' forward runs one stage under a 128-register cap (4 programs per SM) for
    head dims from 65 to 128, and two stages uncapped up to 64; the cap goes with those tiles only: overrides of
    tiles, warps or stages drop it unless they set their own."""
    mod = sys.modules[examples[name][1].__module__]
    cuda = torch.device("cuda")
    c = mod._config(128, 128, cuda, None, tma=True)
    if not mod.BANDED:
        assert "maxnreg" not in c
        return
    assert c == dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1, maxnreg=128)
    assert mod._config(64, 64, cuda, None, tma=True) == dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
    assert mod._config(128, 64, cuda, None, tma=True)["maxnreg"] == 128
    assert "maxnreg" not in mod._config(128, 128, cuda, None, tma=False)
    assert "maxnreg" not in mod._config(192, 128, cuda, None, tma=True)
    assert "maxnreg" not in mod._config(128, 128, torch.device("cpu"), None, tma=True)
    assert "maxnreg" not in mod._config(128, 128, cuda, {"fwd": {"num_stages": 2}}, tma=True)
    assert mod._config(128, 128, cuda, {"I64": True}, tma=True)["maxnreg"] == 128
    assert mod._config(128, 128, cuda, {"num_stages": 2, "maxnreg": 168}, tma=True)["maxnreg"] == 168
    assert mod._config(128, 128, cuda, {"fwd": {"maxnreg": None}}, tma=True)["maxnreg"] is None
    mod._check_config({"fwd": {"maxnreg": 128}, "dq": {"maxnreg": None}}, cuda)
    with pytest.raises(ValueError, match=r"config\['maxnreg'\]: expected None or an int from 24 to 255, got 300"):
        mod._check_config({"maxnreg": 300}, cuda)
    # the cap is a launch option: the kernels take it (the interpreter ignores it), same results
    kernel, fn = examples[name]
    q, k, v, inputs = make_inputs(kernel, Shape(1, 2, 1, 40, 40, 16, 16), torch.float32, DEVICE, seed=5)
    tiles = {"BLOCK_M": 16, "BLOCK_N": 16}
    assert torch.equal(fn(q, k, v, **inputs, config={**tiles, "maxnreg": 128}), fn(q, k, v, **inputs, config=tiles))


class _OnGPU:
    """A tensor's metadata as on a CUDA device (for the host's checks; no GPU needed)."""

    def __init__(self, t, ptr: int = 0):
        self.t, self.ptr, self.device = t, ptr, torch.device("cuda", 0)

    def __getattr__(self, name):
        return getattr(self.t, name)

    def data_ptr(self) -> int:
        return self.ptr


@pytest.mark.parametrize("name", ["causal", "document"])
def test_asked_tma_sets_the_allocator_or_says_why_not(examples, monkeypatch, name):
    """config TMA=True on the GPU: the Triton forward and dQ get Triton's allocator for their descriptors (a
    document spec's forward once raised 'no allocator was set' on the H100), or a ValueError that says why
    descriptors cannot work there."""
    mod = sys.modules[examples[name][1].__module__]
    calls = []
    monkeypatch.setattr(mod, "_ensure_allocator", lambda: calls.append(1))
    monkeypatch.setattr(mod, "_capability", lambda index: 9)
    k = _OnGPU(torch.empty(1, 2, 64, 64, dtype=torch.float16))
    assert mod._forward_tma(k, k, {"fwd": {"TMA": True}}) and calls == [1]
    assert mod._asked_tma("dq", k, k) and calls == [1, 1]
    assert not mod._forward_tma(k, k, {"TMA": False}) and calls == [1, 1]
    with pytest.raises(ValueError, match=r"config TMA \('fwd'\): .*16-byte aligned"):
        mod._forward_tma(_OnGPU(k.t, ptr=8), k, {"TMA": True})
    monkeypatch.setattr(mod, "_capability", lambda index: 8)
    with pytest.raises(ValueError, match=r"config TMA \('dq'\): .*compute capability 9"):
        mod._asked_tma("dq", k, k)


@pytest.mark.parametrize("S", [7, 8, 1])
def test_dilated_row_statistics_tile_the_buffer(examples, S):
    """Dilated specs keep each strided sub-problem's row statistics as one contiguous block of a flat
    buffer, which the kernels read and write in place: the blocks must cover it exactly, in order."""
    mod = sys.modules[examples["dilated"][1].__module__]
    d = mod.DILATION
    assert d > 1
    q = torch.empty(2, 3, S, 16)
    flat = torch.arange(q.shape[:3].numel(), dtype=torch.float32)
    seen = []
    for r in range(d):
        rows = mod._residue_rows(flat, q, r)
        assert rows.shape == (2, 3, len(range(r, S, d))) and rows.is_contiguous()
        seen.append(rows.flatten())
    assert torch.equal(torch.cat(seen), flat)


@pytest.mark.parametrize("S", [333, 64, 1])
def test_backward_row_vectors_start_on_16_bytes(examples, S):
    """delta and m + log2(l) for the backward (_rows) keep each (batch, head) row at a multiple of 4 floats, the
    stride every backward kernel indexes them by (_vec_stride): the Gluon dK/dV copies 64-row blocks of them by
    TMA, and a copy from a row start off 16 bytes is an illegal instruction on the H100."""
    mod = sys.modules[examples["causal"][1].__module__]
    t = mod._rows(2, 3, S, "cpu")
    pad = -(-S // 4) * 4
    assert t.shape == (2, 3, S) and t.stride() == (3 * pad, pad, 1) and t.dtype == torch.float32
    assert t.untyped_storage().nbytes() == 2 * 3 * pad * 4


@pytest.mark.parametrize("name", ["causal", "alibi", "document", "dilated"])
def test_repeated_launches_call_the_compiled_variant(examples, monkeypatch, name):
    """A launch whose arguments match an earlier one's (tensors by dtype and alignment, the rest by value) runs
    the compiled variant that the JIT picked for it, directly (on a GPU: Triton's binding is skipped). Stand-ins
    check the arguments it passes: forward and backward (learnable inputs included) of repeated calls with new
    values equal those of the interpreted kernels; another length goes through the JIT again."""
    kernel, fn = examples[name]
    mod = sys.modules[fn.__module__]

    def call(seed, S=100):
        q, k, v, inputs = make_inputs(kernel, Shape(1, 2, 2, S, S, 16, 16), torch.float32, DEVICE, seed)
        leaves = [t.requires_grad_() for t in (q, k, v, *inputs.values()) if t.is_floating_point()]
        out = fn(q, k, v, *inputs.values(), **params_for(kernel, Shape(1, 2, 2, S, S, 16, 16)))
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE))
        return [out.detach(), *(t.grad for t in leaves)]

    want = [call(seed) for seed in range(3)]
    jits = [StandInJit(getattr(mod, f"{name}_{k}_kernel")) for k in ("fwd", "bwd_dq", "bwd_dkdv")]
    for k, jit in zip(("fwd", "bwd_dq", "bwd_dkdv"), jits):
        monkeypatch.setattr(mod, f"{name}_{k}_kernel", jit)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(mod, "_LAUNCHED", {})
    for seed in range(3):
        got = call(seed)
        assert all(j.direct > 0 for j in jits) == (seed > 0)
        for a, b in zip(got, want[seed]):
            assert torch.equal(a, b)
    before = [j.direct for j in jits]
    call(0, S=120)
    assert [j.direct for j in jits] == before


def test_launch_signatures_tell_apart_what_triton_specializes_on(examples):
    """Direct launches reuse a compiled variant only for a launch with the same _signature, which must tell
    apart everything Triton specializes on: pointer alignment (16 bytes), dtypes, int values (Triton: 1,
    divisibility by 16, 32 or 64 bits), argument types (1, True and 1.0), keywords and grids."""
    mod = sys.modules[examples["causal"][1].__module__]
    sig = lambda args, kw=None, grid=(4, 2): mod._signature("k", grid, args, kw or {})  # noqa: E731
    x = torch.randn(64)
    assert sig((x[:32],)) == sig((torch.randn(32),))
    assert sig((x[:32],)) != sig((x[1:33],))  # 4 bytes off: not 16-byte aligned
    assert sig((x,)) != sig((x.half(),))
    assert len({sig((a,)) for a in (1, True, 1.0, 16, 17, 2 ** 31, None)}) == 7
    assert sig((1,), {"BLOCK_M": 64}) != sig((1,), {"BLOCK_M": 128})
    assert sig((1,), grid=(4, 2)) != sig((1,), grid=(4, 3))
    assert sig(((1, 2),)) is None and sig((object(),)) is None


def _rehearsing(mod, monkeypatch) -> tuple[list, list]:
    """_prebuild on for CPU tensors. Returns (built, ran): each rehearsal's launches as _build_all would compile
    them, and the launches that really ran, by _signature (what picks a compiled variant)."""
    built, ran = [], []
    monkeypatch.setattr(mod, "_builds_ahead", lambda q: True)
    monkeypatch.setattr(mod, "_build_all", lambda kernels: built.append({mod._signature(*x) for k in kernels
                                                                          for x in k}))
    real = mod._launch

    def spy(kernel, grid, *args, _slots=None, **kw):
        if mod._DRY_RUN.get() is None:
            ran.append(mod._signature(kernel, grid, args, kw))
        return real(kernel, grid, *args, _slots=_slots, **kw)

    monkeypatch.setattr(mod, "_launch", spy)
    mod._BUILT.clear()
    return built, ran


def _fwd_bwd(fn, q, k, v, dout, **kw) -> list:
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kw)
    out.backward(dout)
    return [out.detach(), q.grad, k.grad, v.grad]


@pytest.mark.parametrize("name", ["causal", "dilated", "softcap"])
def test_prebuild_rehearses_the_launches_of_the_call(examples, monkeypatch, name):
    """A first call rehearses its forward and backward and builds what they will launch, nothing else; the call
    then runs as without it (same results), and later calls of the same kind rehearse nothing."""
    kernel, fn = examples[name]
    mod = sys.modules[fn.__module__]
    q, k, v, _ = make_inputs(kernel, Shape(1, 2, 2, 200, 200, 16, 16), torch.float32, DEVICE, seed=5)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    want = _fwd_bwd(fn, q, k, v, dout)
    built, ran = _rehearsing(mod, monkeypatch)
    got = _fwd_bwd(fn, q, k, v, dout)
    assert len(built) == 1 and built[0] == set(ran) and len(set(ran)) >= 3  # forward, dQ, dK/dV at least
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    _fwd_bwd(fn, q, k, v, dout)
    q2, k2, v2, _ = make_inputs(kernel, Shape(1, 2, 2, 216, 216, 16, 16), torch.float32, DEVICE, seed=7)
    _fwd_bwd(fn, q2, k2, v2, torch.randn_like(q2))  # the same classes of sizes (not multiples of 16, 8 bits)
    assert len(built) == 1
    with torch.no_grad():
        fn(q, k, v)  # a forward alone is another kind of call
    # one launch has nothing to build beside it; dilated's two (residues 0 and 1: one variant) are built by one thread
    assert len(built) == (2 if name == "dilated" else 1)
    assert len(mod._BUILT) == 5  # two kinds of call (keys), three calls as they came


def test_prebuild_keeps_a_block_map_clean(examples, monkeypatch):
    """The rehearsal's block-map lists are never kept: a map passed in, or one that `block_map` builds, holds
    only the lists real launches wrote. Errors the call raises still reach the caller."""
    kernel, fn = examples["document"]
    mod = sys.modules[fn.__module__]
    q, k, v, inputs = make_inputs(kernel, Shape(1, 2, 2, 150, 150, 16, 16), torch.float32, DEVICE, seed=8)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    want = _fwd_bwd(fn, q, k, v, dout, **inputs)
    built, ran = _rehearsing(mod, monkeypatch)
    bmap = fn.block_map(q, k, v, **inputs)
    assert len(built) == 1 and built[0] == set(ran)  # the map kernel and its lists
    lists = dict(bmap._lists)
    ran.clear()
    got = _fwd_bwd(fn, q, k, v, dout, **inputs, block_map=bmap)
    assert bmap._lists == lists and built[1] == set(ran)
    big = dict(BLOCK_M=64, BLOCK_N=64)  # lists the map has not made: made by the call proper, then kept
    _fwd_bwd(fn, q, k, v, dout, **inputs, block_map=bmap, config=big)
    assert set(bmap._lists) - set(lists) == {(64, 64, False), (64, 64, True)}
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"block_map sizes \(B differ\)"):
        fn(q[:0], k[:0], v[:0], inputs["doc_id"][:0], block_map=bmap)


def test_fast_launch_passes_what_tritons_launcher_passes(examples, monkeypatch):
    """_fast_launch against Triton 3.6's own path (CudaLauncher.__call__ and its descriptor wrapper, run here on a
    stand-in C launcher that records its arguments): the same arguments, except tensors as their addresses and no
    launch metadata or hooks; scratch buffers alike; a descriptor encoded once while its tensor and geometry stay
    the same; and Triton's runner when a launch hook is set."""
    from triton import knobs
    from triton.backends.nvidia import driver
    from triton.runtime import _allocation

    mod = sys.modules[examples["causal"][1].__module__]
    encoded, calls, runner, allocs = [], [], [], []

    def encode(d, meta):  # make_tensordesc_arg's stand-in: fill_tma_descriptor needs a driver
        encoded.append(d.base.data_ptr())
        return [("map", d.base.data_ptr(), meta["swizzle"]), *d.shape, *d.strides]

    monkeypatch.setattr(driver, "make_tensordesc_arg", encode)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 77, raising=False)
    token = _allocation._allocator.set(lambda size, align, stream: allocs.append((size, align, stream)) or len(allocs))
    signature = {"x": "*bf16", "d": "tensordesc<bf16[64, 64]>", "n": "i32", "y": "*fp32", "s": "fp32",
                 "BLOCK": "constexpr"}
    run = driver.CudaLauncher.__new__(driver.CudaLauncher)
    run.launch = driver.wrap_handle_tensordesc(lambda *a: calls.append(a), signature, [
        {"swizzle": 3, "elem_size": 2, "elem_type": "bf16", "block_size": [64, 64], "fp4_padded": False}])
    run.num_ctas, run.launch_cooperative_grid, run.launch_pdl = 1, False, False
    run.global_scratch_size, run.global_scratch_align, run.profile_scratch_size, run.profile_scratch_align = 8, 16, 0, 1

    class Compiled:  # a CompiledKernel's parts that the launch reads
        function, packed_metadata, src = 5, (4, 1, 0), SimpleNamespace(signature=signature)

        def __init__(self):
            self.run = run

        def __getitem__(self, grid):
            return lambda *a: runner.append((grid, a))

    def desc(t):
        return SimpleNamespace(base=t, shape=[64, 64], strides=[64, 1], padding="zero")

    x, y = torch.randn(64, 64).bfloat16(), torch.randn(8)
    args = (x, desc(x), 7, y, 0.5, 64)
    try:
        driver.CudaLauncher.__call__(run, 3, 2, 1, 77, 5, (4, 1, 0), None, None, None, *args)
        fast = mod._fast_launch(Compiled(), (3, 2, 1), 0)
        fast(*args)
        assert len(calls) == 2 and allocs == [(3 * 2 * 8, 16, 77)] * 2
        want, got = list(calls[0]), list(calls[1])
        assert (want[7], got[7]) == (1, 2)  # each launch its own scratch buffer
        want[7] = got[7] = None
        want[13], want[20] = x.data_ptr(), y.data_ptr()  # Triton's launcher reads the addresses itself
        assert got == want
        fast(*args)  # the same descriptor: encoded once
        assert encoded == [x.data_ptr(), x.data_ptr()]  # Triton's path, then the first fast launch
        x2 = torch.randn(64, 64).bfloat16()
        fast(x2, desc(x2), 7, y, 0.5, 64)
        assert encoded[-1] == x2.data_ptr() and calls[-1][14][1] == x2.data_ptr()
        knobs.runtime.launch_enter_hook.add(print)
        try:
            fast(*args)
        finally:
            knobs.runtime.launch_enter_hook.remove(print)
        assert runner == [((3, 2, 1), args)] and len(calls) == 4
    finally:
        _allocation._allocator.reset(token)


PLANNED = ["causal", "sliding_window", "document", "dilated", "alibi", "relative_bias", "softcap"]
# calls that differ in what a pass's launch decisions or its launches' specialization read
PLAN_CASES = [{}, {"offset": 1}, {"dtype": torch.float16, "strided": True}, {"config": {"fwd": {"num_warps": 8}}},
              {"shape": Shape(1, 4, 2, 80, 112, 128, 128)}, {"dtype": torch.float32, "config": {"BLOCK_M": 32}},
              {"learn": True}, {"broadcast_dout": True}, {"long": True, "window": 2048}, {"long": True, "window": 64},
              {"scale": -0.125}, {"learn": True, "deterministic": True}, {"lse": True}, {"input_offset": 1},
              {"long": True, "one_doc": True}, {}]


def _host_sees(mod, monkeypatch, major: int) -> None:
    """The generated module's host code as on a GPU of compute capability `major` (0: none) with 132 SMs."""
    monkeypatch.setattr(mod, "_major", lambda t: major)
    monkeypatch.setattr(mod, "_sms", lambda d: 132)
    monkeypatch.setattr(mod, "_builds_ahead", lambda q: False)
    monkeypatch.setattr(mod, "_ensure_allocator", lambda: None)


def _plan_calls(kernel, fn, rounds: int = 2):
    """PLAN_CASES' forward+backward calls, `rounds` times in turn; yields after each call."""
    base, long = Shape(1, 4, 2, 96, 96, 64, 64), Shape(1, 2, 1, 4096, 4096, 64, 64)  # launches are stubbed
    for _ in range(rounds):
        for i, case in enumerate(PLAN_CASES):
            shape = long if case.get("long") else case.get("shape", base)
            q, k, v, inputs = make_inputs(kernel, shape, case.get("dtype", torch.bfloat16), DEVICE, seed=i)
            if case.get("offset"):  # an address off the 16-byte grid: no descriptors
                q = torch.cat([q.new_zeros(1), q.flatten()])[1:].view(q.shape)
            if case.get("input_offset"):  # the spec's input tensors off the 16-byte grid
                inputs = {n: torch.cat([t.new_zeros(1), t.flatten()])[1:].view(t.shape) for n, t in inputs.items()}
            if case.get("one_doc"):  # integer inputs all 0 (one document): other block-map lists (their sizes must
                # follow from the shapes alone, as the plans' slots assume)
                inputs = {n: t if t.is_floating_point() else torch.zeros_like(t) for n, t in inputs.items()}
            if case.get("strided"):  # other strides: [B, S, H, D] underneath
                q = q.transpose(1, 2).contiguous().transpose(1, 2)
            params = params_for(kernel, shape)
            if "window" in params and "window" in case:  # long bands run other kernels on Hopper
                params["window"] = case["window"]
            learn = [x for x in inputs.values() if x.is_floating_point()] if case.get("learn") else []
            leaves = [t.requires_grad_() for t in (q, k, v, *learn)]
            o = fn(*leaves[:3], **inputs, **params, config=case.get("config"), scale=case.get("scale"),
                   return_lse=bool(case.get("lse")), deterministic=bool(case.get("deterministic")))
            o, lse = o if case.get("lse") else (o, None)
            dout = torch.ones(1, dtype=o.dtype).expand_as(o) if case.get("broadcast_dout") else torch.ones_like(o)
            torch.autograd.backward([o, lse] if lse is not None else [o],
                                    [dout, torch.ones_like(lse)] if lse is not None else [dout])
            yield


@pytest.mark.parametrize("name", PLANNED)
@pytest.mark.parametrize("major", [0, 9])
def test_remembered_plans_decide_as_afresh(examples, monkeypatch, name, major):
    """_plan remembers a pass's launch decisions per call signature. Calls that differ in what the decisions read
    (dtype, strides, 16-byte alignment, lengths, params, config, head dims; on Hopper (major 9, as seen by the host)
    the Gluon rules too), run in an interleaved order with plans, launch exactly what they launch decided afresh:
    the same kernels, grids, keywords and arguments (tensors by shape, strides and dtype)."""
    kernel, fn = examples[name]
    mod = sys.modules[fn.__module__]
    _host_sees(mod, monkeypatch, major)
    launches: list = []

    def record(k, grid, *args, _slots=None, **kw):
        meta = tuple((tuple(a.shape), a.stride(), a.dtype) if isinstance(a, torch.Tensor) else
                     (type(a).__name__, getattr(a, "block_shape", a)) for a in args)
        launches.append((getattr(k, "__name__", k), grid, meta, sorted(kw.items())))

    monkeypatch.setattr(mod, "_launch", record)

    def run(plans: bool) -> list:
        mod._PLANS.clear()
        if not plans:
            monkeypatch.setattr(mod, "_plan", lambda key, decide, *a: (decide(*a), None))
        out = []
        for _ in _plan_calls(kernel, fn):
            out.append(list(launches))
            launches.clear()
        return out

    remembered = run(plans=True)
    assert len(mod._PLANS) >= 6 and all(remembered)
    assert remembered == run(plans=False)


class _StubJit:
    """A generated kernel whose launches run nothing (kernel[grid](...) gives a stand-in compiled variant)."""

    def __init__(self, real, name: str):
        self.params, self.__name__ = getattr(real, "params", ()), name  # (the interpreter's have no params)

    def __getitem__(self, grid):
        return lambda *args, **kw: object()


@pytest.mark.parametrize("name", PLANNED)
def test_plan_slots_launch_what_signatures_pick(examples, monkeypatch, name):
    """A remembered plan keeps each launch's compiled variant (its slots), and later calls under the plan launch it
    without _signature. Every such launch must be one whose _signature equals that of the launch the variant was
    made for: the plan's key fixes everything Triton specializes on (PLAN_CASES vary it). Launches are stubbed: the
    direct launch entries carry the signature they were made for."""
    kernel, fn = examples[name]
    mod = sys.modules[fn.__module__]
    _host_sees(mod, monkeypatch, 9)
    stubs = [attr for attr, val in vars(mod).items() if attr.startswith(name + "_") and hasattr(val, "run")]
    assert len(stubs) >= 3
    for attr in stubs:
        monkeypatch.setattr(mod, attr, _StubJit(getattr(mod, attr), attr))
    real_launch, real_sig, current, counts = mod._launch, mod._signature, [], {"sig": 0, "slot": 0}
    missed: list = []  # second round: planned launches that needed _signature

    def unfloat(sig: tuple) -> tuple:  # Triton does not specialize on floats' values (sm_scale may change)
        return tuple((float,) if type(x) is tuple and x and x[0] is float else x for x in sig)

    def launch(k, grid, *args, **kw):
        current.append((k, grid, args, {n: x for n, x in kw.items() if n != "_slots"}))
        before = counts["sig"]
        real_launch(k, grid, *args, **kw)
        if kw.get("_slots") is not None and counts["sig"] > before:
            missed.append(k.__name__)

    def signature(*a):
        counts["sig"] += 1
        return real_sig(*a)

    def launched(fast, args) -> bool:
        if fast is None:
            return False
        k, grid, a, kw = current[-1]
        assert len(a) == len(args) and all(x is y for x, y in zip(a, args))  # the launch in progress
        assert unfloat(fast[1]) == unfloat(real_sig(k, grid, a, kw)), f"{k.__name__}: a slot launched another variant"
        counts["slot"] += 1
        return True

    monkeypatch.setattr(mod, "_launch", launch)
    monkeypatch.setattr(mod, "_signature", signature)
    monkeypatch.setattr(mod, "_direct", lambda k, grid, args, kw, compiled: ("variant", real_sig(k, grid, args, kw)))
    monkeypatch.setattr(mod, "_launched_direct", launched)
    monkeypatch.setattr(mod, "_LAUNCHED", {})
    mod._PLANS.clear()
    calls = _plan_calls(kernel, fn)
    for _ in PLAN_CASES:  # the first round makes the plans and fills their slots
        next(calls)
    missed.clear()
    slots = counts["slot"]
    for _ in calls:
        pass
    assert not missed and counts["slot"] > slots + len(PLAN_CASES)
