"""Time per training step: plain fit vs tfopt-pruned fit vs tfmot-pruned fit.

The same CNN (tfopt.examples.digits_cnn) and data (scikit-learn digits,
upsampled to --size pixels so the step does real work) are trained three
ways in one process, interleaved round by round so machine noise hits all
three alike:

* ``keras``: Keras 3 ``fit`` of the dense model;
* ``tfopt``: Keras 3 ``fit`` of ``tfopt.prune(model, PolynomialDecay)`` with
  ``tfopt.callbacks.PruningStep()``;
* ``tfmot``: tf_keras ``fit`` of ``tfopt.prune`` on a tf_keras model (tfmot's
  ``prune_low_magnitude`` with ``UpdatePruningStep``).

Each round times one epoch per way with a callback that records the gap
between consecutive ``on_train_batch_end`` calls; the first epoch (tracing)
is discarded. Medians over all steps of all rounds are printed, with ratios.

Usage: python benchmarks/pruning_overhead.py [--rounds 20] [--batch-size 64] [--size 8] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

import tfopt  # noqa: E402
from tfopt.examples import digits_cnn  # noqa: E402
from tfopt.targets import _cpu_int8  # noqa: E402


class StepTimer:
    """Records wall time between consecutive train batches (Keras 3 and tf_keras)."""

    def __init__(self, base):
        timer = self

        class _Callback(base):
            def on_epoch_begin(self, epoch, logs=None):
                timer.last = time.perf_counter()

            def on_train_batch_end(self, batch, logs=None):
                now = time.perf_counter()
                timer.steps.append(now - timer.last)
                timer.last = now

        self.callback = _Callback()
        self.steps: list[float] = []
        self.last = 0.0


def build(kind: str, size: int, steps_per_epoch: int, rounds: int):
    module = tf_keras if kind == "tfmot" else keras
    model = digits_cnn(module) if size == 8 else _wide_cnn(module, size)
    schedule = tfopt.PolynomialDecay(0.0, 0.8, begin_step=0,
                                     end_step=steps_per_epoch * (rounds + 1), frequency=100)
    callbacks = []
    if kind != "keras":
        model = tfopt.prune(model, schedule)
        callbacks.append(tfopt.callbacks.PruningStep())
    loss = module.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=module.optimizers.Adam(1e-3), loss=loss)
    timer = StepTimer(module.callbacks.Callback)
    return model, callbacks + [timer.callback], timer


def _wide_cnn(module, size):
    layers = module.layers
    inputs = module.Input((size, size, 1))
    x = layers.Conv2D(32, 3, padding="same", activation="relu")(inputs)
    x = layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Flatten()(x)
    x = layers.Dense(64, activation="relu")(x)
    return module.Model(inputs, layers.Dense(10)(x))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=8,
                        help="image side; 8 is the digits CNN itself, larger upsamples")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    (x, y), _ = tfopt.datasets.load_digits()
    if args.size != 8:
        x = tf.image.resize(x, (args.size, args.size)).numpy()
    steps = math.ceil(len(x) / args.batch_size)
    runs = {kind: build(kind, args.size, steps, args.rounds) for kind in ("keras", "tfopt", "tfmot")}
    kinds = list(runs)
    for rnd in range(args.rounds + 1):
        # Rotate the order each round so that no way always runs first.
        for kind in kinds[rnd % 3:] + kinds[:rnd % 3]:
            model, callbacks, timer = runs[kind]
            model.fit(x, y, batch_size=args.batch_size, epochs=1, verbose=0, callbacks=callbacks)
            if rnd == 0:
                timer.steps.clear()  # the first epoch traces the train step: not timed

    medians = {kind: statistics.median(timer.steps) for kind, (_, _, timer) in runs.items()}
    spread = {kind: np.percentile(timer.steps, 90) / np.percentile(timer.steps, 10)
              for kind, (_, _, timer) in runs.items()}
    print(f"pruning overhead: {args.size}x{args.size} digits CNN, batch {args.batch_size}, "
          f"{args.rounds} rounds x {steps} steps, TF {tf.__version__}, Keras {keras.__version__}, "
          f"{_cpu_int8.describe_cpu()}")
    print(f"{'fit':<8}{'median ms/step':>16}{'p90/p10':>10}{'vs keras':>10}{'vs tfmot':>10}")
    for kind, median in medians.items():
        print(f"{kind:<8}{1e3 * median:>16.3f}{spread[kind]:>10.2f}"
              f"{median / medians['keras']:>10.2f}{median / medians['tfmot']:>10.2f}")
    print(f"tfopt - keras: {1e3 * (medians['tfopt'] - medians['keras']):+.3f} ms per step; "
          f"tfopt - tfmot: {1e3 * (medians['tfopt'] - medians['tfmot']):+.3f} ms per step")
    for kind, (model, _, _) in runs.items():
        if kind != "keras":
            values = tfopt.sparsity(model)
            print(f"{kind} sparsity reached: {min(values.values()):.2f}-{max(values.values()):.2f}")
    if args.json:
        args.json.write_text(json.dumps({
            "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
            "cpu": _cpu_int8.describe_cpu(), "args": {k: str(v) for k, v in vars(args).items()},
            "steps_per_round": steps,
            "median_ms": {k: 1e3 * v for k, v in medians.items()},
            "p90_over_p10": {k: float(v) for k, v in spread.items()},
        }, indent=2))
    return medians


if __name__ == "__main__":
    main()
