"""One worker of tests/test_multi_worker.py's two-worker cluster (TF_CONFIG names it).

Usage: python multi_worker_job.py MODE OUT EPOCHS [KILL_AFTER_EPOCH]

NO_FIXES=1 in the environment trains without tfopt.distribute.multi_worker_fixes().
MODE is "prune" (unstructured pruning with PruningStep, 4 steps an epoch, the
schedule ending at step 12: a kill after epoch 1 is mid-schedule) or "qat". Each worker
trains the digits CNN under MultiWorkerMirroredStrategy inside
tfopt.distribute.multi_worker_fixes(), backs up through BackupAndRestore at a
path of its own (tfopt.distribute.worker_path), writes every variable it ends
with to OUT/weights-<index>.npz and calls tfopt.export, recording what it
returned in OUT/export-<index>.json. With KILL_AFTER_EPOCH, the process exits
with status 17 at the end of that epoch (0-based), after the backup.
"""

import contextlib
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfopt  # noqa: E402
from tfopt.examples import compile_classifier, digits_cnn  # noqa: E402

KILLED = 17


class FirstEpoch(keras.callbacks.Callback):
    """Records the epoch training starts at: past 0 when BackupAndRestore resumed."""

    def __init__(self, path):
        super().__init__()
        self.path = path

    def on_epoch_begin(self, epoch, logs=None):
        if not os.path.exists(self.path):
            with open(self.path, "w") as handle:
                handle.write(str(epoch))


class Kill(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            sys.stdout.flush()
            os._exit(KILLED)


def main(mode: str, out: str, epochs: int, kill_after=None) -> None:
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    worker = tfopt.distribute.current_worker(strategy)
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 10, 128)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(32).with_options(options)

    callbacks = []
    with strategy.scope():
        if mode == "prune":
            model = tfopt.prune(digits_cnn(), tfopt.PolynomialDecay(0.0, 0.7, 0, 12, frequency=2))
            callbacks.append(tfopt.callbacks.PruningStep())
        else:
            model = tfopt.quantize(digits_cnn(), calibration_data=x[:32])
        compile_classifier(model)
    backup = tfopt.distribute.worker_path(os.path.join(out, "backup"), strategy)
    callbacks.append(keras.callbacks.BackupAndRestore(str(backup)))
    callbacks.append(FirstEpoch(os.path.join(out, f"first-epoch-{worker.task_id}")))
    if kill_after is not None:
        callbacks.append(Kill(kill_after))
    fixes = (tfopt.distribute.multi_worker_fixes() if not os.environ.get("NO_FIXES")
             else contextlib.nullcontext())
    with fixes:
        model.fit(data, epochs=epochs, verbose=0, callbacks=callbacks)

    np.savez(os.path.join(out, f"weights-{worker.task_id}.npz"),
             **{f"{i}:{v.path}": v.numpy() for i, v in enumerate(model.weights)})
    exported = model if mode == "qat" else tfopt.strip(model)
    result = tfopt.export(exported, os.path.join(out, "export"), formats=("onnx",),
                          validation_data=x[:16], overwrite=True)
    with open(os.path.join(out, f"export-{worker.task_id}.json"), "w") as handle:
        json.dump({"worker": str(worker), "chief": worker.is_chief, "skipped": result.skipped,
                   "paths": {k: str(v) for k, v in result.paths.items()}}, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]),
         int(sys.argv[4]) if len(sys.argv) > 4 else None)
