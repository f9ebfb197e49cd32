"""The ``tfopt`` command: run recipes, export, benchmark and inspect models.

Exit codes: 0 on success; 2 with a one-line reason on stderr for bad input
(a missing file, a bad recipe, an invalid option); 1 for other tfopt errors.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tfopt", description="Make Keras models smaller and faster to serve.")
    parser.add_argument("-q", "--quiet", action="store_true", help="only print results")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a recipe: train, prune, quantize, export, bench",
                         description="Run a YAML recipe and write report.md, plots, "
                                     "metrics.json and the export manifests into --output.")
    run.add_argument("recipe", help="path of the YAML recipe")
    run.add_argument("--output", "-o", help="output directory (default: runs/<recipe name>)")

    export = sub.add_parser("export", help="export a .keras model",
                            description="Export a .keras model and validate every artifact.")
    export.add_argument("model", help="path of a .keras model")
    export.add_argument("--format", "-f", action="append", dest="formats",
                        help="saved_model, frozen_graph, onnx, tensorrt, tftrt or triton "
                             "(repeat for several; default saved_model and onnx)")
    export.add_argument("--precision", default="fp32", help="fp32, fp16 or int8")
    export.add_argument("--output", "-o", required=True, help="export directory")
    export.add_argument("--validation-data", help=".npy file of real inputs (recommended)")
    export.add_argument("--overwrite", action="store_true", help="replace existing artifacts")

    bench = sub.add_parser("bench", help="benchmark models and artifacts",
                           description="Time .keras models, SavedModels and .onnx files on "
                                       "every backend present, at each batch size.")
    bench.add_argument("artifacts", nargs="+", help=".keras, .onnx or SavedModel folder")
    bench.add_argument("--batch", default="1,8,32", help="comma-separated batch sizes")
    bench.add_argument("--inputs", help=".npy inputs (default: random, shaped like the model)")
    bench.add_argument("--labels", help=".npy integer labels, for an accuracy column")
    bench.add_argument("--repeats", type=int, default=20)
    bench.add_argument("--json", help="also write the results as JSON here")
    bench.add_argument("--plot", help="also write a latency/size bar chart (PNG) here")

    inspect = sub.add_parser("inspect", help="per-layer sparsity and quantization summary",
                             description="Summarize a .keras model or a SavedModel.")
    inspect.add_argument("model", help=".keras file, .onnx file or SavedModel folder")
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
    from tfopt.errors import TfoptError

    try:
        return _COMMANDS[args.command](args)
    except (UsageError, FileNotFoundError, TfoptError) as exc:
        # A user mistake (bad file, recipe or option) is 2; a missing backend 1.
        mistake = isinstance(exc, (UsageError, FileNotFoundError, ValueError, TypeError))
        print(f"tfopt {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2 if mistake else 1


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _cmd_run(args) -> int:
    from tfopt import _pipeline, _recipe

    recipe = _recipe.load(args.recipe)  # validated before any work
    output = Path(args.output or Path("runs") / recipe.spec["name"])
    metrics = _pipeline.run(recipe, output, verbose=0 if args.quiet else 1)
    print(metrics["headline"])
    print(f"Report: {output / 'report.md'}")
    return 0


def _load_array(path: Optional[str], what: str):
    import numpy as np

    if path is None:
        return None
    if not Path(path).is_file():
        raise UsageError(f"{what}: no file {path}")
    return np.load(path)


def _load_keras(path: str):
    import keras

    import tfopt  # noqa: F401 - registers tfopt's serializable classes

    if not Path(path).exists():
        raise UsageError(f"no model at {path}")
    if not path.endswith(".keras"):
        raise UsageError(f"{path} is not a .keras file (save with model.save('m.keras'))")
    return keras.models.load_model(path)


def _cmd_export(args) -> int:
    import tfopt

    model = _load_keras(args.model)
    result = tfopt.export(model, args.output, formats=tuple(args.formats or ("saved_model", "onnx")),
                          precision=args.precision, overwrite=args.overwrite,
                          validation_data=_load_array(args.validation_data, "--validation-data"))
    print(result.summary())
    return 0


def _cmd_bench(args) -> int:
    import numpy as np

    import tfopt

    try:
        batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        raise UsageError(f"--batch takes comma-separated integers, got {args.batch!r}") from None
    artifacts = []
    for item in args.artifacts:
        if not Path(item).exists():
            raise UsageError(f"no artifact at {item}")
        artifacts.extend(tfopt.bench.runners_for(item))
    inputs = _load_array(args.inputs, "--inputs")
    if inputs is None:
        shape = _input_shape(args.artifacts[0])
        print(f"No --inputs: timing random inputs of shape {shape}.", file=sys.stderr)
        inputs = np.random.default_rng(0).uniform(size=(max(batches), *shape)).astype("float32")
    report = tfopt.bench.run(artifacts, inputs, batch_sizes=batches, repeats=args.repeats,
                             labels=_load_array(args.labels, "--labels"))
    print(report.table())
    if args.json:
        report.write_json(args.json)
    if args.plot:
        report.plot(args.plot)
    return 0


def _input_shape(artifact: str) -> tuple:
    path = Path(artifact)
    if path.suffix == ".onnx":
        import onnx

        dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
        return tuple(d.dim_value for d in dims[1:])
    if path.suffix == ".keras":
        return tuple(_load_keras(artifact).inputs[0].shape[1:])
    import tensorflow as tf

    serving = tf.saved_model.load(str(path)).signatures["serving_default"]
    spec = next(iter(serving.structured_input_signature[1].values()))
    return tuple(spec.shape[1:])


def _cmd_inspect(args) -> int:
    from tfopt import _inspect

    path = Path(args.model)
    if not path.exists():
        raise UsageError(f"no model at {path}")
    print(_inspect.summary(path))
    return 0


_COMMANDS = {"run": _cmd_run, "export": _cmd_export, "bench": _cmd_bench, "inspect": _cmd_inspect}


if __name__ == "__main__":
    sys.exit(main())
