"""attngen: a small language for attention variants, compiled to fused Triton kernels."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import AttnError, Span  # noqa: E402

__all__ = ["AttnError", "Span", "__version__", "compile_file", "interpret", "load", "load_kernels", "tune"]


def load_kernels(path: str, layout: str | None = None):
    """Parse and lower a spec file: {name: ir.Kernel}; `layout` overrides the specs' own."""
    from pathlib import Path

    from .lower import lower, relayout
    from .parse import parse

    return {k.name: relayout(k, layout) for k in lower(parse(Path(path).read_text(), str(path)))}


def interpret(kernel, q, k, v, **kwargs):
    """Run a spec (an ir.Kernel, or 'file.attn' / 'file.attn:name') with the eager interpreter."""
    from .interpreter import interpret as _interpret

    if isinstance(kernel, str):
        path, _, name = kernel.partition(":")
        ks = load_kernels(path)
        kernel = ks[name] if name else next(iter(ks.values()))
    return _interpret(kernel, q, k, v, **kwargs)


def load(path: str, name: str | None = None, **options):
    """Compile a spec file (cached on disk) and return its attention function."""
    from .runtime import load as _load

    return _load(path, name, **options)


def compile_file(path: str, out_dir: str, **options):
    """Write one generated module per spec in `path` into `out_dir`; returns the paths."""
    from .runtime import compile_file as _compile_file

    return _compile_file(path, out_dir, **options)


def tune(fn, *args, **kwargs):
    """The fastest launch configuration of a generated attention function for these arguments (GPU
    timing, cached on disk); pass it as `config=`. See attngen.autotune.tune."""
    from .autotune import tune as _tune

    return _tune(fn, *args, **kwargs)
