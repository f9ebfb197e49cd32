"""The issue's targets on real data: scikit-learn's digits."""

import pytest

from tfopt.demo import prune_digits


@pytest.mark.slow
def test_digits_cnn_pruned_to_80_percent_keeps_accuracy_and_hits_target_sparsity():
    result = prune_digits(target_sparsity=0.8)
    assert result.dense_accuracy > 0.95
    assert result.dense_accuracy - result.pruned_accuracy <= 0.015
    assert len(result.pruned_sparsity) == 4  # conv1, conv2, dense1, logits kernels
    for path, value in result.pruned_sparsity.items():
        assert value == pytest.approx(0.8, abs=0.01), path


@pytest.mark.slow
def test_digits_qat_int8_within_one_point_and_onnx_matches_keras(trained_digits, digits, tmp_path):
    import numpy as np

    import tfopt
    from tfopt._examples import compile_classifier
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
    assert abs(onnx_accuracy - qat_accuracy) <= 0.01
    max_logit_diff = result.errors["onnx"]["logits"]["max_abs"]
    print(f"float {float_accuracy:.4f} qat {qat_accuracy:.4f} onnx {onnx_accuracy:.4f} "
          f"max logit diff {max_logit_diff:.3g}")
    assert max_logit_diff < 0.05 * np.abs(logits).max()
