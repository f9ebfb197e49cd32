"""OpenVINO runtime (CPU): compile an IR with a precision and performance hint, run it.

OpenVINO quirks live here (and the converter's in ``tfopt.export._openvino``):

* On a CPU with bf16 support (AVX512-BF16 or AMX-BF16) OpenVINO runs float
  models in bf16 unless ``INFERENCE_PRECISION_HINT`` is f32: every runner
  sets the hint explicitly, so "f32" means f32.
* ``OPTIMIZATION_CAPABILITIES`` says whether the plugin has BF16/INT8
  kernels, not which instruction sets it found; those come from the CPU's
  flags (``/proc/cpuinfo``), reported by :func:`cpu_features`.
* The throughput hint pays off only with several requests in flight: the
  throughput runner splits a batch over ``OPTIMAL_NUMBER_OF_INFER_REQUESTS``
  asynchronous requests; the latency runner makes one synchronous call.

Needs no TensorFlow.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from tfopt._warn import warn_user
from tfopt.artifacts._runner import (Runner, find_manifest, manifest_io, ordered,
                                     portability_warning)
from tfopt.targets._cpu_int8 import cpu_flags

PRECISIONS = ("f32", "bf16")
MODES = ("latency", "throughput")

# /proc/cpuinfo flag -> the name reports use
_ISA_FLAGS = {"avx512_vnni": "AVX512-VNNI", "avx_vnni": "AVX-VNNI", "avx512_bf16": "AVX512-BF16",
              "amx_int8": "AMX-INT8", "amx_bf16": "AMX-BF16", "amx_fp16": "AMX-FP16",
              "avx512f": "AVX512F"}


def available() -> bool:
    """Whether the ``openvino`` package can be imported."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def import_openvino():
    """The ``openvino`` module, or an error that says how to install it."""
    try:
        import openvino
    except ImportError as exc:
        from tfopt.errors import BackendUnavailableError

        raise BackendUnavailableError(
            "OpenVINO is not installed: pip install 'tfopt[openvino]' (or pip install "
            "openvino). The 'onnx' and 'saved_model' formats need no OpenVINO.") from exc
    return openvino


@functools.lru_cache(maxsize=None)
def _core():
    return import_openvino().Core()


@functools.lru_cache(maxsize=None)
def cpu_features() -> dict:
    """What this CPU offers OpenVINO: instruction sets, plugin capabilities, device name.

    Returns:
        ``{"isa": ["AVX512-VNNI", "AMX-BF16", ...], "capabilities": ["FP32",
        "BF16", "INT8", ...], "device": "...", "bf16": bool, "openvino": version}``.
    """
    # empty where /proc/cpuinfo cannot be read: the plugin's capabilities still say BF16/INT8
    flags = cpu_flags()
    isa = [name for flag, name in _ISA_FLAGS.items() if flag in flags]
    features = {"isa": isa, "machine": platform.machine()}
    if available():
        import openvino

        core = _core()
        capabilities = list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        features.update(capabilities=capabilities,
                        device=str(core.get_property("CPU", "FULL_DEVICE_NAME")),
                        bf16="BF16" in capabilities, openvino=openvino.__version__)
    else:
        features.update(capabilities=[], device=None, bf16=False, openvino=None)
    return features


def bf16_available() -> bool:
    """Whether OpenVINO's CPU plugin has bf16 kernels on this CPU."""
    return bool(cpu_features()["bf16"])


def model_path(path: Path) -> Path:
    """The ``.xml`` of an IR given as the file or its folder."""
    path = Path(path)
    if path.is_dir():
        xml = sorted(path.glob("*.xml"))
        if not xml:
            from tfopt.errors import ConfigError

            raise ConfigError(f"No OpenVINO IR (.xml) in {path}.")
        return xml[0]
    return path


def ir_precision(path: Path) -> str:
    """``int8`` for an IR with FakeQuantize (QAT), ``fp16`` for compressed weights, else fp32."""
    model = _core().read_model(str(model_path(path)))
    types = {op.get_type_name() for op in model.get_ordered_ops()}
    if "FakeQuantize" in types:
        return "int8"
    for op in model.get_ordered_ops():
        if op.get_type_name() == "Constant" and op.get_output_element_type(0).get_type_name() == "f16":
            return "fp16"
    return "fp32"


