"""Exceptions raised by tfopt.

Every user-facing mistake raises a subclass of :class:`ValueError` or
:class:`TypeError`, so code that already catches those keeps working, and each
message names the value received and how to fix it.
"""


class TfoptError(Exception):
    """Base class of every exception tfopt raises on purpose."""


class NotAKerasModelError(TfoptError, TypeError):
    """An argument that must be a Keras model (Keras 3 or tf_keras) is not one."""


class ConfigError(TfoptError, ValueError):
    """A configuration value (schedule, pattern, option) is out of range."""


class ModelNotBuiltError(TfoptError, ValueError):
    """The model has no weights yet, so its layers cannot be inspected."""


class NothingToPruneError(TfoptError, ValueError):
    """`tfopt.prune` found no layer that it can prune."""


class AlreadyPrunedError(TfoptError, ValueError):
    """The model already carries pruning wrappers."""


class IncompatibleShapeError(TfoptError, ValueError):
    """A weight's shape does not allow the requested sparsity pattern."""


class PruningStepMissingError(TfoptError, ValueError):
    """A pruned model is being trained without `tfopt.callbacks.PruningStep`."""


class UnsupportedLayerError(TfoptError, ValueError):
    """A layer that the requested operation cannot handle."""


class UnsupportedModelError(TfoptError, ValueError):
    """A model whose kind (subclassed, say) the requested operation cannot handle."""


class ExportValidationError(TfoptError, ValueError):
    """An exported artifact's outputs drifted from the Keras model's.

    ``format``: the artifact that failed (``"onnx"``, ...), where known.
    """

    format = None


class AlreadyQuantizedError(TfoptError, ValueError):
    """The model already carries quantization wrappers."""


class NothingToQuantizeError(TfoptError, ValueError):
    """`tfopt.quantize` found no layer that it can quantize."""


class ArtifactExistsError(TfoptError, ValueError):
    """An export would overwrite existing artifacts and ``overwrite`` is False."""


class BackendUnavailableError(TfoptError, RuntimeError):
    """A format needs a package or build that this environment does not have."""


class ExportWriteError(TfoptError, OSError):
    """An export cannot be written: a full disk, a read-only folder, a file in the way.

    An ``OSError`` (code catching those keeps working), raised only after the
    directory was put back as it was.
    """


class ArtifactLoadError(TfoptError, ValueError):
    """A model or artifact file that cannot be read (truncated, not what its name says)."""


class ModelOutputsNaNError(ExportValidationError):
    """The Keras model itself outputs NaN or infinity on the validation data."""
