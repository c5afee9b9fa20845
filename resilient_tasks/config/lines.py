"""Where each table and key of a TOML text is, since ``tomllib`` keeps no positions.

A small scanner over text that ``tomllib`` has already parsed: it follows table headers,
dotted and quoted keys, inline tables, arrays and the four kinds of string, and records
the line each key path first appears on. Errors then point at the exact line.
"""

from __future__ import annotations

import contextlib
import re
import tomllib
from collections.abc import Mapping

__all__ = ["Lines", "scan"]

Path = tuple[str, ...]
_BARE = re.compile(r"[A-Za-z0-9_-]+")
_SPACE = " \t"


class Lines:
    """Line numbers by key path (``("tasks", "shop.charge", "retry", "max_retries")``)."""

    def __init__(self, found: Mapping[Path, int] | None = None) -> None:
        self._found = dict(found or {})

    def of(self, path: Path) -> int | None:
        """The line of ``path``, else of its nearest enclosing table that has one."""
        for end in range(len(path), 0, -1):
            line = self._found.get(path[:end])
            if line is not None:
                return line
        return None

    def __repr__(self) -> str:
        return f"Lines({len(self._found)} paths)"


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.i = 0
        self.line = 1
        self.found: dict[Path, int] = {}

    # -- characters ------------------------------------------------------------------

    def peek(self, count: int = 1) -> str:
        return self.text[self.i : self.i + count]

    def advance(self, count: int = 1) -> None:
        self.line += self.text.count("\n", self.i, self.i + count)
        self.i += count

    def skip_blank(self, *, newlines: bool) -> None:
        """Spaces and comments; newlines too inside arrays."""
        while self.i < len(self.text):
            char = self.text[self.i]
            if char in _SPACE or (newlines and char in "\r\n"):
                self.advance()
            elif char == "#":
                end = self.text.find("\n", self.i)
                self.advance((len(self.text) if end < 0 else end) - self.i)
            else:
                return

    def record(self, path: Path, line: int) -> None:
        for end in range(1, len(path) + 1):
            self.found.setdefault(path[:end], line)

    # -- keys and values -------------------------------------------------------------

    def string(self) -> str:
        """Skip one string of any kind; return its source text."""
        start = self.i
        for quote in ('"""', "'''"):
            if self.peek(3) == quote:
                end = self.text.find(quote, self.i + 3)
                while quote == '"""' and end > 0 and _escaped(self.text, end):
                    end = self.text.find(quote, end + 1)
                end = len(self.text) if end < 0 else end + 3
                while self.text[end : end + 1] == quote[0]:  # up to two quotes may close it
                    end += 1
                self.advance(end - self.i)
                return self.text[start : self.i]
        quote = self.text[self.i]
        end = self.i + 1
        while end < len(self.text) and self.text[end] != quote:
            end += 2 if quote == '"' and self.text[end] == "\\" else 1
        self.advance(end + 1 - self.i)
        return self.text[start : self.i]

    def key(self) -> Path:
        """A dotted key, its parts decoded as TOML decodes them."""
        parts: list[str] = []
        while True:
            self.skip_blank(newlines=False)
            char = self.peek()
            if char in ('"', "'"):
                parts.append(tomllib.loads(f"k = {self.string()}")["k"])
            else:
                match = _BARE.match(self.text, self.i)
                if match is None:
                    return tuple(parts)
                parts.append(match.group())
                self.advance(match.end() - self.i)
            self.skip_blank(newlines=False)
            if self.peek() != ".":
                return tuple(parts)
            self.advance()

    def value(self, path: Path | None) -> None:
        """Skip one value; record the keys of inline tables under ``path``."""
        char = self.peek()
        if char in ('"', "'"):
            self.string()
        elif char == "[":
            self.advance()
            while self.i < len(self.text):
                self.skip_blank(newlines=True)
                if self.peek() == "]":
                    self.advance()
                    return
                if self.peek() == ",":
                    self.advance()
                    continue
                self.value(None)
        elif char == "{":
            self.advance()
            while self.i < len(self.text):
                self.skip_blank(newlines=False)
                if self.peek() == "}":
                    self.advance()
                    return
                if self.peek() == ",":
                    self.advance()
                    continue
                self.assignment(path)
        else:
            while self.i < len(self.text) and self.text[self.i] not in ",]}#\r\n":
                self.advance()

    def assignment(self, table: Path | None) -> None:
        line = self.line
        key = self.key()
        if table is not None:
            self.record(table + key, line)
        self.skip_blank(newlines=False)
        if self.peek() == "=":
            self.advance()
        self.skip_blank(newlines=False)
        self.value(None if table is None else table + key)

    # -- statements ------------------------------------------------------------------

    def run(self) -> dict[Path, int]:
        table: Path = ()
        while self.i < len(self.text):
            self.skip_blank(newlines=True)
            if self.i >= len(self.text):
                break
            if self.peek() == "[":
                double = self.peek(2) == "[["
                line = self.line
                self.advance(2 if double else 1)
                table = self.key()
                self.record(table, line)
                self.advance(2 if double else 1)
            else:
                start = self.i
                self.assignment(table)
                if self.i == start:  # not TOML after all: give up rather than loop
                    break
        return self.found


def _escaped(text: str, at: int) -> bool:
    """True when the character at ``at`` follows an odd number of backslashes."""
    count = 0
    while at - count - 1 >= 0 and text[at - count - 1] == "\\":
        count += 1
    return count % 2 == 1


def scan(text: str) -> Lines:
    """The lines of every key path in ``text`` (valid TOML); partial, never raising, on
    anything the scanner does not follow."""
    scanner = _Scanner(text)
    with contextlib.suppress(Exception):  # positions are a courtesy: a message without a line helps too
        scanner.run()
    return Lines(scanner.found)
