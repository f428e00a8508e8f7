"""docs/CONFIG.md documents exactly the keys the loader accepts.

The loader checks every table's keys in one place (`_Reader._table`); recording what it
accepts while it reads a config gives the true key set, with no list kept by hand.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Collection
from pathlib import Path

import pytest

from proxy import config_load
from proxy.toml_lines import KeyPath

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "CONFIG.md"
MINIMAL = '[[sites]]\nhosts = ["a.test"]\nupstreams = ["http://127.0.0.1:1"]\n'
# Reaches the nested tables too: a named group, a route and its inline tables.
NESTED = (
    '[[upstream_groups]]\nname = "g"\nbackends = ["http://127.0.0.1:2"]\n'
    '[[sites.routes]]\npath = "/"\nrespond = {}\nheader = { name = "x" }\n'
)


def _shape(key: KeyPath) -> str:
    """("sites", 0) -> "sites[]": one entry for every table of an array of tables."""
    return ".".join(f"{part}[]" if isinstance(part, str) and i + 1 < len(key) and
                    isinstance(key[i + 1], int) else str(part)
                    for i, part in enumerate(key) if not isinstance(part, int))  # fmt: skip


def accepted_keys(monkeypatch: pytest.MonkeyPatch) -> dict[str, set[str]]:
    accepted: dict[str, set[str]] = {"": set(config_load.TOP_KEYS)}
    original = config_load.ConfigReader._table

    def recording(
        self: config_load.ConfigReader, value: object, key: KeyPath, known: Collection[str]
    ) -> config_load.Table | None:
        accepted.setdefault(_shape(key), set()).update(known)
        return original(self, value, key, known)

    monkeypatch.setattr(config_load.ConfigReader, "_table", recording)
    config_load.parse_config(MINIMAL + NESTED, Path("minimal.toml"))
    # Tables themselves are keys of their parent, not settings: keep only leaf keys.
    accepted[""] -= {name.removesuffix("[]") for name in accepted if name}
    return accepted


def _document(documented: dict[str, set[str]], prefix: str, table: dict[str, object]) -> None:
    """Record `table`'s keys under `prefix`, and its sub-tables' under theirs."""
    documented.setdefault(prefix, set()).update(table)
    for name, value in table.items():
        if isinstance(value, dict):
            _document(documented, f"{prefix}.{name}".lstrip("."), value)
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for item in value:
                _document(documented, f"{prefix}.{name}[]".lstrip("."), item)


def documented_keys() -> dict[str, set[str]]:
    documented: dict[str, set[str]] = {"": set()}
    for block in re.findall(r"```toml\n(.*?)```", REFERENCE.read_text(), re.DOTALL):
        _document(documented, "", tomllib.loads(block))
    # Tables are keys of their parent, not settings: keep only leaf keys at the top.
    documented[""] -= {name.partition(".")[0].removesuffix("[]") for name in documented if name}
    return documented


def test_every_accepted_key_is_documented_and_nothing_else(monkeypatch: pytest.MonkeyPatch) -> None:
    accepted = accepted_keys(monkeypatch)
    documented = documented_keys()
    assert "sites[]" in accepted and "listen" in accepted  # the recording really ran
    missing = {
        table: sorted(keys - documented.get(table, set())) for table, keys in accepted.items()
    }
    # Free-form tables (header values to set) are not the loader's tables: not compared.
    stale = {t: sorted(keys - accepted[t]) for t, keys in documented.items() if t in accepted}
    assert {t: k for t, k in missing.items() if k} == {}, "keys missing from docs/CONFIG.md"
    assert {t: k for t, k in stale.items() if k} == {}, "docs/CONFIG.md names unknown keys"
