"""Keep third-party chatter out of the user's terminal during tfopt's own calls.

tf2onnx logs its progress and TensorFlow/Keras log deprecation notes on every
export; they say nothing the user can act on. Around such calls their
loggers are raised to ERROR and their deprecation warnings dropped; both are
restored afterwards, so nothing changes outside the call.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Iterator

NOISY_LOGGERS = ("tf2onnx", "tensorflow", "absl", "onnx", "onnxconverter_common", "h5py")


@contextlib.contextmanager
def third_party_quiet() -> Iterator[None]:
    """Silence third-party INFO/WARNING logs and deprecation warnings inside the block."""
    saved = {}
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        saved[name] = logger.level
        if logger.getEffectiveLevel() < logging.ERROR:
            logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
                warnings.filterwarnings("ignore", category=category)
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
