"""Fallbacks a gateway caller names for its own request, the way the common gateways take them:
a `fallbacks` list in the JSON body, or an `x-isopool-fallbacks` header.

Each entry is a model of the request's own profile, a profile (a string that names one), or an
object `{"profile": ..., "model": ...}`; the header's entries are `profile/model`, `profile` or
`model`, comma-separated. The list is taken out of the body before it goes upstream (an OpenAI
API refuses unknown parameters) except where it is Anthropic's own: on an Anthropic route whose
`anthropic-beta` names its server-side fallback, the body's `fallbacks` is that API's parameter
and is passed on untouched. The broker checks each entry against `request_fallbacks`.
"""

from __future__ import annotations

from typing import Any

import msgspec

HEADER = "x-isopool-fallbacks"
MAX_FALLBACKS = 4  # what the SUBMIT header carries within MAX_HEADER_BYTES
_OBJECT = msgspec.json.Decoder(dict[str, msgspec.Raw])
_ENTRIES = msgspec.json.Decoder(list[str | dict[str, str]])
_ENC = msgspec.json.Encoder()

Hop = tuple[str, str]  # (profile, model); "" keeps the request's own


class BadFallbacks(ValueError):
    """The caller's fallbacks cannot be read; the message says what the gateway takes."""


def take_fallbacks(kind: str, headers: Any, body: bytes, profiles: set[str]) -> tuple[bytes, list[Hop]]:
    """(the body without a `fallbacks` of the pool's, the caller's fallbacks: header's first, then body's)."""
    hops = [_entry(item.strip(), profiles) for item in headers.get(HEADER, "").split(",") if item.strip()]
    if body.startswith(b"{") and not _providers_own(kind, headers):
        try:
            fields = _OBJECT.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError):
            fields = {}
        if "fallbacks" in fields:
            try:
                entries = _ENTRIES.decode(fields.pop("fallbacks"))
            except (msgspec.DecodeError, msgspec.ValidationError):
                raise BadFallbacks(
                    'fallbacks must be a list of models, profiles or {"profile": ..., "model": ...} objects'
                ) from None
            hops += [_entry(e, profiles) if isinstance(e, str) else (e.get("profile", ""), e.get("model", ""))
                     for e in entries]  # fmt: skip
            body = _ENC.encode(fields)  # the other fields' bytes as they came
    if len(hops) > MAX_FALLBACKS:
        raise BadFallbacks(f"at most {MAX_FALLBACKS} fallbacks per request, got {len(hops)}")
    return body, hops


def _entry(item: str, profiles: set[str]) -> Hop:
    profile, slash, model = item.partition("/")
    if slash:
        return profile, model
    return (item, "") if item in profiles else ("", item)


def _providers_own(kind: str, headers: Any) -> bool:
    """Anthropic's server-side fallback (a beta) takes a `fallbacks` body parameter of its own."""
    return kind == "anthropic" and "server-side-fallback" in headers.get("anthropic-beta", "")
