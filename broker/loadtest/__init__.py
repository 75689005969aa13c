"""`isopool loadtest`: load tests of Anthropic- and OpenAI-compatible endpoints from the pool.

from broker.loadtest import Options, run
results = run(Options(concurrency=[64, 256], requests=2000), "out/")
"""

from .report import rebuild
from .runner import Options, run

__all__ = ["Options", "rebuild", "run"]
