"""What a load test sends: request bodies for the three streaming APIs, with input and
output lengths drawn from a distribution. Prompts are made of common words (about one
token each), so no tokenizer is ever downloaded; the server's `usage` gives exact counts."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import msgspec

from ..protocol import HttpCall
from .prompts import MAX_TOKENS, SharedPrefix
from .prompts import WORDS as _WORDS

# api -> (SDK kind of the profile, path under its base URL)
APIS: dict[str, tuple[str, str]] = {
    "messages": ("anthropic", "/v1/messages"),
    "chat": ("openai", "/chat/completions"),
    "responses": ("openai", "/responses"),
}
DEFAULT_MODEL = {"messages": "claude-sonnet-4-5", "chat": "gpt-4.1-mini", "responses": "gpt-4.1-mini"}
_ENC = msgspec.json.Encoder()


class Lengths(msgspec.Struct, frozen=True):
    """A token-length distribution: normal around `mean` with spread `sd`, clipped to [min, max]."""

    mean: int
    sd: float = 0.0
    min: int = 1
    max: int = 0  # 0: no upper bound

    @classmethod
    def parse(cls, text: str) -> Lengths:
        """`500`, or `mean=500,sd=50,min=10,max=1000` (any of them)."""
        fields = {"mean": int(text)} if text.strip().isdigit() else _named_fields(text)
        if "mean" not in fields:
            raise ValueError(f"a length distribution needs a mean: {text!r}")
        lengths = cls(**fields)
        if lengths.mean < 1 or lengths.sd < 0 or lengths.min < 1 or (lengths.max and lengths.max < lengths.min):
            raise ValueError(f"need mean >= 1, sd >= 0, 1 <= min <= max: {text!r}")
        if max(lengths.mean, lengths.min, lengths.max) > MAX_TOKENS:
            raise ValueError(f"at most {MAX_TOKENS:,} tokens (the largest context windows): {text!r}")
        return lengths

    def sample(self, rng: random.Random) -> int:
        n = round(rng.gauss(self.mean, self.sd)) if self.sd else self.mean
        return min(max(self.min, n), self.max or MAX_TOKENS)

    def __str__(self) -> str:
        text = f"{self.mean}" + (f"±{self.sd:g}" if self.sd else "")
        return text + (f" [{self.min}, {self.max}]" if self.max or self.min > 1 else "")


def _named_fields(text: str) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in ("mean", "sd", "min", "max"):
            raise ValueError(f"expected N or mean=N,sd=S,min=A,max=B; got {text!r}")
        fields[key.strip()] = float(value) if key.strip() == "sd" else int(value)
    return fields


class Turn(msgspec.Struct, frozen=True):
    """One request of a workload: the JSON body (also the SDK's keyword arguments), its input
    length (estimated: words, or JSON bytes / 4) and the output length it asks for (-1: unsaid)."""

    body: dict[str, Any]
    input_tokens: int
    requested: int


class Synthetic:
    """Synthetic conversations: each turn a fresh prompt of a drawn length asking for a drawn
    number of tokens; later turns carry the earlier ones (the answers as words of the length
    asked for, since a load test does not keep the text), as a chat client would. With `prefix`,
    a conversation's first prompt opens with one of its shared prefixes."""

    def __init__(self, api: str, model: str, input_tokens: Lengths, output_tokens: Lengths, stream: bool = True,
                 seed: int = 0, turns: int = 1, prefix: SharedPrefix | None = None) -> None:  # fmt: skip
        if api not in APIS:
            raise ValueError(f"unknown api {api!r}; choose one of {', '.join(APIS)}")
        if turns < 1:
            raise ValueError("turns must be >= 1")
        self.api, self.model, self.stream, self.turns = api, model, stream, turns
        self.input_tokens, self.output_tokens, self.prefix = input_tokens, output_tokens, prefix
        self.rng = random.Random(seed)

    def conversation(self, index: int) -> Iterator[Turn]:
        history: list[dict[str, str]] = []
        total_in = 0
        lead = self.prefix.pick(self.rng) + " " if self.prefix else ""  # opens the first prompt
        for turn in range(self.turns):
            n_in, n_out = self.input_tokens.sample(self.rng), self.output_tokens.sample(self.rng)
            prompt = " ".join([f"#{index}.{turn}"] + [self.rng.choice(_WORDS) for _ in range(n_in - 1)])
            if turn == 0 and self.prefix:
                prompt, total_in = lead + prompt, self.prefix.tokens
            history.append({"role": "user", "content": prompt})
            total_in += n_in
            yield Turn(request_body(self.api, self.model, history, n_out, self.stream), total_in, n_out)
            history.append({"role": "assistant", "content": " ".join(self.rng.choice(_WORDS) for _ in range(n_out))})
            total_in += n_out


class Dataset:
    """Requests from a JSONL file in the batch formats (OpenAI Batch or Anthropic Message
    Batches lines, as `isopool batch` takes them), sent in file order and cycled."""

    def __init__(self, path: str, stream: bool = True, model: str = "", wanted: str = "") -> None:
        from ..batch.runner import load

        items, invalid, _ = load(path)
        if invalid:
            shown = "; ".join(f"line {i.line}: {i.reason}" for i in invalid[:3])
            raise ValueError(f"{path}: {len(invalid)} invalid line(s): {shown}")
        self.api = api_of_items(path, items, wanted)
        self.items, self.stream, self.model = items, stream, model
        self.turns = 1

    def conversation(self, index: int) -> Iterator[Turn]:
        yield turn_of(self.items[index % len(self.items)].params, self.api, self.stream, self.model)


_API_OF_METHOD = {"messages.create": "messages", "chat.completions.create": "chat", "responses.create": "responses"}


def api_of_items(path: str, items: list[Any], wanted: str = "") -> str:
    """The one API a file's batch requests call (and `wanted`, if given, must be it)."""
    if not items:
        raise ValueError(f"{path}: no requests")
    apis = {_API_OF_METHOD.get(item.method) for item in items}
    if None in apis or len(apis) != 1:
        raise ValueError(f"{path}: a load test takes requests of one API (messages, chat completions or "
                         f"responses), not {sorted(item.method for item in items)[:3]}")  # fmt: skip
    api = apis.pop()
    if wanted and wanted != api:
        raise ValueError(f"{path} holds {api} requests, not {wanted}")
    return api  # type: ignore[return-value]


def turn_of(params: dict[str, Any], api: str, stream: bool, model: str) -> Turn:
    """A batch request's parameters as a load test sends them: streamed as asked, `model` if given."""
    body = dict(params, stream=stream)
    if model:
        body["model"] = model
    if stream and api == "chat":
        body["stream_options"] = {"include_usage": True}
    requested = next((body[k] for k in ("max_tokens", "max_completion_tokens", "max_output_tokens") if k in body), -1)
    return Turn(body, len(_ENC.encode(body.get("messages") or body.get("input") or "")) // 4, int(requested))


def to_http(api: str, body: dict[str, Any]) -> HttpCall:
    return HttpCall("POST", APIS[api][1], [("content-type", "application/json")], _ENC.encode(body))


def request_body(api: str, model: str, history: list[dict[str, str]], max_tokens: int, stream: bool) -> dict[str, Any]:
    if api == "messages":
        return {"model": model, "max_tokens": max_tokens, "stream": stream, "messages": list(history)}
    if api == "responses":
        text = history[0]["content"] if len(history) == 1 else list(history)
        return {"model": model, "max_output_tokens": max_tokens, "stream": stream, "input": text}
    body = {"model": model, "max_tokens": max_tokens, "stream": stream, "messages": list(history)}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body
