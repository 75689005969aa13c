"""bench.floor's bare paths, the references under issue 21's targets, relay a stream as a relay that streams
must: its first events reach the caller before the stream ends, through the bare hop, the bare broker and the
bare gateway alike (they used to send a whole stream in one message after it ended, a floor no streaming
relay could reach). Real processes: the fake provider pacing its events, the bare relay, broker and gateway,
the official SDKs."""

from __future__ import annotations

import time

import pytest

from bench.floor import bare_paths
from broker.fake_provider import FakeProviderProcess, Latency

ASK = [{"role": "user", "content": "hi"}]
GAP = 0.15  # seconds between the fake's events: the stream takes ~1 s


@pytest.fixture(scope="module")
def slow():
    with FakeProviderProcess(Latency(gap=GAP, tokens=6)) as fake:
        yield fake


def _first_and_end(make) -> tuple[float, float, int]:
    """Seconds from the request to its first event and to its end, and the events read."""
    start, first, n = time.monotonic(), None, 0
    with make() as stream:
        for _ in stream:
            first = first or time.monotonic() - start
            n += 1
    return first, time.monotonic() - start, n


@pytest.mark.parametrize("gateway", [False, True], ids=["hop-and-broker", "gateway"])
def test_a_stream_through_a_bare_path_arrives_as_it_comes_and_a_plain_answer_whole(slow, gateway):
    with bare_paths({"fake": slow, "plain": slow}, gateway=gateway) as (paths, _):
        for path in paths:
            clients = path.upstreams["fake"]
            first, end, n = _first_and_end(lambda c=clients: c.anthropic.messages.create(
                model="claude-bench", max_tokens=6, messages=ASK, stream=True))  # fmt: skip
            assert n >= 6 + 4, path.name  # message_start, block start/stop, 6 deltas, message_delta, stop
            assert first < end - 3 * GAP, (path.name, first, end)  # the first event long before the last
            chat = _first_and_end(lambda c=clients: c.openai.chat.completions.create(
                model="gpt-bench", max_completion_tokens=6, messages=ASK, stream=True))  # fmt: skip
            assert chat[0] < chat[1] - 3 * GAP, (path.name, chat)
            count = clients.anthropic.messages.count_tokens(model="claude-bench", messages=ASK)
            assert count.input_tokens > 0
            again = clients.anthropic.messages.create(model="claude-bench", max_tokens=6, messages=ASK)
            assert again.content[0].text  # a plain answer after streams: the socket is in step
