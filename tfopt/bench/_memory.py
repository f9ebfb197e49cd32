"""Peak memory of each engine while serving: a fresh process per runner."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)


def peak_memory(runner, feed: Sequence[np.ndarray], calls: int = 10,
                timeout: float = 600) -> Optional[dict]:
    """``{"peak_rss_bytes", "device_bytes"}`` of ``runner`` serving ``feed``-shaped batches.

    The runner is loaded again in a new Python process (from its ``spec``)
    that imports only what that engine needs, runs ``calls`` batches, and
    reports its resident memory high-water mark (and, on CUDA, the device
    memory it holds). None for runners that cannot be loaded elsewhere (a
    Keras model in memory) or when the probe fails.
    """
    if runner.spec is None:
        return None
    from tfopt.artifacts import _probe

    spec = {"runner": runner.spec, "calls": calls,
            "inputs": [[list(a.shape), a.dtype.name] for a in feed]}
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    try:
        done = subprocess.run([sys.executable, str(Path(_probe.__file__)), json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        logger.warning("Memory probe of %s timed out.", runner.name)
        return None
    if done.returncode != 0:
        logger.warning("Memory probe of %s failed: %s", runner.name,
                       done.stderr.strip().splitlines()[-1:] or done.returncode)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])
