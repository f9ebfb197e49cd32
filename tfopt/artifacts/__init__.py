"""Load an exported artifact and run it: one runner per engine.

TensorFlow (a SavedModel's ``serving_default``, a frozen graph), ONNX
Runtime CPU/CUDA, OpenVINO CPU and TensorRT. Export validation and
``tfopt.bench`` both run artifacts through these runners, so an artifact is
loaded the same way, and its outputs come back in the same order under the
same names, whichever of them asks.

This package sits below ``tfopt.export`` and ``tfopt.bench`` and imports
neither. Importing it imports no TensorFlow: the ONNX Runtime and OpenVINO
runners work on machines that have only those engines.

Example:
    >>> from tfopt import artifacts
    >>> for runner in artifacts.load("out/digits/model.onnx"):
    ...     print(runner.name, runner(x[:4]))
"""

from tfopt.artifacts._load import from_spec, kind, load
from tfopt.artifacts._runner import Runner, find_manifest

__all__ = ["Runner", "find_manifest", "from_spec", "kind", "load"]
