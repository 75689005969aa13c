"""A small tool-using agent, run once per input line by `isopool batch --job`:

    isopool fake-provider --port 8765 &
    ANTHROPIC_BASE_URL=http://127.0.0.1:8765 ANTHROPIC_API_KEY=fake \\
        isopool batch examples/questions.jsonl -o answers.jsonl --job examples.weather_agent:run

Each line is {"custom_id": ..., "question": ...}. The model (the fake provider here)
calls the tools one turn at a time; every call goes through the pool, so a stalled
turn is retried on a fresh worker while the rest of the run carries on.
"""

from __future__ import annotations

from typing import Any

TOOLS = [
    {
        "name": "find_city",
        "description": "The city a question is about.",
        "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
    },
    {
        "name": "get_weather",
        "description": "Today's weather in a city.",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
    {
        "name": "convert_units",
        "description": "Degrees Celsius to Fahrenheit.",
        "input_schema": {"type": "object", "properties": {"celsius": {"type": "number"}}, "required": ["celsius"]},
    },
]


def find_city(text: str) -> str:
    return text.split()[-1].strip("?.!") or "Paris"


def get_weather(city: str) -> str:
    return f"{city}: 21 degrees Celsius, sunny"


def convert_units(celsius: float) -> str:
    return f"{celsius * 9 / 5 + 32:.1f} F"


IMPLEMENTATIONS = {"find_city": find_city, "get_weather": get_weather, "convert_units": convert_units}


def run(line: dict[str, Any], ctx: Any, max_turns: int = 20) -> dict[str, Any]:
    """Loop until the model answers in text; `line["extra_headers"]` (optional) goes with every call."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": line["question"]}]
    extra = {"extra_headers": line["extra_headers"]} if line.get("extra_headers") else {}
    for turn in range(1, max_turns + 1):
        reply = ctx.anthropic.messages.create(
            model=line.get("model", "claude-fake"), max_tokens=256, tools=TOOLS, messages=messages, **extra
        )
        if reply.stop_reason != "tool_use":
            return {"answer": "".join(b.text for b in reply.content if b.type == "text"), "turns": turn}
        messages.append({"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in reply.content]})
        results = [
            {"type": "tool_result", "tool_use_id": b.id, "content": IMPLEMENTATIONS[b.name](**b.input)}
            for b in reply.content
            if b.type == "tool_use"
        ]
        messages.append({"role": "user", "content": results})
    raise RuntimeError(f"no answer after {max_turns} turns")
