"""tfopt: make Keras models smaller and faster to serve.

Prune and quantize inside your own ``fit()``, strip, export, and measure.

Example:
    >>> import tfopt
    >>> pruned = tfopt.prune(model, tfopt.PolynomialDecay(0.0, 0.8, 0, 1000))
    >>> pruned.compile("adam", "sparse_categorical_crossentropy", ["accuracy"])
    >>> pruned.fit(x, y, epochs=5, callbacks=[tfopt.callbacks.PruningStep()])
    >>> plain = tfopt.strip(pruned)
    >>> tfopt.sparsity(plain)
"""

from tfopt import bench, callbacks, datasets, distribute, errors, examples
from tfopt.export import ExportResult, export
from tfopt._optimize import (Candidate, Distiller, OptimizeResult, Sensitivity, Target,
                             optimize, sensitivity)
from tfopt.pruning import ConstantSparsity, PolynomialDecay, prune, sparsity
from tfopt.quantization import QuantizationConfig, quantize
from tfopt._version import __version__
from tfopt.strip import strip

__all__ = [
    "Candidate",
    "ConstantSparsity",
    "Distiller",
    "ExportResult",
    "OptimizeResult",
    "PolynomialDecay",
    "QuantizationConfig",
    "Sensitivity",
    "Target",
    "__version__",
    "bench",
    "callbacks",
    "datasets",
    "distribute",
    "errors",
    "examples",
    "export",
    "optimize",
    "prune",
    "quantize",
    "sensitivity",
    "sparsity",
    "strip",
]
