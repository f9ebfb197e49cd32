"""What each serving engine needs of an INT8 model, stated once per engine.

QAT (``tfopt.quantization``) and the exporter (``tfopt.export``) both read
these rules; the runners (``tfopt.artifacts``) read them to check the CPU
they run on. Modules here import only numpy and onnx, so every layer of
tfopt can use them.

* :mod:`tfopt.targets._tensorrt`: TensorRT's explicit quantization, the
  placement QAT trains (symmetric int8 Q/DQ on the inputs and weights of
  each convolution and matrix product, residual sums quantized on both
  inputs, BatchNormalization left to the engine), and the check that a file
  holds only Q/DQ TensorRT builds INT8 from.
* :mod:`tfopt.targets._onnxruntime`: ONNX Runtime's CPU provider (and
  OpenVINO, which runs the same file): the node units it fuses into integer
  kernels, the uint8 grid each trained range becomes, which nodes stay
  float. The export's ``_ort_quant`` writes the file by these rules.
* :mod:`tfopt.targets._cpu_int8`: integer kernels on x86 CPUs (ONNX
  Runtime's MLAS, OpenVINO's oneDNN): the int16 pair sums of CPUs without
  VNNI, the weight grid that keeps them exact, and the static proof an
  export records.
"""
