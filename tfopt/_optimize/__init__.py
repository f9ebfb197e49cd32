"""`tfopt.optimize` and its parts: `Target`, `sensitivity`, `Distiller`."""

from tfopt._optimize._api import Candidate, OptimizeResult, optimize
from tfopt._optimize._distill import Distiller
from tfopt._optimize._sensitivity import Sensitivity, sensitivity
from tfopt._optimize._target import Target

__all__ = ["Candidate", "Distiller", "OptimizeResult", "Sensitivity", "Target", "optimize",
           "sensitivity"]
