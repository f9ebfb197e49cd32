"""The ``tfopt`` command: run recipes, export, benchmark and inspect models.

Exit codes: 0 on success; 2 with one line on stderr (what failed, why, what to
do) for anything that goes wrong: a missing or truncated file, a bad recipe,
an invalid option, a missing backend, a full disk; the traceback only with
``--debug``. 130 on Ctrl-C, after putting files back as they were.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Optional, Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tfopt", description="Make Keras models smaller and faster to serve.")
    parser.add_argument("-q", "--quiet", action="store_true", help="only print results")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a recipe: train, prune, quantize, export, bench",
                         description="Run a YAML recipe and write report.md, plots, "
                                     "metrics.json and the export manifests into --output.")
    run.add_argument("recipe", help="path of the YAML recipe")
    run.add_argument("--output", "-o", help="output directory (default: runs/<recipe name>)")
    run.add_argument("--resume", action="store_true",
                     help="go on from the last stage (trained, pruned, qat) a run of the same "
                          "recipe saved under OUTPUT/stages")

    export = sub.add_parser("export", help="export a .keras model",
                            description="Export a .keras model and validate every artifact.")
    export.add_argument("model", help="path of a .keras model")
    export.add_argument("--format", "-f", action="append", dest="formats",
                        help="saved_model, saved_model_xla, frozen_graph, onnx, openvino, "
                             "tensorrt, tftrt or triton (repeat for several; default "
                             "saved_model and onnx)")
    export.add_argument("--precision", default="fp32", help="fp32, fp16 or int8")
    export.add_argument("--output", "-o", required=True, help="export directory")
    export.add_argument("--validation-data", help=".npy file of real inputs (recommended)")
    export.add_argument("--data", help="a folder of images to validate on (its val/ split, "
                                       "class sub-folders, or images alone), instead of .npy")
    export.add_argument("--placement", default="onnxruntime",
                        help="where a QAT model's ONNX puts its Q/DQ: onnxruntime or tensorrt")
    export.add_argument("--image-signatures", default="",
                        help="extra SavedModel signatures for TF Serving clients: image_bytes "
                             "(encoded JPEG/PNG), uint8 (uint8 images), comma-separated")
    export.add_argument("--tolerance", type=float, default=None,
                        help="allowed error relative to each output's largest magnitude "
                             "(default: the precision's)")
    export.add_argument("--overwrite", action="store_true", help="replace existing artifacts")
    export.add_argument("--fp16-io", action="store_true",
                        help="with --precision fp16: float16 inputs and outputs in the ONNX")

    bench = sub.add_parser("bench", help="benchmark models and artifacts",
                           description="Time .keras models, SavedModels, .onnx files and "
                                       "OpenVINO IRs on every engine present (OpenVINO too, "
                                       "when installed), at each batch size, with each "
                                       "engine's peak memory.")
    bench.add_argument("artifacts", nargs="+",
                       help=".keras, .onnx, OpenVINO IR (.xml or its folder) or SavedModel folder")
    bench.add_argument("--batch", default="1,8,32", help="comma-separated batch sizes")
    bench.add_argument("--inputs", help=".npy inputs (default: random, shaped like the model)")
    bench.add_argument("--labels", help=".npy integer labels, for an accuracy column")
    bench.add_argument("--data", help="a folder of images instead of --inputs/--labels: its "
                                      "val/ split or class sub-folders give the accuracy column")
    bench.add_argument("--repeats", default="20", help="timed calls per batch size (>= 1)")
    bench.add_argument("--json", help="also write the results as JSON here")
    bench.add_argument("--plot", help="also write a latency/size bar chart (PNG) here")
    bench.add_argument("--openvino-modes", default="latency",
                       help="OpenVINO performance hints to time: latency, throughput or both "
                            "(comma-separated)")
    bench.add_argument("--no-memory", action="store_true",
                       help="skip the peak-memory probe (a fresh process per engine)")

    inspect = sub.add_parser("inspect", help="per-layer sparsity and quantization summary",
                             description="Summarize a .keras model or a SavedModel.")
    inspect.add_argument("model", help=".keras file, .onnx file or SavedModel folder")
    inspect.add_argument("--baseline", help="a .keras model to compare parameters and FLOPs "
                                            "with (the dense model before pruning)")
    return parser


class UsageError(Exception):
    """Bad input from the command line: exit code 2."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("tf2onnx", "tensorflow", "absl"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        print(f"tfopt {args.command}: interrupted; files being written were left as they "
              "were.", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the command's one place for every failure
        if args.debug:
            traceback.print_exc()
        print(f"tfopt {args.command}: error: {_describe(exc, args.debug)}", file=sys.stderr)
        return 2


