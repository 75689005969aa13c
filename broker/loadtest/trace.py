"""`--trace FILE`: requests replayed at the times a trace gives them, open loop (`--speedup X`
divides the times by X). Two formats, told apart per line, one per file:

- Mooncake's public traces: `{"timestamp": ms, "input_length": N, "output_length": M, "hash_ids":
  [...]}`, each hash id one block of 512 prompt tokens (equal ids: the same block of the same
  prefix); the prompt is made of each id's own text (see `prompts.from_hash_ids`), in the API
  and model of the run, and asks for `output_length` tokens.
- Requests in the `isopool batch` formats (as `--dataset` reads them) with a `timestamp` in ms.

The first request goes out at once, the others at their distance from it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

import msgspec

from ..batch.formats import Item, numbered_lines, parse_line
from .prompts import MAX_TOKENS, from_hash_ids
from .workload import DEFAULT_MODEL, Turn, api_of_items, request_body, turn_of

_DEC = msgspec.json.Decoder()
_BATCH_KEYS = ("custom_id", "params", "url", "body")
_KINDS = {"mooncake": "a Mooncake line", "batch": "a batch request"}
_Length = Annotated[int, msgspec.Meta(ge=1, le=MAX_TOKENS)]


class MooncakeLine(msgspec.Struct, frozen=True):
    timestamp: float
    input_length: _Length
    output_length: _Length
    hash_ids: list[int] = []


class Trace:
    """A trace's requests in time order; `offsets()` says when each is due."""

    turns = 1

    def __init__(self, path: str, stream: bool, model: str, api: str, wanted: str = "") -> None:
        """A Mooncake trace's prompts are sent in `api` to `model` (default: the API's own); a trace of
        batch requests calls its own API (`wanted`, if given, must be it), its own model unless `model`."""
        times, lines = read(path)
        self.times, self.lines, self.stream = times, lines, stream
        if isinstance(lines[0], Item):
            self.api, self.model = api_of_items(path, lines, wanted), model
        else:
            self.api, self.model = api, model or DEFAULT_MODEL[api]

    def describe(self, speedup: float, duration: float) -> str:
        """How long the replay takes, said before it starts: timestamps in µs instead of ms make it 1000x
        longer, which nothing else would show until the run had gone on for hours."""
        span = (self.times[-1] - self.times[0]) / 1000 / speedup
        cut = f"; --duration stops it after {duration:g} s" if duration and duration < span else ""
        return (f"the trace holds {len(self.times):,} requests over {span:,.1f} s at {speedup:g}x its speed "
                f"(timestamps read as ms){cut}")  # fmt: skip

    def offsets(self, speedup: float) -> Iterator[float]:
        """Seconds from the first request to each, replayed `speedup` times as fast."""
        first = self.times[0]
        for t in self.times:
            yield (t - first) / 1000 / speedup

    def conversation(self, index: int) -> Iterator[Turn]:
        line = self.lines[index]
        if isinstance(line, Item):
            yield turn_of(line.params, self.api, self.stream, self.model)
            return
        prompt = from_hash_ids(line.hash_ids, line.input_length, index)
        body = request_body(
            self.api, self.model, [{"role": "user", "content": prompt}], line.output_length, self.stream
        )
        yield Turn(body, line.input_length, line.output_length)


def read(path: str) -> tuple[list[float], list[MooncakeLine] | list[Item]]:
    """The trace's times (ms) and lines, in time order; a ValueError naming the line that is not one."""
    entries: list[tuple[float, MooncakeLine | Item]] = []
    first: tuple[str, int] | None = None
    batch_format = None
    for number, raw in numbered_lines(path):
        where = f"{path}: line {number}"
        try:
            data = _DEC.decode(raw)
        except msgspec.DecodeError as exc:
            raise ValueError(f"{where}: malformed JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{where}: a line must be a JSON object")
        kind = "mooncake" if "hash_ids" in data or "input_length" in data else (
            "batch" if any(k in data for k in _BATCH_KEYS) else None)  # fmt: skip
        if kind is None:
            raise ValueError(f"{where} is neither a Mooncake line (timestamp, input_length, output_length, "
                             "hash_ids) nor a batch request with a timestamp (custom_id with url and body, "
                             "or params)")  # fmt: skip
        first = first or (kind, number)
        if kind != first[0]:
            raise ValueError(f"{where} is {_KINDS[kind]}, but line {first[1]} is {_KINDS[first[0]]}: "
                             "a trace holds one format")  # fmt: skip
        timestamp = data.get("timestamp")
        if isinstance(timestamp, bool) or not isinstance(timestamp, int | float) or timestamp < 0:
            raise ValueError(f"{where}: needs a timestamp (ms from the trace's start, >= 0), not {timestamp!r}")
        if kind == "mooncake":
            try:
                entries.append((timestamp, msgspec.convert(data, MooncakeLine)))
            except msgspec.ValidationError as exc:
                raise ValueError(f"{where}: {exc}") from None
            continue
        item, batch_format = parse_line(number, raw, batch_format)
        if not isinstance(item, Item):
            raise ValueError(f"{where}: {item.reason}")
        entries.append((timestamp, item))
    if not entries:
        raise ValueError(f"{path}: no requests")
    entries.sort(key=lambda entry: entry[0])  # stable: lines at the same time keep their order
    return [t for t, _ in entries], [line for _, line in entries]  # type: ignore[return-value]
