"""Locate the grammar and templates: inside the wheel they sit in the package, in a checkout beside it."""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def resource_dir(name: str) -> Path:
    for base in (_PKG / name, _PKG.parent / name):
        if base.is_dir():
            return base
    raise FileNotFoundError(f"attngen is missing its {name}/ folder (looked in {_PKG} and its parent)")