def _describe(exc: BaseException, debug: bool) -> str:
    """One line: what failed, why, what to do."""
    from tfopt.errors import TfoptError

    if isinstance(exc, (UsageError, TfoptError)):
        return _one_line(exc)
    if isinstance(exc, MemoryError):
        return ("out of memory. Use smaller batch sizes or fewer inputs, or a machine with "
                "more memory.")
    if isinstance(exc, OSError) and exc.errno is not None:
        return (f"{exc.strerror or exc} ({exc.filename or 'a file'}). Check the path, the "
                "permissions and the free disk space.")
    hint = "" if debug else " Rerun with --debug for the traceback;"
    return (f"unexpected {type(exc).__name__}: {_one_line(exc)[:400]}.{hint} if the inputs "
            "look right, please report it.")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _positive_int(value: str, option: str) -> int:
    text = value.strip()
    if not text.isdigit() or int(text) < 1:
        raise UsageError(f"{option} takes a positive integer, got {value!r}")
    return int(text)


def _cmd_run(args) -> int:
    from tfopt import _pipeline, _recipe

    recipe = _recipe.load(args.recipe)  # validated before any work
    output = Path(args.output or Path("runs") / recipe.spec["name"])
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output} is a file; pass a folder (created if missing)")
    metrics = _pipeline.run(recipe, output, verbose=0 if args.quiet else 1, resume=args.resume)
    print(metrics["headline"])
    for precision, failed in (metrics.get("export_failures") or {}).items():
        print(f"Not exported ({precision}): {', '.join(failed)}; the report says why.")
    print(metrics["cpu"])
    print(f"Report: {output / 'report.md'}")
    return 0


def _load_array(path: Optional[str], what: str):
    import numpy as np

    if path is None:
        return None
    if not Path(path).is_file():
        raise UsageError(f"{what}: no file {path}")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise UsageError(f"{what}: {path} is not a readable .npy file ({_one_line(exc)[:200]}). "
                         "Save the array with numpy.save('x.npy', x).") from None
    if not isinstance(array, np.ndarray):  # an .npz archive
        raise UsageError(f"{what}: {path} is an .npz archive; pass one .npy array "
                         "(numpy.save('x.npy', x)).")
    if array.dtype.kind not in "biuf":
        raise UsageError(f"{what}: {path} holds {array.dtype} values; pass numbers.")
    if array.ndim == 0 or len(array) == 0:
        raise UsageError(f"{what}: {path} is empty (shape {array.shape}); pass a batch of "
                         "samples.")
    return array


def _load_keras(path: str):
    import keras

    import tfopt  # noqa: F401 - registers tfopt's serializable classes
    from tfopt.errors import ArtifactLoadError

    if not Path(path).exists():
        raise UsageError(f"no model at {path}")
    if not str(path).endswith(".keras"):
        raise UsageError(f"{path} is not a .keras file (save with model.save('m.keras'))")
    if not Path(path).is_file():
        raise UsageError(f"{path} is a folder, not a .keras file (save with "
                         "model.save('m.keras'))")
    try:
        from tfopt._quiet import third_party_quiet

        with third_party_quiet():
            return keras.models.load_model(path)
    except Exception as exc:  # noqa: BLE001 - zipfile, h5py, Keras: all mean the same here
        raise ArtifactLoadError(
            f"cannot load {path}: {type(exc).__name__}: {_one_line(exc)[:200]}. The file is "
            "truncated or not a Keras 3 model; save it again with model.save('m.keras') "
            "(custom layers must be importable and registered).") from None


def _cmd_export(args) -> int:
    import tfopt

    model = _load_keras(args.model)
    if args.data and args.validation_data:
        raise UsageError("pass --data or --validation-data, not both")
    validation = _load_array(args.validation_data, "--validation-data")
    if args.data:
        validation = _folder(args.data, _input_shape(args.model))
    formats = tuple(args.formats or ("saved_model", "onnx"))
    result = tfopt.export(model, args.output, formats=formats,
                          precision=args.precision, overwrite=args.overwrite,
                          fp16_io=args.fp16_io, placement=args.placement,
                          tolerance=args.tolerance, validation_data=validation,
                          image_signatures=[k for k in args.image_signatures.split(",") if k])
    print(result.summary())
    return 0


