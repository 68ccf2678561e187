"""`attngen compile`, `attngen.load` and its cache, and the installed wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from conftest import DEVICE, ROOT

import attngen


def _run(*args, cwd=ROOT, **kw):
    return subprocess.run([sys.executable, "-m", "attngen.cli", *args], capture_output=True, text=True,
                          cwd=cwd, **kw)


def test_compile_then_import(tmp_path):
    r = _run("compile", str(ROOT / "examples/gemma_local.attn"), "-o", str(tmp_path / "build"))
    assert r.returncode == 0, r.stderr
    assert {p.name for p in (tmp_path / "build").iterdir()} == {"gemma_local.py", "gemma_global.py"}
    from attngen.runtime import import_path

    fn = import_path(tmp_path / "build/gemma_local.py").gemma_local
    q = torch.randn(1, 16, 20, 16, device=DEVICE)
    k = torch.randn(1, 8, 20, 16, device=DEVICE)
    out = fn(q, k, k, window=5)
    ref = attngen.interpret(f"{ROOT}/examples/gemma_local.attn:gemma_local", q.double(), k.double(),
                            k.double(), window=5)
    assert (out.double() - ref).abs().max() < 1e-5


def test_emit_ir():
    r = _run("compile", str(ROOT / "examples/sink_window.attn"), "--emit", "ir")
    assert r.returncode == 0, r.stderr
    assert "kernel sink_window" in r.stdout and "segment 1:" in r.stdout and "logit" in r.stdout
    assert "split logit" not in r.stdout
    r = _run("compile", str(ROOT / "examples/alibi.attn"), "--emit", "ir")
    assert "split logit: c = mul(1.4426950408889634, sm_scale), key = mul(mul(1.4426950408889634, slopes[h]), " \
           "sub(kv_idx, kv0))" in r.stdout


def test_load_uses_a_versioned_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNGEN_CACHE_DIR", str(tmp_path / "cache"))
    spec = tmp_path / "c.attn"
    spec.write_text("attention c { mask q_idx >= kv_idx }\n")
    fn = attngen.load(str(spec))
    files = list((tmp_path / "cache" / attngen.__version__).glob("*.py"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    assert attngen.load(str(spec)).__name__ == fn.__name__
    assert files[0].stat().st_mtime_ns == stamp  # reused, not rewritten
    spec.write_text("attention c { mask q_idx > kv_idx }\n")
    attngen.load(str(spec))
    assert len(list((tmp_path / "cache" / attngen.__version__).glob("*.py"))) == 2


def test_cache_of_another_version_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNGEN_CACHE_DIR", str(tmp_path / "cache"))
    spec = tmp_path / "c.attn"
    spec.write_text("attention cv { mask q_idx >= kv_idx }\n")
    attngen.load(str(spec))
    (mine,) = (tmp_path / "cache" / attngen.__version__).glob("*.py")
    other = tmp_path / "cache" / "0.0.0-old" / mine.name
    other.parent.mkdir()
    other.write_text("raise RuntimeError('stale cache used')\n")
    mine.unlink()
    assert attngen.load(str(spec)).__name__ == "cv"  # recompiled into its own version's folder
    assert (tmp_path / "cache" / attngen.__version__ / mine.name).exists()


def test_load_falls_back_when_cache_is_read_only(tmp_path, monkeypatch, capfd):
    if os.geteuid() == 0:
        target = tmp_path / "file"  # root ignores permissions: make the cache path a file instead
        target.write_text("")
        monkeypatch.setenv("ATTNGEN_CACHE_DIR", str(target / "sub"))
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        monkeypatch.setenv("ATTNGEN_CACHE_DIR", str(ro))
    spec = tmp_path / "c.attn"
    spec.write_text("attention c2 { mask q_idx >= kv_idx }\n")
    assert attngen.load(str(spec)).__name__ == "c2"
    assert "not writable" in capfd.readouterr().err


@pytest.mark.slow
def test_wheel_installs_grammar_and_templates(tmp_path):
    """`pip install .` (not editable) into a fresh venv, then compile from another folder."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    # dependencies come from this environment (no network, no torch download); attngen does not
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = [str(venv / "bin/python"), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
           str(ROOT)]
    r = subprocess.run(pip, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    r = subprocess.run([str(venv / "bin/attngen"), "compile", str(ROOT / "examples/causal.attn"), "-o", "out"],
                       capture_output=True, text=True, cwd=work, env=env)
    assert r.returncode == 0, r.stderr
    assert (work / "out/causal.py").exists()
    where = subprocess.run([str(venv / "bin/python"), "-c", "import attngen.resources as r; "
                            "print(r.resource_dir('grammar'), r.resource_dir('templates'))"],
                           capture_output=True, text=True, cwd=work, env=env).stdout
    assert str(site) in where and str(ROOT) not in where, where
    assert Path(where.split()[0], "attn.lark").exists()


def test_training_example_loss_goes_down():
    r = subprocess.run([sys.executable, str(ROOT / "examples/train_relative_bias.py")], capture_output=True,
                       text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "step 19" in r.stdout


def test_concurrent_loads_never_see_a_partial_file(tmp_path):
    """Several processes compile and load the same spec at once into one cache."""
    spec = tmp_path / "c.attn"
    spec.write_text("attention cc { param w: int = 3\n mask q_idx - kv_idx < w and kv_idx <= q_idx }\n")
    code = (f"import attngen, torch; f = attngen.load({str(spec)!r}); q = torch.randn(1, 1, 8, 16); "
            "print(f(q, q, q).shape == q.shape)")
    env = {**os.environ, "ATTNGEN_CACHE_DIR": str(tmp_path / "cache"), "TRITON_INTERPRET": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(6)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and out.strip() == "True", err[-2000:]
    files = list((tmp_path / "cache").rglob("*"))
    assert [f.name for f in files if f.suffix == ".tmp"] == []  # no leftovers
    assert len([f for f in files if f.suffix == ".py"]) == 1


def test_cache_key_follows_the_compiler_sources(tmp_path, monkeypatch):
    """An edited template or compiler module must not reuse modules compiled before the edit."""
    from attngen import runtime

    monkeypatch.setenv("ATTNGEN_CACHE_DIR", str(tmp_path / "cache"))
    spec = tmp_path / "c.attn"
    spec.write_text("attention ck { mask q_idx >= kv_idx }\n")
    attngen.load(str(spec))
    monkeypatch.setattr(runtime, "toolchain_hash", lambda: "edited")
    attngen.load(str(spec))
    assert len(list((tmp_path / "cache" / attngen.__version__).glob("*.py"))) == 2


def test_parser_tables_cache_survives_damage(tmp_path, monkeypatch):
    from attngen import parse

    monkeypatch.setenv("ATTNGEN_CACHE_DIR", str(tmp_path / "cache"))
    build = parse._parser.__wrapped__
    build()
    (saved,) = (tmp_path / "cache" / attngen.__version__ / "parser").glob("attn-*.lark")
    assert build().parse("attention a { mask q_idx >= kv_idx }\n")  # loaded from the file
    saved.write_bytes(b"not a parser")
    assert build().parse("attention a { mask q_idx >= kv_idx }\n")  # rebuilt
    assert saved.read_bytes() != b"not a parser"


def test_tune_command(tmp_path, monkeypatch, capsys):
    """`attngen tune`: random inputs of the given shape, the spec's param defaults (or --param), the
    config printed as JSON; bad arguments exit 2 with a message."""
    import json

    from attngen import autotune, cli

    monkeypatch.setenv("ATTNGEN_CACHE_DIR", str(tmp_path))
    seen = {}

    def fake_tune(fn, *args, backward=None, verbose=False, **kw):
        seen.update(fn=fn.__name__, shapes=[tuple(a.shape) for a in args], backward=backward, kw=kw,
                    grad=args[0].requires_grad)
        return {"fwd": {"BLOCK_M": 64}}

    monkeypatch.setattr(autotune, "tune", fake_tune)
    spec = str(ROOT / "examples/sliding_window.attn")
    assert cli.main(["tune", spec, "--shape", "2,4,2,96,32"]) == 0
    assert json.loads(capsys.readouterr().out) == {"fwd": {"BLOCK_M": 64}}
    assert seen == dict(fn="sliding_window", shapes=[(2, 4, 96, 32), (2, 2, 96, 32), (2, 2, 96, 32)],
                        backward=True, kw={"window": 256}, grad=True)
    assert cli.main(["tune", spec, "--shape", "1,2,2,64,16", "--param", "window=8", "--fwd-only"]) == 0
    assert seen["kw"] == {"window": 8} and seen["backward"] is False and not seen["grad"]
    capsys.readouterr()
    for argv, msg in ((["--shape", "1,2,64"], "expected B,H,H_KV,S,D"),
                      (["--shape", "1,2,2,64,16", "--param", "width=3"], "NAME one of ['window']"),
                      (["--shape", "1,2,2,64,16", "--name", "nope"], "no spec named 'nope'")):
        assert cli.main(["tune", spec, *argv]) == 2
        assert msg in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU message")
def test_tune_command_needs_a_gpu():
    r = _run("tune", str(ROOT / "examples/causal.attn"), "--shape", "1,2,2,64,16")
    assert r.returncode == 2 and "timing needs a CUDA device" in r.stderr, r.stderr
