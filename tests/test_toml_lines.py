"""The key-path -> line locator that config errors use to point at the offending line."""

from proxy.toml_lines import KeyLocator

TEXT = """\
title = "x"
[listen]   # comment
https = 443
a.b."c.d" = 1

[[sites]]
hosts = [
  "one",
  ["nested"]
]
upstreams = ["u"]
[[sites]]
notes = '''
x = 1
[fake]
'''
hosts = ["two"]
[sites.extra]
k = { inline = 1 }
[ "quoted key" . inner ]
v = 2
"""


def test_table_headers_and_keys() -> None:
    locator = KeyLocator(TEXT)
    assert locator.line(("title",)) == 1
    assert locator.line(("listen",)) == 2
    assert locator.line(("listen", "https")) == 3


def test_dotted_and_quoted_keys() -> None:
    locator = KeyLocator(TEXT)
    assert locator.line(("listen", "a", "b", "c.d")) == 4
    assert locator.line(("listen", "a")) == 4
    assert locator.line(("quoted key", "inner", "v")) == 21


def test_array_of_tables_are_indexed() -> None:
    locator = KeyLocator(TEXT)
    assert locator.line(("sites",)) == 6
    assert locator.line(("sites", 0)) == 6
    assert locator.line(("sites", 0, "upstreams")) == 11
    assert locator.line(("sites", 1)) == 12
    assert locator.line(("sites", 1, "hosts")) == 17
    assert locator.line(("sites", 1, "extra", "k")) == 19


def test_multiline_values_hide_their_contents() -> None:
    locator = KeyLocator(TEXT)
    # "[nested]" inside the array and "[fake]" inside the string are not table headers.
    assert locator.line(("nested",)) is None
    assert locator.line(("fake",)) is None
    assert locator.line(("sites", 1, "x")) == 12


def test_unseen_keys_fall_back_to_the_nearest_ancestor() -> None:
    locator = KeyLocator(TEXT)
    assert locator.line(("sites", 0, "hosts", 1)) == 7
    assert locator.line(("sites", 1, "extra", "k", "inline")) == 19
    assert locator.line(("sites", 0, "cert")) == 6
    assert locator.line(("sites", 5, "hosts")) == 6
    assert locator.line(("missing",)) is None
    assert locator.line(()) is None
