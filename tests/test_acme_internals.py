"""The private parts of `acme` that proxy/certs/acme.py builds on (its _Client and _Network
subclasses). An `acme` upgrade that renames one fails here, with the place to change."""

from __future__ import annotations

import inspect

import pytest
from acme import client as acme_client

USED = [
    (acme_client.ClientV2, "_post", "new_order_replacing: POST the order body"),
    (acme_client.ClientV2, "_post_as_get", "new_order_replacing: fetch authorizations"),
    (acme_client.ClientV2, "_authzr_from_response", "new_order_replacing: parse them"),
    (acme_client.ClientNetwork, "_send_request", "_Network: remember Retry-After"),
    (acme_client.ClientNetwork, "_post_once", "_Network.post: retry every badNonce"),
]


@pytest.mark.parametrize(("cls", "name", "use"), USED, ids=[name for _, name, _ in USED])
def test_acme_still_has_what_our_client_overrides_or_calls(cls: type, name: str, use: str) -> None:
    assert inspect.isfunction(getattr(cls, name, None)), (
        f"acme no longer has {cls.__name__}.{name}, used by proxy/certs/acme.py ({use})"
    )
