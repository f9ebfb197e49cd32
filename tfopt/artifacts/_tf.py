"""TensorFlow runners: a SavedModel's ``serving_default`` (what TF Serving runs), a frozen graph."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from tfopt.artifacts._runner import Runner, find_manifest, manifest_io, ordered


def saved_model_runner(path: Path, *, label: str = "saved_model",
                       inputs: Optional[Sequence[str]] = None,
                       outputs: Optional[Sequence[str]] = None,
                       signature_key: str = "serving_default", jit_compile: bool = False) -> Runner:
    """A SavedModel loaded once, its ``serving_default`` called with named inputs.

    Outputs come back in the order of ``outputs`` (default: the manifest
    beside the SavedModel, else sorted by name, the order TF Serving's
    signature map has).
    """
    path = Path(path)
    if inputs is None or outputs is None:
        spec_in, spec_out = manifest_io(find_manifest(path))
        inputs = inputs or ([i["name"] for i in spec_in] if spec_in else None)
        outputs = outputs or spec_out
    serving = tf.saved_model.load(str(path)).signatures[signature_key]
    names = ordered(sorted(serving.structured_input_signature[1]), inputs)
    outs = ordered(sorted(serving.structured_outputs), outputs)
    call = tf.function(serving, jit_compile=True) if jit_compile else serving

    def run(arrays):
        result = call(**{n: tf.constant(a) for n, a in zip(names, arrays)})
        return [result[o] for o in outs]

    def fetch(values):
        return [v.numpy() for v in values]

    spec = {"loader": "saved_model", "path": str(path)}
    return Runner(f"{label} / TensorFlow", "saved_model", path, run, "fp32", tuple(outs),
                  fetch, spec)


def frozen_graph_runner(path: Path, input_tensors: Sequence[str], output_tensors: Sequence[str],
                        outputs: Sequence[str], label: str = "frozen_graph") -> Runner:
    """A frozen GraphDef imported once; ``output_tensors`` are named ``outputs``."""
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(Path(path).read_bytes())

    def import_graph():
        tf.compat.v1.import_graph_def(graph_def, name="")

    wrapped = tf.compat.v1.wrap_function(import_graph, [])
    graph = wrapped.graph
    fn = wrapped.prune([graph.get_tensor_by_name(n) for n in input_tensors],
                       [graph.get_tensor_by_name(n) for n in output_tensors])

    def run(arrays):
        return fn(*[tf.constant(a) for a in arrays])

    def fetch(values):
        return [np.asarray(v) for v in values]

    return Runner(f"{label} / TensorFlow", "frozen_graph", Path(path), run, "fp32",
                  tuple(outputs), fetch)
