"""Positioned errors: every problem in a spec points at file:line:col with a caret."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """A region of spec source; lines and columns are 1-based, end is exclusive."""

    file: str
    line: int
    col: int
    end_line: int
    end_col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


class AttnError(Exception):
    """A user-facing error about a spec, rendered like a compiler diagnostic."""

    def __init__(self, message: str, span: Span | None = None, hint: str | None = None,
                 source: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.span = span
        self.hint = hint
        self.source = source

    def with_source(self, source: str) -> AttnError:
        if self.source is None:
            self.source = source
        return self

    def __str__(self) -> str:
        head = f"{self.span}: error: {self.message}" if self.span else f"error: {self.message}"
        lines = [head]
        if self.span and self.source is not None:
            src = self.source.split("\n")  # as the parser counts lines (not str.splitlines)
            if 0 < self.span.line <= len(src):
                text = src[self.span.line - 1]
                width = (self.span.end_col - self.span.col
                         if self.span.end_line == self.span.line else len(text) - self.span.col + 1)
                lines.append(f"    {text}")
                lines.append("    " + " " * (self.span.col - 1) + "^" * max(1, width))
        if self.hint:
            lines.append(f"hint: {self.hint}")
        return "\n".join(lines)
