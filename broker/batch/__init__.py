"""Batch jobs: provider batch files through the pool, exactly once per custom_id, resumable."""

from .cluster import RayOptions, RayUnavailable
from .formats import OPENAI_URLS
from .jobs import JobContext, load_job, run_job
from .runner import BatchInputError, Summary, iter_results, load, run

__all__ = [
    "OPENAI_URLS",
    "BatchInputError",
    "JobContext",
    "RayOptions",
    "RayUnavailable",
    "Summary",
    "iter_results",
    "load",
    "load_job",
    "run",
    "run_job",
]
