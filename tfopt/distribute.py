"""Fine-tuning on several machines: which worker writes, and Keras 3's multi-worker fit().

Pruning and QAT run inside ``fit()``, so they run under whatever
``tf.distribute`` strategy the model was built in. Two things need help:

* **Keras 3's fit() fails under MultiWorkerMirroredStrategy** before tfopt
  is involved (keras-team/keras#20585). :func:`multi_worker_fixes` mends the
  two spots, inside a ``with`` block, on the Keras versions it was tested on.
* **Every worker runs the same script.** Only the chief may write what is
  shared: :func:`tfopt.export` writes nothing on the other workers (its
  result says so), and :func:`worker_path` gives each of them a path of its
  own for checkpoints, which Keras 3 does not do.

Example:
    >>> strategy = tf.distribute.MultiWorkerMirroredStrategy()  # TF_CONFIG names the workers
    >>> with strategy.scope():
    ...     pruned = tfopt.prune(model, tfopt.PolynomialDecay(0.0, 0.8, 0, 1000))
    ...     pruned.compile("adam", "sparse_categorical_crossentropy", ["accuracy"])
    >>> backup = keras.callbacks.BackupAndRestore(tfopt.distribute.worker_path("ckpt/backup"))
    >>> with tfopt.distribute.multi_worker_fixes():
    ...     pruned.fit(dataset, epochs=5, callbacks=[tfopt.callbacks.PruningStep(), backup])
    >>> tfopt.export(tfopt.strip(pruned), "out/model")  # written by the chief only
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator, Optional, Union

from tfopt import _compat

__all__ = ["Worker", "current_worker", "is_chief", "multi_worker_fixes", "worker_path"]


class Worker:
    """One task of a cluster: its type (``"chief"``, ``"worker"``, ...) and index."""

    def __init__(self, task_type: Optional[str], task_id: int, has_chief: bool):
        self.task_type = task_type
        self.task_id = task_id
        self.has_chief = has_chief

    @property
    def is_chief(self) -> bool:
        """TensorFlow's rule: the ``chief`` task, or worker 0 of a cluster without one;
        a process outside any cluster is its own chief."""
        if self.task_type is None or self.task_type == "chief":
            return True
        return self.task_type == "worker" and self.task_id == 0 and not self.has_chief

    def __str__(self) -> str:
        return "single process" if self.task_type is None else f"{self.task_type} {self.task_id}"

    def __repr__(self) -> str:
        return f"Worker({self.task_type!r}, {self.task_id}, chief={self.is_chief})"


def current_worker(strategy=None) -> Worker:
    """This process's task, from ``strategy``'s cluster resolver or else ``TF_CONFIG``.

    Args:
        strategy: A ``tf.distribute`` strategy (default: the one in scope, if
            it has a cluster resolver).
    """
    if strategy is None:
        import tensorflow as tf

        strategy = tf.distribute.get_strategy()
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is not None and getattr(resolver, "task_type", None):
        spec = resolver.cluster_spec().as_dict()
        return Worker(resolver.task_type, int(resolver.task_id or 0), "chief" in spec)
    config = os.environ.get("TF_CONFIG")
    if not config:
        return Worker(None, 0, False)
    try:
        parsed = json.loads(config)
        task = parsed.get("task") or {}
        cluster = parsed.get("cluster") or {}
    except (ValueError, AttributeError) as exc:
        from tfopt.errors import ConfigError

        raise ConfigError(f"TF_CONFIG is not the JSON TensorFlow expects ({exc}): "
                          f"{config[:200]!r}.") from exc
    if not task.get("type"):
        return Worker(None, 0, "chief" in cluster)
    return Worker(task["type"], int(task.get("index", 0)), "chief" in cluster)


def is_chief(strategy=None) -> bool:
    """Whether this process writes what the cluster shares (see :class:`Worker`)."""
    return current_worker(strategy).is_chief


def worker_path(path: Union[str, os.PathLike], strategy=None) -> Path:
    """``path`` on the chief; on every other worker, a path of its own beside it.

    For checkpoints and backups (``keras.callbacks.BackupAndRestore``,
    ``ModelCheckpoint``): Keras 3 writes them on every worker, and workers
    that share a file system then collide on one file. Synchronous training
    keeps every worker's weights identical, so each worker's copy is the
    same; the others' are kept (a restarted worker resumes from its own) and
    named ``<name>.worker-<index>`` beside the chief's.

    Example:
        >>> backup = keras.callbacks.BackupAndRestore(tfopt.distribute.worker_path("ckpt"))
    """
    path = Path(path)
    worker = current_worker(strategy)
    if worker.is_chief:
        return path
    return path.with_name(f"{path.name}.{worker.task_type}-{worker.task_id}")


@contextlib.contextmanager
def multi_worker_fixes() -> Iterator[None]:
    """Let Keras 3's ``fit()`` run under ``MultiWorkerMirroredStrategy``.

    Keras 3's TensorFlow trainer fails there before the first step
    (keras-team/keras#20585, tensorflow#72388): it averages the first
    distributed batch eagerly to build the model, and it averages the scalar
    loss and metrics along an axis they do not have. Inside this block both
    are mended; other strategies and single-process training are unchanged,
    and everything is restored on exit. Tested on Keras 3.15; other versions
    raise :class:`tfopt.errors.ConfigError`, so that an upstream change is
    noticed. ``tf_keras`` models (tfmot) do not need it.

    Example:
        >>> with tfopt.distribute.multi_worker_fixes():
        ...     model.fit(dataset, epochs=3, callbacks=[tfopt.callbacks.PruningStep()])
    """
    with _compat.keras_multi_worker_fixes():
        yield
