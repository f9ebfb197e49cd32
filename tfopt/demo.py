"""The demo behind ``make demo``: prune a small CNN on scikit-learn's digits.

Trains the CNN dense, prunes it to 80% sparsity with a polynomial schedule
inside ``fit()``, strips it, and prints accuracy and per-layer sparsity before
and after. Run it with ``python -m tfopt.demo``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import keras

import tfopt
from tfopt._examples import compile_classifier, digits_cnn


@dataclasses.dataclass
class DemoResult:
    dense_accuracy: float
    pruned_accuracy: float
    dense_sparsity: dict
    pruned_sparsity: dict
    seconds: float
    model: keras.Model


def prune_digits(target_sparsity: float = 0.8, dense_epochs: int = 15, prune_epochs: int = 15,
                 batch_size: int = 32, seed: int = 0, verbose: int = 0) -> DemoResult:
    """Train the digits CNN dense, then prune it to ``target_sparsity`` and strip it.

    Pruning ramps up over the first 40% of ``prune_epochs`` (PolynomialDecay)
    and the rest fine-tunes at the final sparsity.
    """
    start = time.perf_counter()
    keras.utils.set_random_seed(seed)
    (x_train, y_train), (x_test, y_test) = tfopt.datasets.load_digits()
    model = compile_classifier(digits_cnn())
    model.fit(x_train, y_train, epochs=dense_epochs, batch_size=batch_size, verbose=verbose)
    dense_accuracy = model.evaluate(x_test, y_test, verbose=0)[1]
    dense_sparsity = tfopt.sparsity(model)

    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    schedule = tfopt.PolynomialDecay(
        initial_sparsity=0.0,
        final_sparsity=target_sparsity,
        begin_step=0,
        end_step=int(0.4 * prune_epochs * steps_per_epoch),
        frequency=max(1, steps_per_epoch // 4),
    )
    pruned = compile_classifier(tfopt.prune(model, schedule), learning_rate=5e-4)
    pruned.fit(x_train, y_train, epochs=prune_epochs, batch_size=batch_size, verbose=verbose,
               callbacks=[tfopt.callbacks.PruningStep()])
    plain = compile_classifier(tfopt.strip(pruned))
    return DemoResult(
        dense_accuracy=dense_accuracy,
        pruned_accuracy=plain.evaluate(x_test, y_test, verbose=0)[1],
        dense_sparsity=dense_sparsity,
        pruned_sparsity=tfopt.sparsity(plain),
        seconds=time.perf_counter() - start,
        model=plain,
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--epochs", type=int, default=15, help="epochs dense and pruning each")
    args = parser.parse_args(argv)
    result = prune_digits(args.sparsity, args.epochs, args.epochs, verbose=0)
    print(f"digits CNN, {result.model.count_params():,} parameters, "
          f"pruned to {args.sparsity:.0%} in {result.seconds:.0f} s\n")
    print(f"{'weight':<22}{'dense':>10}{'pruned':>10}")
    for path, value in result.pruned_sparsity.items():
        print(f"{path:<22}{result.dense_sparsity.get(path, 0.0):>10.1%}{value:>10.1%}")
    print(f"\n{'test accuracy':<22}{result.dense_accuracy:>10.2%}{result.pruned_accuracy:>10.2%}")
    print(f"{'change':<22}{'':>10}{100 * (result.pruned_accuracy - result.dense_accuracy):>+9.2f}pt")


if __name__ == "__main__":
    main()
