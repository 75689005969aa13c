"""Batch jobs: provider batch files through the pool, exactly once per custom_id, resumable."""

from .cluster import RayOptions, RayUnavailable
from .formats import OPENAI_URLS
from .jobs import JobContext, load_job, run_job
from .ledger import BatchOutputError, InputChanged, OutputDamaged, OutputLocked, OutputWriteFailed
from .runner import BatchInputError, BatchOptionError, Summary, iter_results, load, run

__all__ = [
    "OPENAI_URLS",
    "BatchInputError",
    "BatchOptionError",
    "BatchOutputError",
    "InputChanged",
    "JobContext",
    "OutputDamaged",
    "OutputLocked",
    "OutputWriteFailed",
    "RayOptions",
    "RayUnavailable",
    "Summary",
    "iter_results",
    "load",
    "load_job",
    "run",
    "run_job",
]