def _cmd_bench(args) -> int:
    import numpy as np

    import tfopt

    batches = [_positive_int(b, "--batch") for b in args.batch.split(",")]
    repeats = _positive_int(args.repeats, "--repeats")
    modes = tuple(m.strip() for m in args.openvino_modes.split(",") if m.strip())
    if not modes or any(m not in ("latency", "throughput") for m in modes):
        raise UsageError(f"--openvino-modes takes latency and/or throughput, got "
                         f"{args.openvino_modes!r}")
    artifacts = []
    for item in args.artifacts:
        if not Path(item).exists():
            raise UsageError(f"no artifact at {item}")
        artifacts.extend(_runners(item, openvino_modes=modes))
    if args.data and (args.inputs or args.labels):
        raise UsageError("pass --data, or --inputs (and --labels), not both")
    inputs = _load_array(args.inputs, "--inputs")
    if args.data:
        inputs = _folder(args.data, _input_shape(args.artifacts[0]))
    elif inputs is None:
        shape = _input_shape(args.artifacts[0])
        if not shape or any(not d for d in shape):
            raise UsageError(f"{args.artifacts[0]} has a dynamic input shape {shape}: pass "
                             "--inputs x.npy with real inputs")
        print(f"No --inputs: timing random inputs of shape {shape}.", file=sys.stderr)
        inputs = np.random.default_rng(0).uniform(size=(max(batches), *shape)).astype("float32")
    labels = _load_array(args.labels, "--labels")
    if labels is not None and len(labels) != len(inputs):
        raise UsageError(f"--labels has {len(labels)} labels for {len(inputs)} inputs; pass one "
                         "integer label per input row.")
    report = tfopt.bench.run(artifacts, inputs, batch_sizes=batches, repeats=repeats,
                             labels=labels, memory=not args.no_memory)
    print(report.table())
    if args.json:
        report.write_json(args.json)
    if args.plot:
        report.plot(args.plot)
    return 0


def _runners(item: str, openvino_modes):
    import tfopt
    from tfopt.errors import ArtifactLoadError, TfoptError

    if item.endswith(".keras"):
        return tfopt.bench.runners_for(_load_keras(item), Path(item).stem)
    try:
        return tfopt.bench.runners_for(item, openvino_modes=openvino_modes,
                                       openvino_from_onnx=True)
    except TfoptError:
        raise
    except Exception as exc:  # noqa: BLE001 - onnx, onnxruntime, TF loaders alike
        raise ArtifactLoadError(
            f"cannot load {item}: {type(exc).__name__}: {_one_line(exc)[:200]}. The file is "
            "truncated or not what its name says; export it again with tfopt export.") from None


def _folder(path: str, input_shape: tuple):
    """The images of a folder, sized for a model whose one sample has ``input_shape``."""
    import tfopt

    if len(input_shape) != 3 or not all(input_shape[:2]) or input_shape[2] not in (1, 3, 4):
        raise UsageError(f"--data {path}: the model's input has shape {input_shape}, not "
                         "(height, width, 1, 3 or 4 channels); pass .npy arrays instead")
    mode = {1: "grayscale", 3: "rgb", 4: "rgba"}[input_shape[2]]
    return tfopt.datasets.image_folder_for_evaluation(path, input_shape[:2], color_mode=mode)


def _input_shape(artifact: str) -> tuple:
    path = Path(artifact)
    try:
        if path.suffix == ".xml" or (path.is_dir() and any(path.glob("*.xml"))):
            from tfopt.artifacts._openvino import _core, model_path

            shape = _core().read_model(str(model_path(path))).inputs[0].get_partial_shape()
            return tuple(d.get_length() for d in list(shape)[1:])
        if path.suffix == ".onnx":
            import onnx

            graph = onnx.load(str(path), load_external_data=False).graph
            dims = graph.input[0].type.tensor_type.shape.dim
            return tuple(d.dim_value for d in dims[1:])
        if path.suffix == ".keras":
            return tuple(_load_keras(artifact).inputs[0].shape[1:])
        import tensorflow as tf

        serving = tf.saved_model.load(str(path)).signatures["serving_default"]
        spec = next(iter(serving.structured_input_signature[1].values()))
        return tuple(spec.shape[1:])
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"cannot read the input shape of {artifact} ({_one_line(exc)[:200]}); "
                         "pass --inputs x.npy") from None


def _cmd_inspect(args) -> int:
    from tfopt import _inspect

    path = Path(args.model)
    if not path.exists():
        raise UsageError(f"no model at {path}")
    baseline = Path(args.baseline) if args.baseline else None
    if baseline is not None and not baseline.exists():
        raise UsageError(f"no model at {baseline}")
    print(_inspect.summary(path) if baseline is None else _inspect.summary(path, baseline))
    return 0


_COMMANDS = {"run": _cmd_run, "export": _cmd_export, "bench": _cmd_bench, "inspect": _cmd_inspect}


if __name__ == "__main__":
    sys.exit(main())
