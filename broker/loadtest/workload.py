"""What a load test sends: request bodies for the three streaming APIs, with input and
output lengths drawn from a distribution. Prompts are made of common words (about one
token each), so no tokenizer is ever downloaded; the server's `usage` gives exact counts."""

from __future__ import annotations

import random
from typing import Any

import msgspec

from ..protocol import HttpCall

# api -> (SDK kind of the profile, path under its base URL)
APIS: dict[str, tuple[str, str]] = {
    "messages": ("anthropic", "/v1/messages"),
    "chat": ("openai", "/chat/completions"),
    "responses": ("openai", "/responses"),
}
_WORDS = (
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue"
).split()
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
        if text.strip().isdigit():
            return cls(int(text))
        fields: dict[str, Any] = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            if not sep or key.strip() not in ("mean", "sd", "min", "max"):
                raise ValueError(f"expected N or mean=N,sd=S,min=A,max=B; got {text!r}")
            fields[key.strip()] = float(value) if key.strip() == "sd" else int(value)
        if "mean" not in fields:
            raise ValueError(f"a length distribution needs a mean: {text!r}")
        lengths = cls(**fields)
        if lengths.mean < 1 or lengths.sd < 0 or lengths.min < 1 or (lengths.max and lengths.max < lengths.min):
            raise ValueError(f"need mean >= 1, sd >= 0, 1 <= min <= max: {text!r}")
        return lengths

    def sample(self, rng: random.Random) -> int:
        n = round(rng.gauss(self.mean, self.sd)) if self.sd else self.mean
        n = max(self.min, n)
        return min(self.max, n) if self.max else n

    def __str__(self) -> str:
        text = f"{self.mean}" + (f"±{self.sd:g}" if self.sd else "")
        return text + (f" [{self.min}, {self.max}]" if self.max or self.min > 1 else "")


class Synthetic:
    """Synthetic requests: a fresh prompt of a drawn length, asking for a drawn number of tokens."""

    def __init__(self, api: str, model: str, input_tokens: Lengths, output_tokens: Lengths, stream: bool = True,
                 seed: int = 0) -> None:  # fmt: skip
        if api not in APIS:
            raise ValueError(f"unknown api {api!r}; choose one of {', '.join(APIS)}")
        self.api, self.model, self.stream = api, model, stream
        self.input_tokens, self.output_tokens = input_tokens, output_tokens
        self.rng = random.Random(seed)

    def next(self, index: int) -> tuple[HttpCall, int, int]:
        """The call for request `index`, with its input length and requested output length."""
        n_in, n_out = self.input_tokens.sample(self.rng), self.output_tokens.sample(self.rng)
        words = [f"#{index}"] + [self.rng.choice(_WORDS) for _ in range(n_in - 1)]
        prompt = " ".join(words)
        body = request_body(self.api, self.model, prompt, n_out, self.stream)
        path = APIS[self.api][1]
        return (
            HttpCall("POST", path, [("content-type", "application/json")], _ENC.encode(body)),
            n_in,
            n_out,
        )


def request_body(api: str, model: str, prompt: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    if api == "messages":
        return {"model": model, "max_tokens": max_tokens, "stream": stream,
                "messages": [{"role": "user", "content": prompt}]}  # fmt: skip
    if api == "responses":
        return {"model": model, "max_output_tokens": max_tokens, "stream": stream, "input": prompt}
    body = {"model": model, "max_tokens": max_tokens, "stream": stream,
            "messages": [{"role": "user", "content": prompt}]}  # fmt: skip
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body
