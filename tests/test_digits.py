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
