"""A header the SDK's own client would never send must not reach the provider.

A caller's header name is checked against the framing and credential names as a whole, so a name that carries
`: value` of its own (`Host: elsewhere`) passed both checks and went upstream as a second `Host` (or
`x-api-key`) line, which the SDK's client (h11) refuses to send; a value with CR/LF was refused only by
aiohttp, as the pool's own internal error. Each is now the caller's bad request, and nothing is sent.
"""

from __future__ import annotations

import msgspec
import pytest

from broker import BadRequest
from broker.protocol import HttpCall

from .conftest import anthropic_args

MSG = anthropic_args("a header of its own", max_tokens=8)
SMUGGLED = [
    ("Host: elsewhere.example", "x"),  # a second Host line, after the worker's
    ("x-api-key: sk-caller", "x"),  # a second key line, beside the pool's
    ("x a", "1"),  # not a token
    ("", "1"),
    ("x-ok", "1\r\nX-Injected: 1"),
    ("x-ok", "1\x00"),
]


def served(fake) -> int:
    return sum(fake.stats()["served"].values())


@pytest.mark.parametrize(("name", "value"), SMUGGLED)
def test_a_header_the_sdk_client_would_not_send_is_the_callers_bad_request_on_every_path(client, fake, name, value):
    before = served(fake)
    call = HttpCall("POST", "/v1/messages", [("content-type", "application/json"), (name, value)],
                    msgspec.json.encode(MSG))  # fmt: skip
    with pytest.raises(BadRequest, match="header"):
        client.submit_http("anthropic", call).result()
    with pytest.raises(BadRequest, match="header"):
        client.request("anthropic", "messages.create", **MSG, extra_headers={name: value})
    assert served(fake) == before
