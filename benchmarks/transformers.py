"""BERT encoders on ONNX Runtime and OpenVINO (CPU): tfopt's INT8 beside ``quantize_dynamic``.

For each configuration (keras-hub ``BertBackbone`` built from config, no
download, with a 4-class head on its pooled output), the model is fine-tuned
a few steps on a real text task (``tfopt.datasets.load_python_docs``: which
part of Python's language reference a window of words comes from), then
quantized (``tfopt.quantize``, int8 embeddings included, calibrated on 32
windows) and fine-tuned a few QAT steps. Each file is exported once, with a
dynamic batch and sequence length, and timed at every length and batch:

* ``tfopt fp32``: tfopt's float ONNX;
* ``tfopt int8``: tfopt's INT8 ONNX of the QAT model (default placement);
* ``ort quantize_dynamic``: the anchor, the one call every ONNX Runtime
  guide gives for BERT (``quantize_dynamic(fp32, out, weight_type=QInt8)``)
  on tfopt's float ONNX;
* ``openvino int8``: OpenVINO's IR from the same QAT model (tfopt's
  ``openvino`` export), f32 inference precision for what stays float;
* ``int8 float tables`` (with ``--float-tables``): the same QAT recipe with
  ``QuantizationConfig(quantize_embeddings=False)``, to measure what int8
  embeddings cost or buy in speed;
* ``int8 attention (exp.)``: an experiment, not a product: tfopt's INT8
  file with the attention score and context products quantized too
  (uint8 Q/DQ on both inputs, ranges calibrated on held-out windows), to
  measure whether integer products there buy speed.

ONNX Runtime sessions use 2 intra-op threads that sleep between runs; every
file is timed in the same interleaved rounds (median ms), and ratios are
paired per round. Printed too: file sizes, the cosine similarity of each
file's logits with the Keras QAT model's on held-out windows (the float
file with the float model's) and their argmax agreement. The CPU's name and
instruction sets head the output and the JSON.

The JSON keeps the configurations a run did not measure (with the
environment they were measured in), so ``--configs small`` refreshes one.

Usage: python benchmarks/transformers.py [--configs small,base] [--lengths 128,512]
       [--batches 1,8] [--seconds 25] [--float-tables]
       [--json benchmarks/results/transformers.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

import tfopt  # noqa: E402
from tfopt.artifacts._openvino import model_path, openvino_runner  # noqa: E402
from tfopt.artifacts._runner import find_manifest, manifest_io  # noqa: E402
from tfopt.artifacts._ort import default_session_options  # noqa: E402
from tfopt.bench._timing import interleaved  # noqa: E402
from tfopt.targets import _cpu_int8  # noqa: E402

CONFIGS = {
    # the configuration issue 25 first measured
    "small": dict(num_layers=4, hidden_dim=512, num_heads=8, intermediate_dim=2048),
    # BERT-base's size
    "base": dict(num_layers=12, hidden_dim=768, num_heads=12, intermediate_dim=3072),
}
VOCABULARY = 30522
MAX_LENGTH = 512
STEPS = 8  # fine-tuning steps, float and QAT, batch 8 at 128 tokens
FILES = ("tfopt fp32", "tfopt int8", "ort quantize_dynamic", "openvino int8",
         "int8 attention (exp.)")


def inputs(ids: np.ndarray) -> dict:
    return {"token_ids": ids, "segment_ids": np.zeros_like(ids),
            "padding_mask": (ids > 0).astype("int32")}


def data(length: int):
    (x_train, y_train), (x_test, _), names = tfopt.datasets.load_python_docs(
        length, vocabulary_size=VOCABULARY)
    return inputs(x_train), y_train, inputs(x_test), len(names)


def build(config: dict, classes: int) -> keras.Model:
    import keras_hub

    backbone = keras_hub.models.BertBackbone(vocabulary_size=VOCABULARY,
                                             max_sequence_length=MAX_LENGTH, **config)
    feeds = {k: keras.Input((None,), dtype="int32", name=k)
             for k in ("token_ids", "segment_ids", "padding_mask")}
    logits = keras.layers.Dense(classes, name="logits")(backbone(feeds)["pooled_output"])
    return keras.Model(feeds, logits, name="bert_classifier")


def fine_tune(model: keras.Model, x: dict, y: np.ndarray, learning_rate: float) -> None:
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rows = slice(0, 8 * STEPS)
    model.fit({k: v[rows] for k, v in x.items()}, y[rows], batch_size=8, epochs=1, verbose=0)


def anchor(fp32: Path, out: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8)
    return out


def int8_attention(int8: Path, out: Path, feed: dict) -> Path:
    """tfopt's INT8 file with uint8 Q/DQ on both inputs of each float activation x activation
    MatMul (the attention score and context products), ranges calibrated on ``feed``."""
    from onnx import helper, numpy_helper

    proto = onnx.load(str(int8))
    graph = proto.graph
    weights = {i.name for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    products = [n for n in graph.node if n.op_type == "MatMul"
                and not any(i in weights or (i in producers and producers[i].op_type
                                             == "DequantizeLinear") for i in n.input)]
    tensors = sorted({i for n in products for i in n.input})
    probe = onnx.load(str(int8))
    probe.graph.output.extend(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                              for t in tensors)
    session = ort.InferenceSession(probe.SerializeToString(), default_session_options(),
                                   providers=["CPUExecutionProvider"])
    values = session.run(tensors, feed)
    added = {}
    for tensor, value in zip(tensors, values):
        scale = max(float(np.max(np.abs(value))), 1e-8) / 127.0
        names = [f"{tensor}_att_{s}" for s in ("scale", "zero", "q", "dq")]
        graph.initializer.extend([numpy_helper.from_array(np.float32(scale), names[0]),
                                  numpy_helper.from_array(np.uint8(128), names[1])])
        added[tensor] = [helper.make_node("QuantizeLinear", [tensor, names[0], names[1]],
                                          [names[2]]),
                         helper.make_node("DequantizeLinear", [names[2], names[0], names[1]],
                                          [names[3]])]
    for node in products:
        node.input[:] = [f"{i}_att_dq" for i in node.input]
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for output in node.output:
            nodes.extend(added.pop(output, []))
    for tensor in list(added):  # graph inputs
        nodes[:0] = added.pop(tensor)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(proto, str(out))
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def prepare(name: str, workdir: Path, float_tables: bool = False) -> dict:
    x_train, y_train, x_test, classes = data(128)
    keras.utils.set_random_seed(0)
    model = build(CONFIGS[name], classes)
    start = time.perf_counter()
    print(f"[{name}] fine-tuning {STEPS} float steps ...", flush=True)
    fine_tune(model, x_train, y_train, 5e-5)
    calibration = {k: v[:32] for k, v in x_train.items()}
    rest = {k: v[8 * STEPS:] for k, v in x_train.items()}, y_train[8 * STEPS:]
    if float_tables:
        weights = model.get_weights()  # the same start for both QAT models
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = tfopt.quantize(model, calibration_data=calibration)
    print(f"[{name}] fine-tuning {STEPS} QAT steps ...", flush=True)
    fine_tune(qat, *rest, 1e-5)
    extra = {}
    if float_tables:
        twin = build(CONFIGS[name], classes)
        twin.set_weights(weights)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            float_qat = tfopt.quantize(
                twin, tfopt.QuantizationConfig(quantize_embeddings=False),
                calibration_data=calibration)
        fine_tune(float_qat, *rest, 1e-5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            extra["int8 float tables"] = tfopt.export(
                float_qat, workdir / "int8_float_tables", formats=("onnx",),
                validation_data={k: v[:16] for k, v in x_test.items()}).paths["onnx"]
    print(f"[{name}] exporting ...", flush=True)
    check = {k: v[:16] for k, v in x_test.items()}
    fp32 = tfopt.export(model, workdir / "fp32", formats=("onnx",), validation_data=check)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the float attention products: said in the README
        int8 = tfopt.export(qat, workdir / "int8", formats=("onnx", "openvino"),
                            validation_data=check)
    paths = {"tfopt fp32": fp32.paths["onnx"], "tfopt int8": int8.paths["onnx"],
             "ort quantize_dynamic": anchor(fp32.paths["onnx"], workdir / "dynamic.onnx"),
             "openvino int8": model_path(int8.paths["openvino"]),
             "int8 attention (exp.)": int8_attention(int8.paths["onnx"], workdir / "att.onnx",
                                                     {k: v[16:48] for k, v in x_test.items()}),
             **extra}
    print(f"[{name}] prepared in {time.perf_counter() - start:.0f} s", flush=True)
    runners = {key: runner(path) for key, path in paths.items()}
    info = {}
    held_out = {128: {k: v[:32] for k, v in x_test.items()}}
    long_test = data(512)[2]
    held_out[512] = {k: v[:8] for k, v in long_test.items()}
    keras_models = {"tfopt fp32": model, "int8 float tables": float_qat if float_tables else None}
    expected = {(key, length): np.asarray(m.predict(feed, batch_size=8, verbose=0))
                for key, m in (("qat", qat), *keras_models.items()) if m is not None
                for length, feed in held_out.items()}
    for key, run in runners.items():
        info[key] = {"size_mb": size_mb(paths[key]), "cosine": {}, "argmax_agreement": {}}
        for length, feed in held_out.items():
            reference = expected[key if key in keras_models else "qat", length]
            actual = run(feed)
            info[key]["cosine"][str(length)] = cosine(actual, reference)
            info[key]["argmax_agreement"][str(length)] = float(
                np.mean(actual.argmax(1) == reference.argmax(1)))
    manifest = int8.manifest["artifacts"]["onnx"]
    return {"paths": paths, "runners": runners, "info": info,
            "int8_kernels": manifest.get("ort_cpu_kernels"),
            "second_length": manifest.get("second_length", {}).get("length"),
            "parameters": model.count_params()}


def size_mb(path: Path) -> float:
    path = Path(path)
    if path.suffix == ".xml":
        return (path.stat().st_size + path.with_suffix(".bin").stat().st_size) / 1e6
    return path.stat().st_size / 1e6


def runner(path: Path):
    """A callable ``feed dict -> logits`` for an ONNX file (ONNX Runtime) or an IR (OpenVINO)."""
    path = Path(path)
    if path.suffix == ".xml":
        run = openvino_runner(path, precision="f32", threads=2)
        names = [i["name"] for i in manifest_io(find_manifest(path))[0]]
        return lambda feed: next(iter(run([feed[n] for n in names]).values()))
    options = default_session_options()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda feed: session.run(None, feed)[0]


def time_all(runners: dict, length: int, batch: int, seconds: float) -> dict:
    ids = np.random.default_rng(3).integers(2, 5000, size=(batch, length)).astype("int32")
    feed = inputs(ids)
    calls = {k: functools.partial(r, feed) for k, r in runners.items()}
    once = interleaved(calls, rounds=1, warmup=1)
    per_round = sum(v[0] for v in once.values())
    rounds = int(min(30, max(3, seconds // per_round)))
    return interleaved(calls, rounds=rounds, warmup=0)


def paired(samples: dict, base: str, other: str) -> float:
    return float(np.median(np.asarray(samples[base]) / np.asarray(samples[other])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="small,base", help=f"of: {','.join(CONFIGS)}")
    parser.add_argument("--lengths", default="128,512")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--seconds", type=float, default=25.0,
                        help="about this long timing each length and batch (3-30 rounds)")
    parser.add_argument("--float-tables", action="store_true",
                        help="also time tfopt INT8 with float embedding tables")
    parser.add_argument("--json", default="benchmarks/results/transformers.json")
    args = parser.parse_args()
    unknown = set(args.configs.split(",")) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown config(s) {sorted(unknown)}; choose from {','.join(CONFIGS)}")
    lengths = [int(v) for v in args.lengths.split(",")]
    batches = [int(v) for v in args.batches.split(",")]

    import keras_hub
    import openvino

    results = {"environment": {"onnxruntime": ort.__version__, "tfopt": tfopt.__version__,
                               "keras_hub": keras_hub.__version__,
                               "openvino": openvino.__version__.split("-")[0],
                               "cpu": _cpu_int8.describe_cpu()},
               "configs": {}}
    print(f"{results['environment']['cpu']}; onnxruntime {ort.__version__}", flush=True)
    for name in args.configs.split(","):
        with tempfile.TemporaryDirectory(prefix="tfopt-transformers-") as tmp:
            prepared = prepare(name, Path(tmp), args.float_tables)
            timings = {}
            for length in lengths:
                for batch in batches:
                    samples = time_all(prepared["runners"], length, batch, args.seconds)
                    timings[f"{length}x{batch}"] = {
                        "median_ms": {k: 1000 * statistics.median(v) for k, v in samples.items()},
                        "rounds": len(samples["tfopt fp32"]),
                        # > 1: tfopt's INT8 is faster than the anchor
                        "int8_vs_dynamic": paired(samples, "ort quantize_dynamic", "tfopt int8"),
                        "int8_vs_fp32": paired(samples, "tfopt fp32", "tfopt int8"),
                        "attention_int8_vs_int8": paired(samples, "tfopt int8",
                                                         "int8 attention (exp.)"),
                        "openvino_vs_dynamic": paired(samples, "ort quantize_dynamic",
                                                      "openvino int8"),
                        **({"int8_vs_float_tables": paired(samples, "int8 float tables",
                                                           "tfopt int8")}
                           if "int8 float tables" in samples else {})}
                    print(f"[{name}] {length} tokens, batch {batch}: "
                          f"{timings[f'{length}x{batch}']['median_ms']}", flush=True)
            result = {"config": CONFIGS[name], "parameters": prepared["parameters"],
                      "files": prepared["info"], "int8_kernels": prepared["int8_kernels"],
                      "second_length_validated": prepared["second_length"], "timings": timings}
            results["configs"][name] = result
            print_table(name, result)
            del prepared
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():  # keep the configurations this run did not measure, with their machine
        earlier = json.loads(path.read_text())
        for other, result in earlier.get("configs", {}).items():
            if other not in results["configs"]:
                results["configs"][other] = {**result,
                                             "environment": earlier.get("environment")}
    path.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.json}")


def print_table(name: str, result: dict) -> None:
    files, timings = result["files"], result["timings"]
    print(f"\nBERT {name} ({result['parameters'] / 1e6:.0f}M parameters): median ms "
          "(x: tfopt int8's speed over quantize_dynamic, paired by round)")
    print(f"{'tokens x batch':<16}" + "".join(f"{k:>23}" for k in files) + f"{'int8 vs dyn':>13}")
    for key, t in timings.items():
        print(f"{key:<16}" + "".join(f"{t['median_ms'][k]:>23.2f}" for k in files)
              + f"{t['int8_vs_dynamic']:>12.2f}x")
    print(f"{'file MB':<16}" + "".join(f"{files[k]['size_mb']:>23.1f}" for k in files))
    for length in ("128", "512"):
        print(f"{'cosine @' + length:<16}" + "".join(
            f"{files[k]['cosine'][length]:>23.5f}" for k in files))
        print(f"{'argmax @' + length:<16}" + "".join(
            f"{files[k]['argmax_agreement'][length]:>23.3f}" for k in files))


if __name__ == "__main__":
    main()
