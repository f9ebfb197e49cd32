"""Magnitude pruning, unstructured and N:M structured, inside the user's ``fit()``."""

from tfopt.pruning._api import is_pruned, prune, sparsity, strip_pruning
from tfopt._prunable import is_prunable
from tfopt.pruning._schedules import ConstantSparsity, PolynomialDecay, PruningSchedule
from tfopt.pruning._wrapper import PruneLowMagnitude

__all__ = [
    "ConstantSparsity",
    "PolynomialDecay",
    "PruneLowMagnitude",
    "PruningSchedule",
    "is_prunable",
    "is_pruned",
    "prune",
    "sparsity",
    "strip_pruning",
]
