"""Spec errors: each bad spec gives a positioned message (file:line:col, the line, a caret)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import EXAMPLES, ROOT

from attngen import AttnError
from attngen.lower import lower
from attngen.parse import parse

# (spec, expected message fragment, line, col)
BAD = [
    ("attention x { mask q_idx >= $ }", "unexpected character '$'", 1, 29),
    ("attention x { foo 1 }", "unexpected 'foo'", 1, 15),
    ("attention x {\n  mask q_idx >=\n", "unexpected end of file", 2, 16),
    ("attention x { score (score }", "unexpected '}'", 1, 28),
    ("attention x { mask q_idx = kv_idx }", "clashes with a builtin", 1, 15),
    ("attention x { mask q_idx >= kv_id }", "unknown name 'kv_id'", 1, 29),
    ("attention x { mask q_idx + 1 }", "mask must be a predicate, got int", 1, 20),
    ("attention x { score score > 1 }", "score must be a number", 1, 21),
    ("attention x { mask score > 0 }", "'score' is only available in the score clause", 1, 20),
    ("attention x {\n input t: float32[h]\n mask t[h] > 0 and t[1.5] > 0 }", "a float used as an index", 3, 22),
    ("attention x { param f: float = 1.0\n mask (q_idx > 1) == f }", "a bool compared to a float", 2, 8),
    ("attention x { mask q_idx // 0 == 1 }", "division by zero", 1, 29),
    ("attention x { mask q_idx % 2.0 == 1 }", "'%' needs int operands, got float", 1, 28),
    ("attention x { param w: int = 1.5 }", "w is int, its default 1.5 is not", 1, 30),
    ("attention x { param w: intt = 1 }", "unknown type 'intt'", 1, 15),
    ("attention x { input t: float33[h] }", "unknown dtype 'float33'", 1, 15),
    ("attention x { input t: int32[b, n] }", "unknown name 'n' in an input shape", 1, 33),
    ("attention x { input t: int32[b] \n mask t[b, q_idx] > 0 }", "has 1 dimension(s), indexed with 2", 2, 7),
    ("attention x { mask t[q_idx] > 0 }", "'t' is not an input tensor", 1, 20),
    ("attention x { heads q = 6, kv = 4 }", "6 query heads cannot share 4 kv heads", 1, 15),
    ("attention x { heads q = 8, kv = 0 }", "head count must be positive", 1, 28),
    ("attention x { heads q = 8, v = 1 }", "unknown or repeated head count 'v'", 1, 28),
    ("attention x { layout bsdh }", "unknown layout 'bsdh'", 1, 15),
    ("attention x { param w: int = 1\n param w: int = 2 }", "'w' is defined twice", 2, 2),
    ("attention x { mask q_idx > 0\n mask kv_idx > 0 }", "mask given twice", 2, 2),
    ("attention x { let a = b2 + 1\n let b2 = a + 1\n mask a > 0 }", "refers to itself", 2, 11),
    ("attention x { mask foo(q_idx) }", "unknown function 'foo'", 1, 20),
    ("attention x { mask min(q_idx) > 0 }", "min() takes at least 2 arguments", 1, 20),
    ("attention x { mask exp(q_idx, 1) > 0 }", "exp() takes 1 argument, got 2", 1, 20),
    ("attention x { mask q_idx > 0 and 1 }", "'and' needs predicates, got int", 1, 34),
    ("attention x { mask not q_idx }", "'not' needs a predicate", 1, 24),
    ("attention x { mask (q_idx if q_idx > 1 else true) }", "branches mix a bool and a number", 1, 21),
    ("attention x { scale kv_idx }", "scale may only use params and constants", 1, 21),
    ("attention __init__ { }", "name '__init__' is not allowed", 1, 1),
    ("attention import { }", "attention name 'import' is not allowed", 1, 1),
    ("attention x { param class: int = 1 }", "name 'class' is not allowed", 1, 15),
    ("attention x { param scale: float = 1.0 }", "clashes with a builtin or generated name", 1, 15),
    ("attention x { }\nattention x { }", "'x' is defined twice", 2, 1),
    ("# nothing here\n", "no 'attention NAME { ... }' spec", 1, 1),
    ("attention x { input t: float32[h, 2.5] }", "a shape dimension must be an int", 1, 35),
    ("attention x { input t: float32[h, q_idx] }", "unknown name 'q_idx' in an input shape", 1, 35),
    ("attention x { input t: int32[h]\n mask t > 0 }", "input 't' is a tensor; index it", 2, 7),
    ("attention x { mask q_idx = = kv_idx }", "unexpected '='", 1, 28),
    ("attention x { input t: int32[h] learnable }", "learnable input 't' must be a float tensor", 1, 15),
    ("attention x { input t: float32[kv_len] learnable\n mask t[kv_idx] > 0 }", "is read in the mask", 2, 7),
    ("attention x { sparse l: float32[h] block 64 }", "a sparse layout holds bool or integer cells", 1, 15),
    ("attention x { sparse l: bool[q_len] block 64 }", "leading dims are b and/or h", 1, 30),
    ("attention x { sparse l: bool[h, b] block 64 }", "leading dims are b and/or h", 1, 33),
    ("attention x { param w: int = 64\n sparse l: bool[h] block w }", "block size must be a positive int constant",
     2, 26),
    ("attention x { sparse l: bool[] block 64, 0 }", "block size must be a positive int constant", 1, 42),
    ("attention x { input l: int32[h]\n sparse l: bool[] block 64 }", "'l' is defined twice", 2, 2),
    ("attention x { sparse l: bool[] 64 }", "unexpected '64'", 1, 32),
]


@pytest.mark.parametrize("src,msg,line,col", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_spec(src, msg, line, col):
    with pytest.raises(AttnError) as ei:
        lower(parse(src, "bad.attn"))
    e = ei.value
    assert msg in e.message, str(e)
    text = str(e)
    if line is not None:
        assert (e.span.line, e.span.col) == (line, col), text
        assert text.startswith(f"bad.attn:{line}:{col}: error: ")
        assert "^" in text.splitlines()[2]  # the caret line under the source line
    assert "Traceback" not in text


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_examples_parse(path):
    ks = lower(parse(path.read_text(), str(path)))
    assert ks and all(k.source for k in ks)


def test_cli_reports_errors_without_traceback(tmp_path):
    bad = tmp_path / "bad.attn"
    bad.write_text("attention x {\n    mask q_idx >= kv_idx and window\n}\n")
    for cmd in (["check", str(bad)], ["compile", str(bad), "-o", str(tmp_path)]):
        r = subprocess.run([sys.executable, "-m", "attngen.cli", *cmd], capture_output=True, text=True,
                           cwd=ROOT)
        assert r.returncode == 2, r.stderr
        assert f"{bad}:2:30: error: unknown name 'window'" in r.stderr
        assert "    mask q_idx >= kv_idx and window\n" in r.stderr and "^^^^^^" in r.stderr
        assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "attngen.cli", "check", str(tmp_path / "nope.attn")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr


def test_underivable_score_is_a_positioned_error(monkeypatch):
    """If sympy cannot form d score / d score, compiling says so at the score's line."""
    import sympy

    from attngen import analyze
    from attngen.codegen import compile_source

    real = sympy.diff
    monkeypatch.setattr(analyze.sp, "diff", lambda e, x: sympy.Derivative(e, x) if str(x) == "score" else real(e, x))
    with pytest.raises(AttnError) as ei:
        compile_source("attention x {\n  score tanh(score)\n}", "d.attn")
    assert "cannot differentiate the score" in ei.value.message and ei.value.span.line == 2


@pytest.mark.parametrize("src,msg,line,col", BAD, ids=[b[1][:40] for b in BAD])
def test_cli_exit_code_on_every_bad_spec(tmp_path, capsys, src, msg, line, col):
    """`attngen check` and `attngen compile` exit 2 with the positioned message, no traceback."""
    from attngen.cli import main

    bad = tmp_path / "bad.attn"
    bad.write_text(src)
    for argv in (["check", str(bad)], ["compile", str(bad), "-o", str(tmp_path / "out")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err
        if line is not None:
            assert f"{bad}:{line}:{col}: error:" in err
