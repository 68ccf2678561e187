"""benchmarks/bench.py in its smoke mode (tiny shapes; the Triton interpreter without a GPU): every row's
spec compiles, passes its check and lands in the results; a wrong kernel or spec fails the run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("attngen_bench_script", ROOT / "benchmarks" / "bench.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _result(out: Path) -> dict:
    (path,) = out.glob("*.json")
    return json.loads(path.read_text())


def test_smoke_every_row(bench, tmp_path):
    assert bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    data = _result(tmp_path)
    assert [r["name"] for r in data["rows"]] == [r.name for r in bench.ROWS]
    for r in data["rows"]:
        assert r["ok"], (r["name"], r.get("why"), r.get("error"))
        assert set(r["errors"]) == {"out", "dq", "dk", "dv"}, r["name"]
        assert r["attngen_fwd_ms"] > 0 and r["attngen_fb_ms"] > 0 and r["flex_fwd_ms"] > 0, r["name"]
        assert 0 < r["density"] <= 1
        # the interpreter runs the Triton kernels (the Gluon ones need a Hopper GPU)
        assert {"fwd_kernel", "bwd_dq_kernel", "bwd_dkdv_kernel"} <= set(r["kernels"]), r["name"]
    dens = {r["name"]: r["density"] for r in data["rows"]}
    assert dens["full"] == 1.0 and dens["causal"] == (64 * 65 / 2) / 64**2  # exact element counts
    assert data["info"]["smoke"] and data["ok"]
    md = next(tmp_path.glob("*.md")).read_text()
    assert all(r.title in md for r in bench.ROWS)


def test_wrong_output_fails(bench, tmp_path, monkeypatch):
    """A kernel whose output is 1% off fails its check (and the run exits 1), though its timings are kept."""
    load = bench.load_spec

    def perturbed(row, env):
        kernel, fn, s = load(row, env)
        return kernel, lambda *a, **kw: fn(*a, **kw) * 1.01, s

    monkeypatch.setattr(bench, "load_spec", perturbed)
    assert bench.main(["--smoke", "--only", "causal", "--out", str(tmp_path)]) == 1
    (row,) = _result(tmp_path)["rows"]
    assert not row["ok"] and "out: error" in row["why"] and "dq: error" in row["why"]
    assert row["attngen_fwd_ms"] > 0


def test_spec_disagreeing_with_mask_fails(bench, tmp_path, monkeypatch):
    """A spec that is not the row's mask (causal.attn against a sliding window) fails the run."""
    wrong = bench.AttnRow("wrong", "causal spec, window mask", "examples/causal.attn",
                          lambda c: lambda b, h, q, kv: (q >= kv) & (q - kv < 16))
    monkeypatch.setattr(bench, "ROWS", [wrong])
    assert bench.main(["--smoke", "--skip-bwd", "--out", str(tmp_path)]) == 1
    (row,) = _result(tmp_path)["rows"]
    assert not row["ok"] and set(row["errors"]) == {"out"}


def test_block_map_is_built_and_passed(bench, tmp_path, monkeypatch):
    """When the generated function has `block_map`, its setup is timed and the map reaches every call."""
    load = bench.load_spec
    token, seen = object(), []

    def with_map(row, env):
        kernel, fn, s = load(row, env)

        def attn(q, k, v, *inputs, block_map=None, **params):
            seen.append(block_map)
            return fn(q, k, v, *inputs, **params)

        attn.block_map = lambda q, k, v, *inputs, **params: token
        return kernel, attn, s

    monkeypatch.setattr(bench, "load_spec", with_map)
    assert bench.main(["--smoke", "--skip-bwd", "--only", "document", "--out", str(tmp_path)]) == 0
    (row,) = _result(tmp_path)["rows"]
    assert row["tensor_mask"] and row["setup_attngen_ms"] is not None and row["setup_attngen_ms"] >= 0
    assert seen and all(m is token for m in seen)


def test_resource_report_builds_what_the_host_launches(examples):
    """benchmarks/resources.py builds each row's kernels at the H100's launch tiles: the Gluon ones where the module
    has them (softcap's dK/dV at 64 queries per step, like causal's), the Triton defaults for banded and block-map
    masks, but the Gluon dK/dV for a long band."""
    spec = importlib.util.spec_from_file_location("attngen_resources_script", ROOT / "benchmarks" / "resources.py")
    res = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(res)

    def launched(name):
        mod = sys.modules[examples[name][1].__module__]
        return [(k, kw["block_m"], kw["block_n"], kw["num_warps"], kw.get("num_stages"), kw["block_map"],
                 kw.get("constexprs"), kw.get("maxnreg")) for k, kw in res.launches(mod)]
    gluon = [("fwd_sm90", 128, 128, 4, None, False, None, None), ("dq_sm90", 128, 64, 4, None, False, None, None)]
    dkdv90 = ("dkdv_sm90", 64, 128, 4, None, False, None, None)
    assert launched("causal") == gluon + [dkdv90]
    assert launched("softcap") == gluon + [dkdv90]
    assert launched("alibi") == gluon + [dkdv90]  # its logit split
    # banded forwards: TMA loads, one stage, 128 registers (occupancy first)
    assert launched("sliding_window") == [("fwd", 64, 64, 4, 1, False, {"TMA": True}, 128),
                                          ("dq", 64, 64, 4, 2, False, None, None),
                                          ("dkdv", 64, 64, 4, 2, False, None, None)]
    # a window of 1024 at S=8192: the Gluon forward and dQ (_long_rows) and dK/dV (_long_band)
    long = sys.modules[examples["sliding_window"][1].__module__]
    assert [k for k, _ in res.launches(long, {"window": 1024})] == ["fwd_sm90", "dq_sm90", "dkdv_sm90"]
    assert launched("document") == [("fwd", 64, 64, 4, 1, True, {"TMA": True}, 128),
                                    ("dq", 64, 64, 4, 2, True, None, None), ("dkdv", 64, 64, 4, 2, True, None, None)]


def test_shape_option_is_checked(bench, capsys):
    """--shape B,H,S,D: four positive integers with a power-of-two head dim, and not with --smoke; a bad one is
    refused with a message that names it."""
    assert bench.parse_shape("8,16,2048,64") == (8, 16, 2048, 64)
    for bad, says in (("8,16,x,64", "four integers"), ("8,16,2048", "four integers"), ("8,16,2048,48", "power of two"),
                      ("0,16,2048,64", "positive")):
        with pytest.raises(SystemExit):
            bench.main(["--shape", bad])
        assert says in capsys.readouterr().err, bad
    with pytest.raises(SystemExit):
        bench.main(["--smoke", "--shape", "8,16,2048,64"])
    assert "choose one" in capsys.readouterr().err
    # the titles name the S=8192 params: at another S they say which params moved
    rows = {r.name: r for r in bench.ROWS}
    assert bench.title_at(rows["sliding_window"], 2048) == "causal sliding window 1024 (here window=256)"
    assert bench.title_at(rows["sliding_window"], 8192) == "causal sliding window 1024"
    assert bench.title_at(rows["causal"], 2048) == rows["causal"].title


def test_call_overhead_script_runs(capsys):
    """benchmarks/call_overhead.py (host time per call, launches stubbed) runs on the CPU and reports each spec."""
    spec = importlib.util.spec_from_file_location("attngen_call_overhead", ROOT / "benchmarks" / "call_overhead.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--specs", "causal,document", "--calls", "2"])
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| causal")
            or line.startswith("| document")]
    assert len(rows) == 2 and all(float(r[2]) > 0 and float(r[3]) > float(r[2]) for r in rows)
