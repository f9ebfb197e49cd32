"""GPU checks: run where onnxruntime-gpu and a CUDA GPU are present, skipped elsewhere."""

import numpy as np
import pytest

import tfopt
from tfopt.artifacts import _ort

from test_pruning import functional

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _ort.cuda_available(),
                       reason="needs onnxruntime-gpu and a CUDA GPU (CUDAExecutionProvider)"),
]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_onnx_runs_on_cuda_and_matches_the_cpu(precision, tmp_path):
    x = np.random.default_rng(0).normal(size=(8, 8, 8, 1)).astype("float32")
    result = tfopt.export(functional(), tmp_path, formats=("onnx",), precision=precision,
                          validation_data=x)
    cpu, cuda = _ort.onnx_runners(result.paths["onnx"],
                                  providers=["CPUExecutionProvider", "CUDAExecutionProvider"])
    on_gpu = cuda.first([x])
    np.testing.assert_allclose(on_gpu, cpu.first([x]), rtol=2e-2, atol=2e-3)
