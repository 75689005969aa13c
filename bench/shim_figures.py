"""The drop-in shim's figures, each next to the direct SDK measured in the same run:

- overhead: a tiny non-streaming call (Anthropic `messages.count_tokens`, OpenAI
  `chat.completions.create` with one output token) through the shim vs direct, median and p99;
- stream throughput: one long stream (events/s) direct, through the shim, and through
  the HTTP gateway.

    python -m bench.shim_figures [--repeat 200] [--tokens 5000] [--json results.json]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("ANTHROPIC_API_KEY", "bench-key")
os.environ.setdefault("OPENAI_API_KEY", "bench-key")

import anthropic  # noqa: E402
import openai  # noqa: E402

from broker import Pool  # noqa: E402
from broker.fake_provider import FakeProviderProcess  # noqa: E402
from broker.shim import Anthropic, OpenAI  # noqa: E402

from .common import alternate, emit, machine, median_ms, p99_ms  # noqa: E402

ASK = [{"role": "user", "content": "hi"}]


def events_per_second(make_stream, tokens: int) -> float:
    start = time.perf_counter()
    count = sum(1 for _ in make_stream())
    return round(count / (time.perf_counter() - start), 1) if count >= tokens else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=5000, help="events of the long stream")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    results: dict[str, object] = {"machine": machine()}
    with FakeProviderProcess() as fake:
        profiles = {
            "anthropic": {"kind": "anthropic", "base_url": fake.url, "min_workers": 2},
            "openai": {"kind": "openai", "base_url": fake.url + "/v1", "min_workers": 2},
        }
        with Pool(profiles=profiles, http="127.0.0.1:0") as pool:
            direct_a, shim_a = anthropic.Anthropic(base_url=fake.url, max_retries=0), Anthropic(pool=pool)
            direct_o, shim_o = openai.OpenAI(base_url=fake.url + "/v1", max_retries=0), OpenAI(pool=pool)
            gate_a = anthropic.Anthropic(base_url=pool.http_url, max_retries=0)
            calls = {
                "anthropic count_tokens": lambda c: c.messages.count_tokens(model="claude-bench", messages=ASK),
                "openai chat (1 token)": lambda c: c.chat.completions.create(
                    model="gpt-bench", messages=ASK, max_completion_tokens=1),
            }  # fmt: skip
            for (name, call), (direct, shim) in zip(
                calls.items(), [(direct_a, shim_a), (direct_o, shim_o)], strict=True
            ):
                pooled, plain = alternate(lambda c=shim, f=call: f(c), lambda c=direct, f=call: f(c), args.repeat)
                results[f"overhead {name} ms"] = {
                    "shim_median": median_ms(pooled), "direct_median": median_ms(plain),
                    "added_median": round(median_ms(pooled) - median_ms(plain), 3),
                    "shim_p99": p99_ms(pooled), "direct_p99": p99_ms(plain),
                }  # fmt: skip
            latency = {"extra_headers": {"x-isopool-latency": f"tokens={args.tokens}"}}
            long = dict(model="claude-bench", max_tokens=args.tokens, messages=ASK, stream=True, **latency)
            rates = {
                name: events_per_second(lambda c=client: c.messages.create(**long), args.tokens)
                for name, client in (("direct", direct_a), ("shim", shim_a), ("gateway", gate_a))
            }
            results["anthropic stream events/s"] = rates | {
                "shim_ratio": round(rates["shim"] / rates["direct"], 3),
                "gateway_ratio": round(rates["gateway"] / rates["direct"], 3),
            }
            for client in (direct_a, shim_a, direct_o, shim_o, gate_a):
                client.close()
    emit(results, args.json)


if __name__ == "__main__":
    main()