def openvino_runner(path: Path, *, label: str = "openvino", precision: str = "f32",
                    mode: str = "latency", inputs: Optional[Sequence[str]] = None,
                    outputs: Optional[Sequence[str]] = None, threads: Optional[int] = None) -> Runner:
    """An IR compiled for the CPU with an explicit inference precision and performance hint.

    Args:
        path: ``model.xml`` or the folder holding it.
        precision: ``"f32"`` or ``"bf16"`` (OpenVINO's ``INFERENCE_PRECISION_HINT``;
            an int8 IR keeps its int8 kernels either way, the hint applies to
            what is left in float).
        mode: ``"latency"`` (one synchronous request) or ``"throughput"``
            (the batch split over the optimal number of parallel requests).
        inputs, outputs: Names in the caller's order (default: the manifest
            beside the IR, else the IR's own order).
        threads: ``INFERENCE_NUM_THREADS`` (default: OpenVINO's choice).
    """
    from tfopt.errors import ConfigError

    if precision not in PRECISIONS:
        raise ConfigError(f"OpenVINO inference precision {precision!r}: use one of {PRECISIONS}.")
    if mode not in MODES:
        raise ConfigError(f"OpenVINO performance mode {mode!r}: use one of {MODES}.")
    ov = import_openvino()
    if precision == "bf16" and not bf16_available():
        raise ConfigError(
            f"OpenVINO bf16 needs a CPU with AVX512-BF16 or AMX-BF16; this one has "
            f"{cpu_features()['isa'] or 'neither'}. Use precision='f32'.")
    xml = model_path(path)
    warning = portability_warning(xml)
    if warning:
        warn_user(warning)
    if inputs is None or outputs is None:
        spec_in, spec_out = manifest_io(find_manifest(xml))
        inputs = inputs or ([i["name"] for i in spec_in] if spec_in else None)
        outputs = outputs or spec_out
    config = {ov.properties.hint.inference_precision: ov.Type.bf16 if precision == "bf16" else ov.Type.f32,
              ov.properties.hint.performance_mode: (ov.properties.hint.PerformanceMode.THROUGHPUT
                                                    if mode == "throughput" else
                                                    ov.properties.hint.PerformanceMode.LATENCY)}
    if threads:
        config[ov.properties.inference_num_threads] = int(threads)
    compiled = _core().compile_model(str(xml), "CPU", config)
    in_names = ordered([i.get_any_name() for i in compiled.inputs], inputs)
    out_ports = {o.get_any_name(): o for o in compiled.outputs}
    # An IR may give an output several names; match the caller's by any of them.
    if outputs:
        for port in compiled.outputs:
            for alias in port.get_names():
                out_ports.setdefault(alias, port)
        out_names = [n for n in outputs if n in out_ports] or list(out_ports)
    else:
        out_names = [o.get_any_name() for o in compiled.outputs]
    ports = [out_ports[n] for n in out_names]
    spec = {"loader": "openvino", "path": str(xml), "precision": precision, "mode": mode,
            "threads": threads}
    details = {"inference_precision": precision, "performance_mode": mode,
               "streams": int(compiled.get_property("NUM_STREAMS")),
               "requests": int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))}
    if mode == "latency":
        request = compiled.create_infer_request()

        def run(arrays):
            request.infer(dict(zip(in_names, arrays)), share_inputs=True, share_outputs=True)
            return [request.get_tensor(p).data for p in ports]
    else:
        queue = ov.AsyncInferQueue(compiled, details["requests"])
        results: dict = {}

        def done(request, index):
            results[index] = [np.array(request.get_tensor(p).data) for p in ports]

        queue.set_callback(done)

        def run(arrays):
            batch = len(arrays[0])
            chunks = min(details["requests"], batch)
            bounds = np.linspace(0, batch, chunks + 1).astype(int)
            results.clear()
            for i in range(chunks):
                queue.start_async({n: a[bounds[i]:bounds[i + 1]] for n, a in zip(in_names, arrays)},
                                  userdata=i)
            queue.wait_all()
            if chunks == 1:
                return results[0]
            return [np.concatenate([results[i][k] for i in range(chunks)])
                    for k in range(len(ports))]

    def fetch(values):
        return [np.array(v, copy=True) for v in values]

    weights = ir_precision(xml)
    shown = "bf16" if precision == "bf16" and weights != "int8" else weights
    suffix = f"OpenVINO CPU {precision}" + (" throughput" if mode == "throughput" else "")
    return Runner(f"{label} {weights} / {suffix}", "openvino_cpu", xml, run, shown,
                  tuple(out_names), fetch, spec, details)


def openvino_runners(path: Path, label: str = "openvino",
                     precisions: Optional[Sequence[str]] = None,
                     modes: Sequence[str] = ("latency",)) -> list[Runner]:
    """One runner per precision (f32, and bf16 where the CPU has it) and mode."""
    if precisions is None:
        precisions = ["f32"] + (["bf16"] if bf16_available() else [])
    return [openvino_runner(path, label=label, precision=p, mode=m)
            for p in precisions for m in modes]
