"""The reader's core: problems collected with file and line, tables checked for unknown keys,
values converted or reported. The section readers build on it."""

from __future__ import annotations

import difflib
import math
import ssl
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TypeVar

from proxy.config_load.convert import Invalid, dotted, show
from proxy.toml_lines import KeyLocator, KeyPath

T = TypeVar("T")
Table = dict[str, object]


class ConfigError(Exception):
    """The config file is unusable; `problems` holds one `FILE:LINE: key: message` each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class Reader:
    """Walks the parsed TOML tree into the model, collecting problems instead of raising."""

    def __init__(self, path: Path, locator: KeyLocator) -> None:
        self._path = path
        self._locator = locator
        self._problems: list[tuple[float, str]] = []  # (line, message); no line sorts last
        self.warnings: list[str] = []  # the config works, but probably not as meant

    @property
    def problems(self) -> list[str]:
        """Every problem found, in file order."""
        return [message for _, message in sorted(self._problems, key=lambda found: found[0])]

    def _problem(self, key: KeyPath, message: str) -> None:
        line = self._locator.line(key)
        self._problems.append((line or math.inf, f"{self._where(key, line)}: {message}"))

    def _where(self, key: KeyPath, line: int | None) -> str:
        """Where a problem is, as its message starts: file, line and key path. A reader of
        values from elsewhere (command-line flags) names their origin instead."""
        where = f"{self._path}:{line}" if line else str(self._path)
        return f"{where}: {dotted(key)}"

    def _section(self, root: Table, name: str, known: Collection[str]) -> Table:
        """The top-level table `name`; empty when absent or not a table."""
        return self._table(root.get(name, {}), (name,), known) or {}

    def _table(self, value: object, key: KeyPath, known: Collection[str]) -> Table | None:
        """`value` as a table after reporting its unknown keys; None if it is not a table."""
        if not isinstance(value, dict):
            self._problem(key, f"must be a table, got {show(value)}")
            return None
        for name in value:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f' (did you mean "{close[0]}"?)' if close else ""
                self._problem((*key, name), f"unknown key{hint}")
        return value

    def _value(
        self, table: Table, key: KeyPath, name: str, default: T, convert: Callable[[object], T]
    ) -> T:
        """`table[name]` converted, or `default` when absent or invalid (then reported)."""
        if name not in table:
            return default
        try:
            return convert(table[name])
        except Invalid as exc:
            self._problem((*key, name), str(exc))
            return default

    def _each(
        self, table: Table, key: KeyPath, name: str, convert: Callable[[object], T]
    ) -> dict[KeyPath, T]:
        """The required non-empty array `table[name]`, converted, keyed by element key path.

        Bad elements are reported at their own index (`sites[0].hosts[2]`) and left out.
        """
        array_key = (*key, name)
        raw = table.get(name)
        if raw is None:
            self._problem(array_key, "is required")
            return {}
        if not isinstance(raw, list) or not raw:
            self._problem(array_key, f"must be a non-empty array, got {show(raw)}")
            return {}
        converted: dict[KeyPath, T] = {}
        for index, element in enumerate(raw):
            try:
                converted[(*array_key, index)] = convert(element)
            except Invalid as exc:
                self._problem((*array_key, index), str(exc))
        return converted

    def _check_ca_bundle(self, key: KeyPath, ca: Path) -> None:
        """Load the bundle as the upstream connections will, so a bad one fails at start."""
        if not ca.is_file():
            self._problem(key, f"file not found: {ca}")
            return
        try:
            ssl.create_default_context(cafile=ca)
        except ssl.SSLError:
            self._problem(key, f"no PEM certificate in {ca}")
        except OSError as exc:
            self._problem(key, f"cannot read {ca}: {exc.strerror or exc}")
