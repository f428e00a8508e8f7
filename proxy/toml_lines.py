"""Line numbers for TOML key paths, which `tomllib` does not report.

A config error is only useful if it says where to look. This scans the text for table
headers (`[a.b]`, `[[sites]]` with its running index) and `key = ...` lines, skipping the
continuation lines of multi-line arrays, inline tables and strings. It is deliberately not a
TOML parser: a key it cannot see (inside an inline table, say) is located at the nearest
enclosing key or table it did see.
"""

from __future__ import annotations

import re

KeyPath = tuple[str | int, ...]

_KEY = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')"""
_KEYS = rf"{_KEY}(?:\s*\.\s*{_KEY})*"
_HEADER = re.compile(rf"\s*(\[\[?)\s*({_KEYS})\s*\]\]?\s*(?:#.*)?")
_ASSIGN = re.compile(rf"\s*({_KEYS})\s*=(.*)")
_STRING = re.compile(r""""(?:[^"\\]|\\.)*"|'[^']*'""")
_MULTILINE_QUOTES = ('"""', "'''")


def _split_keys(dotted: str) -> tuple[str, ...]:
    """`a."b.c".d` -> ("a", "b.c", "d"); escapes in quoted keys are kept as written."""
    return tuple(key.strip("\"'") for key in re.findall(_KEY, dotted))


def _bracket_depth(value: str) -> int:
    """How many brackets/braces `value` leaves open, ignoring strings and comments."""
    code = _STRING.sub('""', value).split("#", 1)[0]
    return code.count("[") + code.count("{") - code.count("]") - code.count("}")


class KeyLocator:
    """Maps key paths such as ("sites", 1, "hosts") to the 1-based line that defines them."""

    def __init__(self, text: str) -> None:
        self._lines: dict[KeyPath, int] = {}
        self._array_lengths: dict[KeyPath, int] = {}
        table: KeyPath = ()
        depth = 0  # open brackets of a multi-line value
        closing_quotes: str | None = None  # inside a multi-line string
        for number, line in enumerate(text.splitlines(), start=1):
            if closing_quotes is not None:
                if closing_quotes in line:
                    closing_quotes = None
                continue
            if depth > 0:
                depth = max(0, depth + _bracket_depth(line))
                continue
            if header := _HEADER.fullmatch(line):
                is_array = header.group(1) == "[["
                table = self._resolve(_split_keys(header.group(2)), is_array=is_array)
                self._record(table, number)
            elif assign := _ASSIGN.fullmatch(line):
                self._record(table + _split_keys(assign.group(1)), number)
                value = assign.group(2).lstrip()
                quotes = value[:3]
                if quotes in _MULTILINE_QUOTES and quotes not in value[3:]:
                    closing_quotes = quotes
                else:
                    depth = max(0, _bracket_depth(value))

    def _resolve(self, keys: tuple[str, ...], *, is_array: bool) -> KeyPath:
        """The full path of a table header, indexing into arrays of tables seen so far."""
        path: KeyPath = ()
        for position, key in enumerate(keys, start=1):
            path += (key,)
            if is_array and position == len(keys):
                index = self._array_lengths.get(path, 0)
                self._array_lengths[path] = index + 1
                path += (index,)
            elif path in self._array_lengths:
                path += (self._array_lengths[path] - 1,)
        return path

    def _record(self, path: KeyPath, number: int) -> None:
        """Record `path` and the tables it implicitly creates, unless seen earlier."""
        for end in range(1, len(path) + 1):
            self._lines.setdefault(path[:end], number)

    def line(self, path: KeyPath) -> int | None:
        """The line of `path`, else of its nearest located ancestor; None at top level."""
        while path:
            if path in self._lines:
                return self._lines[path]
            path = path[:-1]
        return None
