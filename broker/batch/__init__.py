"""Batch jobs: provider batch files through the pool, exactly once per custom_id, resumable."""

from .formats import OPENAI_URLS
from .runner import BatchInputError, Summary, iter_results, load, run

__all__ = ["OPENAI_URLS", "BatchInputError", "Summary", "iter_results", "load", "run"]
