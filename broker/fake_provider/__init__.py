"""A fault-injecting fake of the Anthropic and OpenAI HTTP APIs, for the demo, tests and benchmarks."""

from .faults import FAULT_HEADER, KINDS, LATENCY_HEADER, FaultPlan, parse_fault
from .process import FakeProviderProcess
from .server import FakeProvider, Latency

__all__ = [
    "FAULT_HEADER",
    "KINDS",
    "LATENCY_HEADER",
    "FakeProvider",
    "FakeProviderProcess",
    "FaultPlan",
    "Latency",
    "parse_fault",
]
