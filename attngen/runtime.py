"""Compile specs to modules on disk and import them. The cache is keyed by the spec text,
the kernel name, the options and a hash of the compiler's sources; files land by atomic rename."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from . import __version__
from .errors import AttnError


def cache_dir() -> Path:
    root = os.environ.get("ATTNGEN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "attngen")
    return Path(root) / __version__


def writable_cache(sub: str) -> Path | None:
    """cache_dir()/sub, created; None where it cannot be written (callers then skip caching)."""
    d = cache_dir() / sub
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return d if os.access(d, os.W_OK) else None


@functools.cache
def toolchain_hash() -> str:
    """Hash of the compiler's own sources (package, grammar, templates): a cached module is reused
    only by the compiler that wrote it, even between releases (an edited template is a new key)."""
    from .resources import resource_dir

    h = hashlib.sha256()
    pkg = Path(__file__).parent
    for folder, pattern in ((pkg, "*.py"), (resource_dir("grammar"), "*"), (resource_dir("templates"), "*")):
        for f in sorted(folder.glob(pattern)):
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write by rename, so that a concurrent reader sees the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def import_path(path: Path, module_name: str | None = None) -> ModuleType:
    """Import a generated module from a file (Triton needs real files to read kernel source)."""
    name = module_name or f"attngen_gen_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def compile_file(path: str | os.PathLike, out_dir: str | os.PathLike, sparse: bool = True,
                 layout: str | None = None) -> list[Path]:
    from .codegen import compile_source

    src = Path(path).read_text()
    out = []
    for name, code in compile_source(src, str(path), sparse=sparse, layout=layout).items():
        target = Path(out_dir) / f"{name}.py"
        write_atomic(target, code)
        out.append(target)
    return out


def load(path: str | os.PathLike, name: str | None = None, sparse: bool = True, layout: str | None = None):
    """Compile (or reuse) and import; returns the function for `name` (default: the file's first spec).
    `layout` compiles the spec for another layout (e.g. "paged") than its own."""
    from .codegen import compile_source

    src = Path(path).read_text()
    key = hashlib.sha256(f"{toolchain_hash()}\0{sparse}\0{layout}\0{src}".encode()).hexdigest()[:16]
    sources: dict[str, str] | None = None
    if name is None:
        sources = compile_source(src, str(path), sparse=sparse, layout=layout)
        name = next(iter(sources))
    d = cache_dir()
    target = d / f"{name}_{key}.py"
    if not target.exists():
        sources = sources or compile_source(src, str(path), sparse=sparse, layout=layout)
        if name not in sources:
            raise AttnError(f"{path}: no spec named {name!r} (have {', '.join(sources)})")
        try:
            write_atomic(target, sources[name])
        except OSError as e:
            fallback = Path(tempfile.mkdtemp(prefix="attngen-")) / target.name
            print(f"attngen: cache {d} not writable ({e.strerror}); using {fallback.parent}",
                  file=sys.stderr)
            write_atomic(fallback, sources[name])
            target = fallback
    return getattr(import_path(target, f"attngen_cache_{name}_{key}"), name)
