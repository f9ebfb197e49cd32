"""What each serving engine needs of an INT8 model, stated once.

QAT (``tfopt.quantization``) and the exporter (``tfopt.export``) both read
these rules; the runners (``tfopt.artifacts``) read them to check the CPU
they run on. Modules here import only numpy and onnx, so every layer of
tfopt can use them.

* :mod:`tfopt.targets._cpu_int8`: integer kernels on x86 CPUs (ONNX
  Runtime's MLAS, OpenVINO's oneDNN): the int16 pair sums of CPUs without
  VNNI, the weight grid that keeps them exact, and the static proof an
  export records.
"""
