"""Fallbacks a caller names for its own request (through the gateway or the shim), the way the
common gateways take them: a `fallbacks` list in the JSON body, or an `x-isopool-fallbacks` header.

Each entry is a string, a model of the request's own profile or the name of a profile (the broker
tells which), or an object `{"profile": ..., "model": ...}`; the header's entries are
`profile/model`, `profile` or `model`, comma-separated. The list is taken out of the body before it
goes upstream (an OpenAI API refuses unknown parameters) except where it is Anthropic's own: when
`anthropic-beta` names Anthropic's server-side fallback, the body's `fallbacks` is that API's
parameter and is passed on untouched. The broker checks each entry against `request_fallbacks`.
"""

from __future__ import annotations

from typing import Any

import msgspec

HEADER = "x-isopool-fallbacks"
MAX_FALLBACKS = 4  # what the SUBMIT header carries within MAX_HEADER_BYTES
_OBJECT = msgspec.json.Decoder(dict[str, msgspec.Raw])
_ENTRIES = msgspec.json.Decoder(list[str | dict[str, str]])
_ENC = msgspec.json.Encoder()
_ANY = msgspec.json.Decoder()

Hop = tuple[str, str]  # (profile, model); "" keeps the request's own


class BadFallbacks(ValueError):
    """The caller's fallbacks cannot be read; the message says what the gateway takes."""


def take_fallbacks(
    headers: Any, body: bytes, top: dict[str, msgspec.Raw] | None = None
) -> tuple[bytes, list[Hop] | None, dict[str, Any]]:
    """(the body without a `fallbacks` of the pool's, the caller's fallbacks: header's first, then body's;
    None if it named none, and [] for an empty list: no fallbacks at all, not even the configured ones;
    the body's `model` and `stream`, which the broker reads without the payload). The body's top level
    is read once: `top`, where the caller has read it already."""
    named = HEADER in headers
    hops = [_entry(item.strip()) for item in headers.get(HEADER, "").split(",") if item.strip()]
    if top is None:
        top = top_level(body)
    if "fallbacks" in top and not _providers_own(headers):
        named = True
        top = dict(top)
        try:
            entries = _ENTRIES.decode(top.pop("fallbacks"))
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
            raise BadFallbacks(
                'fallbacks must be a list of models, profiles or {"profile": ..., "model": ...} objects'
            ) from None
        hops += [_entry(e) if isinstance(e, str) else (e.get("profile", ""), e.get("model", "")) for e in entries]
        body = _ENC.encode(top)  # the other fields' bytes as they came
    if len(hops) > MAX_FALLBACKS:
        raise BadFallbacks(f"at most {MAX_FALLBACKS} fallbacks per request, got {len(hops)}")
    return body, hops if named else None, fields_of(top)


def top_level(body: bytes) -> dict[str, msgspec.Raw]:
    """A JSON object body's fields, each value's bytes as they came; {} for any other body."""
    if not body.startswith(b"{"):
        return {}
    try:
        return _OBJECT.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):  # msgspec's: nested too deep
        return {}


def fields_of(top: dict[str, msgspec.Raw]) -> dict[str, Any]:
    """The `model` and `stream` of a body's top level (for the broker's per-model limits); {} if unreadable."""
    try:
        return {name: _ANY.decode(top[name]) for name in ("model", "stream") if name in top}
    except (msgspec.DecodeError, RecursionError):
        return {}


def _entry(item: str) -> Hop:
    """`profile/model`, or a bare name: ("", name), a profile or a model (the broker knows its profiles)."""
    profile, slash, model = item.partition("/")
    return (profile, model) if slash else ("", item)


def _providers_own(headers: Any) -> bool:
    """Anthropic's server-side fallback (a beta) takes a `fallbacks` body parameter of its own."""
    return "server-side-fallback" in headers.get("anthropic-beta", "")
