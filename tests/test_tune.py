"""attngen.tune: the search keeps the fastest configuration that computes what the default computes,
and caches it. Timings are faked (the interpreter's speed means nothing); the kernels really run."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

import attngen
from attngen import autotune as tune_mod


def _inputs(seed: int, S: int = 40, doc: bool = False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, S, 16, generator=g).to(DEVICE) for _ in range(3))
    ids = torch.sort(torch.randint(0, 3, (1, S), generator=g), dim=-1).values.int().to(DEVICE)
    return (q, k, v, ids) if doc else (q, k, v)


CANDIDATES = {"fwd": [(16, 16, 4, 1), (32, 16, 4, 1)], "dkdv": [(16, 16, 4, 1), (16, 32, 4, 1)],
              "dq": [(32, 16, 4, 1)]}


def _timed(fn, timer_log: list):
    """Wrap fn so that the fake timer sees the config each call uses (as do_bench would see its speed)."""
    def call(*a, config=None, **kw):
        timer_log.append(config)
        return fn(*a, config=config, **kw)
    call.__module__, call.__name__, call.block_map = fn.__module__, fn.__name__, fn.block_map
    return call


@pytest.mark.parametrize("name, doc", [("causal", False), ("document", True)])
def test_tune_picks_the_fastest_and_caches(examples, name, doc, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNGEN_CACHE_DIR", str(tmp_path))
    fn = examples[name][1]
    log: list = []
    wrapped = _timed(fn, log)

    def timer(f):  # the last config that ran is the one being timed; prefer the candidates' second entries
        f()
        cfg = log[-1]
        return sum({(16, 16): 3.0, (32, 16): 1.0, (16, 32): 1.0}.get(
            (cfg[k]["BLOCK_M"], cfg[k]["BLOCK_N"]), 2.0) for k in ("fwd", "dkdv", "dq") if k in cfg)

    args = _inputs(0, doc=doc)
    qg = [a.requires_grad_() if i < 3 else a for i, a in enumerate(args)]
    cfg = attngen.tune(wrapped, *qg, candidates=CANDIDATES, timer=timer)
    assert (cfg["fwd"]["BLOCK_M"], cfg["fwd"]["BLOCK_N"]) == (32, 16)
    assert (cfg["dkdv"]["BLOCK_M"], cfg["dkdv"]["BLOCK_N"]) == (16, 32)
    assert (cfg["dq"]["BLOCK_M"], cfg["dq"]["BLOCK_N"]) == (32, 16)
    # the tuned config runs and computes what the default computes
    bmap = {"block_map": fn.block_map(*args, config=cfg)} if doc else {}
    out = fn(*args, config=cfg, **bmap)
    torch.testing.assert_close(out, fn(*args), atol=1e-5, rtol=1e-4)
    # second call: from the cache, nothing runs
    calls = len(log)
    assert attngen.tune(wrapped, *qg, candidates=CANDIDATES, timer=timer) == cfg
    assert len(log) == calls
    # another shape is another entry
    other = [a.requires_grad_() if i < 3 else a for i, a in enumerate(_inputs(1, S=24, doc=doc))]
    attngen.tune(wrapped, *other, candidates=CANDIDATES, timer=timer)
    assert len(log) > calls


def test_tune_rejects_a_config_that_computes_something_else(examples, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNGEN_CACHE_DIR", str(tmp_path))
    fn = examples["causal"][1]
    log: list = []

    def wrong_when_short(*a, config=None, **kw):  # a planted bug in one tiling, which also "runs fastest"
        log.append(config)
        out = fn(*a, config=config, **kw)
        return out * 1.5 if config["fwd"]["BLOCK_M"] == 16 else out

    wrong_when_short.__module__, wrong_when_short.block_map = fn.__module__, fn.block_map

    def timer(f):
        f()
        tile = (log[-1]["fwd"]["BLOCK_M"], log[-1]["fwd"]["BLOCK_N"])
        return {(16, 32): 0.5, (32, 16): 1.0}.get(tile, 2.0)  # the wrong tiling would win on speed

    cfg = attngen.tune(wrong_when_short, *_inputs(2), candidates={"fwd": [(16, 32, 4, 1), (32, 16, 4, 1)]},
                       timer=timer, cache=False)
    assert (cfg["fwd"]["BLOCK_M"], cfg["fwd"]["BLOCK_N"]) == (32, 16)


def test_tune_keeps_the_callers_overrides(examples):
    fn = examples["causal"][1]
    cfg = attngen.tune(fn, *_inputs(5), config={"I64": True, "fwd": {"FAST_MATH": False, "BLOCK_N": 16}},
                       candidates={"fwd": [(16, 16, 4, 1)]}, timer=lambda f: (f(), 1.0)[1], cache=False)
    assert cfg["I64"] is True and cfg["fwd"]["FAST_MATH"] is False and set(cfg) == {"I64", "fwd", "dkdv", "dq"}


def test_tune_errors(examples, build_dir):
    q, k, v = _inputs(3)
    with pytest.raises(ValueError, match="positionally"):
        attngen.tune(examples["causal"][1], q, k=k, v=v, timer=lambda f: 1.0)
    with pytest.raises(ValueError, match="not a generated attention function"):
        attngen.tune(torch.nn.functional.scaled_dot_product_attention, q, k, v)
    if DEVICE.type != "cuda":
        with pytest.raises(ValueError, match="timing needs a CUDA device"):
            attngen.tune(examples["causal"][1], q, k, v)


def test_candidate_lists_hold_the_generated_defaults():
    """The built-in search spaces include the swept H100 defaults (so tuning never starts behind them)."""
    assert (128, 64, 8, 3) in tune_mod.FWD and (64, 64, 4, 2) in tune_mod.FWD
    assert (64, 128, 8, 4) in tune_mod.DKDV and (64, 64, 4, 2) in tune_mod.DKDV
    assert (128, 64, 8, 3) in tune_mod.DQ and (64, 64, 4, 2) in tune_mod.DQ


@pytest.mark.parametrize("challenger, first_ms, later_ms, wins", [
    ("lucky once", 0.5, 1.5, False),    # fast in the first pass only: the interleaved re-timing finds out
    ("within margin", 0.995, 0.995, False),  # 0.5% is noise: the default stays
    ("clearly faster", 0.8, 0.8, True),
])
def test_tune_retimes_finalists_and_keeps_the_default_unless_clearly_beaten(
        examples, challenger, first_ms, later_ms, wins):
    fn = examples["causal"][1]
    log: list = []

    def logged(*a, config=None, **kw):
        log.append(config)
        return fn(*a, config=config, **kw)

    logged.__module__, logged.block_map = fn.__module__, fn.block_map
    seen: dict = {}

    def timer(f):
        f()
        tile = log[-1]["fwd"]["BLOCK_M"]
        seen[tile] = seen.get(tile, 0) + 1
        if tile != 16:
            return 1.0  # the default (32 x 32 on the interpreter)
        return first_ms if seen[tile] == 1 else later_ms

    cfg = attngen.tune(logged, *_inputs(4), candidates={"fwd": [(16, 32, 4, 1)]}, timer=timer, cache=False)
    assert (cfg["fwd"]["BLOCK_M"] == 16) == wins
