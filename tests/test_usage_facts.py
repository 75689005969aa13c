"""What the worker reads of an answer as its events pass the stream check (worker/usage.py): one decode
per event gives the check its end and the attempt its usage, id, model and finish reasons."""

from __future__ import annotations

import json

from broker.protocol import MAX_HEADER_BYTES, Codec, Kind
from worker.hygiene import AnthropicCheck, ChatCheck, ResponsesCheck
from worker.usage import Facts


def events(*pairs: tuple[str, dict]) -> list[tuple[str, bytes]]:
    return [(name, json.dumps(data).encode()) for name, data in pairs]


def test_anthropic_usage_is_cumulative_and_counts_the_cache_in_the_input():
    check = AnthropicCheck()
    start = {
        "type": "message_start",
        "message": {
            "id": "msg_1",
            "model": "claude-x",
            "usage": {
                "input_tokens": 10,
                "cache_read_input_tokens": 100,
                "cache_creation_input_tokens": 5,
                "output_tokens": 1,
            },
        },
    }
    delta = {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn"},
        "usage": {"output_tokens": 42, "input_tokens": None, "cache_read_input_tokens": None},
    }
    kept = check.filter(events(("message_start", start), ("content_block_delta", {"type": "content_block_delta",
                        "index": 0, "delta": {"type": "text_delta", "text": "hi"}}), ("message_delta", delta),
                        ("message_stop", {"type": "message_stop"})))  # fmt: skip
    assert len(kept) == 4 and check.ended  # a null in the usage hides neither the event nor the end
    spent = check.facts.spent(7)
    assert (spent.input_tokens, spent.output_tokens, spent.cache_read_tokens, spent.cache_write_tokens) == (
        115,
        42,
        100,
        5,
    )
    assert (spent.rid, spent.response_id, spent.response_model, spent.finish_reasons) == (7, "msg_1", "claude-x",
                                                                                          ["end_turn"])  # fmt: skip
    assert not check.facts.changed  # sent: nothing new until the next change


USAGE = {"prompt_tokens": 30, "completion_tokens": 9, "prompt_tokens_details": {"cached_tokens": 20}}


def test_chat_reads_each_choices_finish_reason_and_the_usage_chunk():
    check = ChatCheck(n=2)
    head = {"id": "chatcmpl-1", "model": "gpt-x"}
    check.filter(events(("", {**head, "choices": [{"index": 0, "delta": {"content": "a"}}]})))
    assert check.facts.changed and check.facts.model == "gpt-x" and check.facts.output is None
    check.facts.spent(1)
    check.filter(events(("", {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"},
                                                   {"index": 1, "delta": {}, "finish_reason": "length"}]}),
                        ("", {**head, "choices": [], "usage": USAGE})))  # fmt: skip
    spent = check.facts.spent(1)
    assert check.ended and spent.finish_reasons == ["stop", "length"]
    assert (spent.input_tokens, spent.output_tokens, spent.cache_read_tokens) == (30, 9, 20)


def test_responses_reads_the_completed_response():
    check = ResponsesCheck()
    response = {
        "id": "resp_1",
        "model": "gpt-x",
        "status": "completed",
        "output": [{"type": "message"}],
        "usage": {"input_tokens": 12, "output_tokens": 3, "input_tokens_details": {"cached_tokens": 0}},
    }
    check.filter(events(("response.created", {"type": "response.created", "response": {**response, "usage": None,
                                                                                         "status": "in_progress"}}),
                        ("response.completed", {"type": "response.completed", "response": response})))  # fmt: skip
    spent = check.facts.spent(1)
    assert check.ended and (spent.response_id, spent.input_tokens, spent.output_tokens) == ("resp_1", 12, 3)
    assert spent.finish_reasons == ["completed"]


def test_a_plain_body_is_read_once_and_one_of_another_shape_says_nothing():
    facts = Facts()
    facts.body(json.dumps({"id": "chatcmpl-2", "model": "gpt-x", "choices": [{"finish_reason": "stop"}],
                           "usage": {"prompt_tokens": 5, "completion_tokens": 2}}).encode())  # fmt: skip
    assert (facts.input, facts.output, facts.finish, facts.id) == (5, 2, ["stop"], "chatcmpl-2")
    other = Facts()
    for body in (b"not json", b'{"usage": "lots"}', b'{"input_tokens": 12}'):  # count_tokens' answer is no usage
        other.body(body)
    assert not other.changed and other.input is None  # not reported


def test_what_one_attempt_says_stays_small_whatever_the_provider_sends():
    facts = Facts()
    facts.name("i" * 10_000, "m" * 10_000)
    for _ in range(100):
        facts.finished("stop" * 1000)
    assert len(facts.id) == len(facts.model) == 256 and len(facts.finish) == 16
    assert len(Codec().frames(Kind.USAGE, facts.spent(2**40))[1]) < MAX_HEADER_BYTES / 2


def test_a_count_the_provider_did_not_report_is_none_not_zero():
    """Found by verify22: a Chat stream without include_usage was sent on as 0 tokens, an OpenAI answer as a
    cache write of 0 (OpenAI never reports one)."""
    check = ChatCheck(n=1)
    head = {"id": "chatcmpl-1", "model": "gpt-x"}
    check.filter(events(("", {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})))
    spent = check.facts.spent(1)
    assert (spent.input_tokens, spent.output_tokens, spent.cache_read_tokens, spent.cache_write_tokens) == (None,) * 4
    check.filter(events(("", {**head, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}})))
    spent = check.facts.spent(1)
    assert (spent.input_tokens, spent.output_tokens, spent.cache_read_tokens, spent.cache_write_tokens) == (
        3,
        2,
        None,
        None,
    )
