"""The names the traces and metrics are emitted under: one table per version of the GenAI semantic
conventions, chosen once when the broker starts.

The default is semantic-conventions v1.41.0, the last release before the GenAI conventions moved to
their own repository. As the conventions' transition plan asks, an instrumentation keeps its names by
default and emits the latest experimental version instead (not as well) when OTEL_SEMCONV_STABILITY_OPT_IN
(comma-separated) holds `gen_ai_latest_experimental`: here semantic-conventions-genai v0.1.0
(docs/gen-ai/client-inference.md, client-embeddings.md, gen-ai-token-metrics.md and its migration
guide): inference metrics `gen_ai.client.inference.*`, token usage as one counter per kind of token
(by `gen_ai.token.modality`, `unknown` here: the providers do not say) beside per-operation histograms,
embeddings their own `gen_ai.client.embeddings.*`, `gen_ai.usage.cache_write.input_tokens` for
`.cache_creation.`, cache counts only when not 0, `gen_ai.request.stream` only when true, and a
stream's `gen_ai.response.time_to_first_chunk` on its span.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

LATEST = "gen_ai_latest_experimental"

# Bucket boundaries, as the conventions give them.
SECONDS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TOKENS = tuple(4**i for i in range(14))  # 1, 4, 16, ... 67108864
# (v1.41.0 gives none for time per output chunk: those of the server's time_per_output_token)
CHUNK_SECONDS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str
    description: str
    buckets: tuple[float, ...] = ()  # a histogram's; none: a counter


@dataclass(frozen=True)
class Tokens:
    """One token instrument: the Spent count it records, with these attributes (and error.type or not)."""

    metric: Metric
    count: str  # input_tokens, output_tokens, cache_read_tokens, cache_write_tokens (Spent's fields)
    attributes: tuple[tuple[str, str], ...] = ()
    with_error: bool = True


@dataclass(frozen=True)
class Operation:
    """The metrics of one kind of operation: its duration and its token instruments."""

    duration: Metric
    tokens: tuple[Tokens, ...]


@dataclass(frozen=True)
class Conventions:
    version: str
    usage: tuple[tuple[str, str, bool], ...]  # (span attribute, Spent's field, set when 0)
    stream_when_false: bool  # gen_ai.request.stream=false on a call that does not stream
    first_chunk_attribute: str  # the span's time to first chunk ("": none)
    first_chunk: Metric
    per_chunk: Metric
    default: Operation
    operations: dict[str, Operation] = field(default_factory=dict)  # by gen_ai.operation.name, else default

    def operation(self, name: str) -> Operation:
        return self.operations.get(name, self.default)

    def metrics(self) -> list[Metric]:
        """Every instrument, once each."""
        found = [self.first_chunk, self.per_chunk]
        for operation in (self.default, *self.operations.values()):
            found += [operation.duration, *(tokens.metric for tokens in operation.tokens)]
        return list(dict.fromkeys(found))


def _usage(cache_write: str, cache_when_zero: bool) -> tuple[tuple[str, str, bool], ...]:
    return (
        ("gen_ai.usage.input_tokens", "input_tokens", True),
        ("gen_ai.usage.output_tokens", "output_tokens", True),
        ("gen_ai.usage.cache_read.input_tokens", "cache_read_tokens", cache_when_zero),
        (cache_write, "cache_write_tokens", cache_when_zero),
    )


def _streaming(prefix: str, per_chunk_buckets: tuple[float, ...]) -> dict[str, Metric]:
    """A stream's two metrics, named under `prefix`."""
    return {
        "first_chunk": Metric(f"{prefix}.time_to_first_chunk", "s", "Time to receive the first chunk", SECONDS),
        "per_chunk": Metric(f"{prefix}.time_per_output_chunk", "s", "Time per output chunk after the first",
                            per_chunk_buckets),
    }  # fmt: skip


_TOKEN_USAGE = Metric("gen_ai.client.token.usage", "{token}", "Number of input and output tokens used", TOKENS)

V1_41 = Conventions(
    version="semantic-conventions v1.41.0",
    usage=_usage("gen_ai.usage.cache_creation.input_tokens", cache_when_zero=True),
    stream_when_false=True,
    first_chunk_attribute="",
    **_streaming("gen_ai.client.operation", per_chunk_buckets=CHUNK_SECONDS),
    default=Operation(
        Metric("gen_ai.client.operation.duration", "s", "GenAI operation duration", SECONDS),
        (
            Tokens(_TOKEN_USAGE, "input_tokens", (("gen_ai.token.type", "input"),)),
            Tokens(_TOKEN_USAGE, "output_tokens", (("gen_ai.token.type", "output"),)),
        ),
    ),  # fmt: skip
)


def _counter(kind: str, description: str) -> Metric:
    return Metric(f"gen_ai.client.inference.usage.{kind}", "{token}", description)


_UNKNOWN = (("gen_ai.token.modality", "unknown"),)  # the providers' usage is not broken down by modality
_INFERENCE = Operation(
    Metric("gen_ai.client.inference.duration", "s", "GenAI client inference operation duration", SECONDS),
    (
        Tokens(_counter("input_tokens", "The number of input (prompt) tokens used, including cached tokens"),
               "input_tokens", _UNKNOWN, with_error=False),
        Tokens(_counter("output_tokens", "The number of output (completion) tokens used, including reasoning tokens"),
               "output_tokens", _UNKNOWN, with_error=False),
        Tokens(_counter("cache_read.input_tokens", "The number of input tokens served from a provider-managed cache"),
               "cache_read_tokens", _UNKNOWN, with_error=False),
        Tokens(_counter("cache_write.input_tokens", "The number of input tokens written to a provider-managed cache"),
               "cache_write_tokens", _UNKNOWN, with_error=False),
        Tokens(Metric("gen_ai.client.inference.operation.input_tokens", "{token}",
                      "The number of input (prompt) tokens used per inference operation", TOKENS), "input_tokens"),
        Tokens(Metric("gen_ai.client.inference.operation.output_tokens", "{token}",
                      "The number of output (completion) tokens used per inference operation", TOKENS),
               "output_tokens"),
    ),
)  # fmt: skip
_EMBEDDINGS = Operation(
    Metric("gen_ai.client.embeddings.duration", "s", "GenAI client embeddings operation duration", SECONDS),
    (Tokens(Metric("gen_ai.client.embeddings.operation.input_tokens", "{token}",
                   "The number of input tokens used per embeddings operation", TOKENS), "input_tokens"),),
)  # fmt: skip

V0_1_0 = Conventions(
    version="semantic-conventions-genai v0.1.0",
    usage=_usage("gen_ai.usage.cache_write.input_tokens", cache_when_zero=False),
    stream_when_false=False,
    first_chunk_attribute="gen_ai.response.time_to_first_chunk",
    **_streaming("gen_ai.client.inference", per_chunk_buckets=SECONDS),
    # other operations (models.list, a path of its own) keep gen_ai.client.operation.duration, and no tokens
    default=Operation(V1_41.default.duration, ()),
    operations={
        "chat": _INFERENCE,
        "text_completion": _INFERENCE,
        "generate_content": _INFERENCE,
        "embeddings": _EMBEDDINGS,
    },  # fmt: skip
)


def from_environment() -> Conventions:
    """v0.1.0 when OTEL_SEMCONV_STABILITY_OPT_IN holds gen_ai_latest_experimental, else v1.41.0."""
    opted = {value.strip().lower() for value in os.environ.get("OTEL_SEMCONV_STABILITY_OPT_IN", "").split(",")}
    return V0_1_0 if LATEST in opted else V1_41
