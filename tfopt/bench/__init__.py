"""Measurement: latency, throughput, memory, size and accuracy of models and exported artifacts."""

from tfopt.artifacts._runner import Runner
from tfopt.bench._api import BenchReport, BenchRow, run, runners_for
from tfopt.bench._timing import Timing, measure

__all__ = ["BenchReport", "BenchRow", "Runner", "Timing", "measure", "run", "runners_for"]
