"""Shared fixtures. Without a GPU, kernels run under the Triton interpreter; the variable
must be set before triton is imported anywhere."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.attn"))
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("generated")


_compiled: dict = {}


def compile_spec(source: str, build: Path, sparse: bool = True, tag: str = "") -> dict:
    """Compile spec text; returns {name: (ir kernel, function)}."""
    from attngen.verify import compiled

    key = (source, sparse)
    if key not in _compiled:
        d = build / f"{tag or 'spec'}_{len(_compiled)}"
        d.mkdir(parents=True)
        path = d / "spec.attn"
        path.write_text(source)
        _compiled[key] = {k.name: (k, f) for k, f in compiled(path, d, sparse=sparse)}
    return _compiled[key]


@pytest.fixture(scope="session")
def examples(build_dir) -> dict:
    """Every example compiled (sparse plans): {name: (ir kernel, function)}."""
    out = {}
    for p in EXAMPLES:
        out.update(compile_spec(p.read_text(), build_dir, tag=p.stem))
    return out


@pytest.fixture(scope="session")
def examples_dense(build_dir) -> dict:
    """Every example compiled with the block-sparsity analysis switched off."""
    out = {}
    for p in EXAMPLES:
        out.update(compile_spec(p.read_text(), build_dir, sparse=False, tag=p.stem + "_dense"))
    return out


def example_names() -> list[str]:
    from attngen import load_kernels

    return [n for p in EXAMPLES for n in load_kernels(str(p))]


class StandInJit:
    """Stands in for a JIT kernel on a GPU (tests of the direct launch of compiled variants): launches the real
    (interpreted) kernel and returns a stand-in for the compiled variant (_StandInCompiled); `direct` counts the
    launches that went through that instead."""

    def __init__(self, real):
        self.real, self.direct, self.grids = real, 0, []  # grids: those of the JIT launches
        self.params = [SimpleNamespace(name=n, default=p.default)
                       for n, p in inspect.signature(real.fn).parameters.items()]

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.grids.append(grid)
            self.real[grid](*args, **kw)
            return _StandInCompiled(self)
        return launch


class _StandInCompiled:
    """Its launcher takes every argument positionally in the kernel's order (constexprs too, as Triton's
    does) and launches the real kernel by name, so a misplaced or missing argument shows."""

    packed_metadata = None

    def __init__(self, jit: StandInJit):
        self.jit = jit

    def __getitem__(self, grid):
        assert len(grid) == 3  # as Triton's launcher reads it

        def launch(*args):
            assert len(args) == len(self.jit.params)
            self.jit.direct += 1
            self.jit.real[grid](**{p.name: a for p, a in zip(self.jit.params, args)})
        return launch
