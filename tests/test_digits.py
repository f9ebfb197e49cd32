"""The targets on real data: scikit-learn's digits."""

import dataclasses
import math
import time

import keras
import pytest

import tfopt
from tfopt.examples import compile_classifier, digits_cnn


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



@pytest.mark.slow
def test_digits_cnn_pruned_to_80_percent_keeps_accuracy_and_hits_target_sparsity():
    result = prune_digits(target_sparsity=0.8)
    assert result.dense_accuracy > 0.95
    assert result.dense_accuracy - result.pruned_accuracy <= 0.015
    assert len(result.pruned_sparsity) == 4  # conv1, conv2, dense1, logits kernels
    for path, value in result.pruned_sparsity.items():
        assert value == pytest.approx(0.8, abs=0.01), path


@pytest.mark.slow
def test_digits_qat_int8_within_one_point_and_onnx_runs_it_in_int8_within_half_a_point(
        trained_digits, digits, tmp_path):
    import numpy as np

    import tfopt
    from tfopt.examples import compile_classifier
    from tfopt.export import _onnx

    (x, y), (x_test, y_test) = digits
    float_accuracy = trained_digits.evaluate(x_test, y_test, verbose=0)[1]
    qat = compile_classifier(tfopt.quantize(trained_digits, calibration_data=x[:256]), 2e-4)
    qat.fit(x, y, epochs=3, batch_size=32, verbose=0)
    qat_accuracy = qat.evaluate(x_test, y_test, verbose=0)[1]
    assert qat_accuracy >= float_accuracy - 0.01

    result = tfopt.export(qat, tmp_path, formats=("onnx",), validation_data=x_test)
    session = _onnx.session(result.paths["onnx"])
    logits = session.run(None, {"image": x_test})[0]
    onnx_accuracy = float(np.mean(logits.argmax(axis=1) == y_test))
    assert abs(onnx_accuracy - qat_accuracy) <= 0.005
    kernels = result.manifest["artifacts"]["onnx"]["ort_cpu_kernels"]
    assert kernels["integer"] == kernels["total"] == 4  # two convolutions, two Dense layers
    max_logit_diff = result.errors["onnx"]["logits"]["max_abs"]
    print(f"float {float_accuracy:.4f} qat {qat_accuracy:.4f} onnx {onnx_accuracy:.4f} "
          f"max logit diff {max_logit_diff:.3g}")
    # Within a few quantization steps of the logits, the step read from Keras's own
    # quantizer: one step of the head's input against its largest weight.
    head = qat.get_layer("quant_logits")
    (_, kernel), = head.quantized_weights()
    step = float(head.input_amax.numpy()) / 127 * float(np.max(np.abs(kernel.numpy())))
    assert result.manifest["artifacts"]["onnx"]["qdq_steps"]["logits"] == pytest.approx(step,
                                                                                          rel=1e-5)
    assert max_logit_diff <= 16 * step + 1e-4 * np.abs(logits).max() + 1e-5
    assert np.mean(np.abs(logits - qat.predict(x_test, verbose=0))) <= 4 * step  # ORT placement
