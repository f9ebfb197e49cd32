"""Recipes: YAML pipelines that `tfopt run` executes, validated before any work.

A recipe names a model, data, and the steps to apply: dense training,
pruning, QAT, export and benchmarking. Unknown keys, wrong types and
impossible values are reported with the file and line before anything runs.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import numbers
import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from tfopt.errors import ConfigError


class RecipeError(ConfigError):
    """A recipe file that cannot be run as written."""


def _number(low=None, high=None, integer=False, high_open=False, low_open=False):
    def check(value):
        kind = numbers.Integral if integer else numbers.Real
        if isinstance(value, str) and _looks_numeric(value):
            return (f"must be {'an integer' if integer else 'a number'}, not a string (YAML "
                    "1.1 reads 1e-3 and 1.0e9 as strings: write 0.001, 1.0e-3 or 1.0e+9, "
                    "unquoted)")
        if isinstance(value, bool) or not isinstance(value, kind):
            return f"must be {'an integer' if integer else 'a number'}"
        if not math.isfinite(value):
            return "must be a finite number"
        if low is not None and (value < low or (low_open and value == low)):
            return f"must be {'>' if low_open else '>='} {low}"
        if high is not None and (value > high or (high_open and value == high)):
            return f"must be {'<' if high_open else '<='} {high}"
        return None
    return check


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _name(value):
    if not isinstance(value, str):
        return "must be a string"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", value) or ".." in value:
        return ("must be a plain folder name (letters, digits, '_', '-', '.'; no '/' or "
                "'..'): it names the output folder runs/<name>")
    return None


def _string(choices=None):
    def check(value):
        if not isinstance(value, str):
            return "must be a string"
        if choices and value not in choices:
            return f"must be one of {list(choices)}"
        return None
    return check


def _list_of(item_check, length=None):
    def check(value):
        if not isinstance(value, list) or not value:
            return "must be a non-empty list"
        if length is not None and len(value) != length:
            return f"must be a list of {length}"
        for item in value:
            problem = item_check(item)
            if problem:
                return f"items {problem}"
        return None
    return check


def _boolean(value):
    return None if isinstance(value, bool) else "must be true or false"


def _mapping(value):
    return None if isinstance(value, dict) else "must be a mapping"


SPARSITY = _number(0, 1, high_open=True)
POSITIVE_INT = _number(1, integer=True)
EPOCHS = _number(0, integer=True)
RATE = _number(0, low_open=True)

# section -> {key: (check, required)}
SCHEMA: dict[str, dict[str, tuple[Callable[[Any], Optional[str]], bool]]] = {
    "": {"name": (_name, True), "seed": (_number(0, integer=True), False),
         "model": (_mapping, True), "data": (_mapping, True), "train": (_mapping, False),
         "prune": (_mapping, False), "finetune": (_mapping, False),
         "quantize": (_mapping, False), "optimize": (_mapping, False),
         "export": (_mapping, False), "bench": (_mapping, False)},
    "model": {"source": (_string(), True), "args": (_mapping, False)},
    "data": {"source": (_string(), True), "args": (_mapping, False)},
    "train": {"epochs": (EPOCHS, False), "batch_size": (POSITIVE_INT, False),
              "learning_rate": (RATE, False)},
    "prune": {"schedule": (_string(("polynomial_decay", "constant")), False),
              "initial_sparsity": (SPARSITY, False), "final_sparsity": (SPARSITY, False),
              "ramp_fraction": (_number(0, 1, low_open=True), False),
              "frequency": (POSITIVE_INT, False),
              "n_m": (_list_of(_number(1, integer=True), length=2), False),
              "structure": (_string(("weights", "channels")), False),
              "importance": (_string(("l2", "bn_scale")), False),
              "layers": (_list_of(_string()), False),
              "skip_layers": (_list_of(_string()), False), "epochs": (EPOCHS, False),
              "batch_size": (POSITIVE_INT, False), "learning_rate": (RATE, False)},
    "finetune": {"epochs": (EPOCHS, False), "batch_size": (POSITIVE_INT, False),
                 "learning_rate": (RATE, False)},
    "quantize": {"config": (_string(("int8",)), False), "epochs": (EPOCHS, False),
                 "batch_size": (POSITIVE_INT, False), "learning_rate": (RATE, False),
                 "calibration_samples": (POSITIVE_INT, False)},
    "optimize": {"max_accuracy_drop": (_number(0), False), "target": (_mapping, True),
                 "metric": (_string(("accuracy",)), False), "epochs": (POSITIVE_INT, False),
                 "qat_epochs": (EPOCHS, False), "batch_size": (POSITIVE_INT, False),
                 "learning_rate": (RATE, False), "distillation": (_boolean, False),
                 "budget_seconds": (_number(0, low_open=True), False),
                 "max_rounds": (POSITIVE_INT, False)},
    "target": {"engine": (_string(("onnxruntime", "openvino")), False),
               "batch_size": (POSITIVE_INT, False), "speedup": (_number(1, low_open=True), False),
               "latency_ms": (_number(0, low_open=True), False),
               "flops": (_number(0, 1, low_open=True, high_open=True), False)},
    "export": {"formats": (_list_of(_string(("saved_model", "frozen_graph", "onnx", "openvino",
                                               "tensorrt", "tftrt", "triton"))), False),
               "precisions": (_list_of(_string(("fp32", "fp16", "int8"))), False),
               "opset": (_number(13, 21, integer=True), False),
               "placement": (_string(("onnxruntime", "tensorrt")), False),
               "tolerance": (_number(0, 1, low_open=True), False),
               "image_signatures": (_list_of(_string(("image_bytes", "uint8"))), False)},
    "bench": {"batch_sizes": (_list_of(POSITIVE_INT), False), "repeats": (POSITIVE_INT, False),
              "warmup": (EPOCHS, False), "min_seconds": (_number(0, 3600), False),
              "openvino_modes": (_list_of(_string(("latency", "throughput"))), False),
              "memory": (_boolean, False)},
}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A validated recipe: the parsed mapping, and the file it came from."""

    path: Path
    spec: dict

    def section(self, name: str) -> Optional[dict]:
        return self.spec.get(name)


def _duplicate_keys(node, prefix=()) -> list[tuple[str, int, int]]:
    """``(dotted key, line, first line)`` for every key repeated in one mapping."""
    found = []
    if isinstance(node, yaml.MappingNode):
        seen: dict = {}
        for key_node, value_node in node.value:
            key = prefix + (str(key_node.value),)
            line = key_node.start_mark.line + 1
            if key in seen:
                found.append((".".join(key), line, seen[key]))
            seen.setdefault(key, line)
            found += _duplicate_keys(value_node, key)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            found += _duplicate_keys(item, prefix)
    return found


def _line_map(node, prefix=(), lines=None) -> dict:
    """``{key path: line}`` for every mapping key in a composed YAML document."""
    lines = {} if lines is None else lines
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = prefix + (key_node.value,)
            lines[path] = key_node.start_mark.line + 1
            _line_map(value_node, path, lines)
    return lines


def load(path) -> Recipe:
    """Read and validate a recipe; raise one RecipeError listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"No recipe at {path}. Pass the path of a YAML recipe, e.g. "
                          "recipes/digits_prune_qat.yaml.")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"Cannot read the recipe {path}: {exc}. Pass a UTF-8 YAML file.") \
            from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        duplicates = _duplicate_keys(node)
        spec = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {' '.join(str(exc).split())}. Fix the "
                          "syntax at the line shown (indentation, a missing ':').") from None
    if duplicates:
        raise RecipeError("Recipe has problems:\n  " + "\n  ".join(
            f"{path}:{line}: key '{key}' appears twice (first at line {first}); keep one"
            for key, line, first in duplicates))
    if not isinstance(spec, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with at least 'name', 'model' and "
                          "'data'.")
    lines = _line_map(node)
    problems = []

    def where(key_path):
        line = lines.get(key_path)
        return f"{path}:{line}" if line else str(path)

    def check_section(name, values, key_path):
        schema = SCHEMA[name]
        for key, value in values.items():
            full = key_path + (key,)
            dotted = ".".join(map(str, full))
            if key not in schema:
                problems.append(f"{where(full)}: unknown key '{dotted}' (known: "
                                f"{', '.join(sorted(schema))})")
                continue
            problem = schema[key][0](value)
            if problem:
                problems.append(f"{where(full)}: '{dotted}' {problem}, got {value!r}")
            elif (name == "" or name == "optimize" and key == "target") and key in SCHEMA:
                check_section(key, value, full)
        for key, (_, required) in schema.items():
            if required and key not in values:
                label = ".".join(map(str, key_path + (key,)))
                problems.append(f"{where(key_path) if key_path else path}: missing "
                                f"required key '{label}'")

    check_section("", spec, ())
    prune = spec.get("prune") or {}
    if isinstance(prune, dict) and prune.get("n_m") and isinstance(prune["n_m"], list) \
            and len(prune["n_m"]) == 2 and all(isinstance(v, int) for v in prune["n_m"]) \
            and prune["n_m"][0] >= prune["n_m"][1]:
        problems.append(f"{where(('prune', 'n_m'))}: 'prune.n_m' needs n < m (n zeros in every "
                        f"m weights), got {prune['n_m']}")
    if isinstance(prune, dict) and prune.get("structure") == "channels" and "n_m" in prune:
        problems.append(f"{where(('prune', 'n_m'))}: 'prune.n_m' and 'prune.structure: "
                        "channels' are two different patterns; keep one")
    if isinstance(prune, dict) and "importance" in prune and prune.get("structure") != "channels":
        problems.append(f"{where(('prune', 'importance'))}: 'prune.importance' applies to "
                        "'prune.structure: channels' only; add it or remove importance")
    optimize = spec.get("optimize")
    if isinstance(optimize, dict):
        taken = [key for key in ("prune", "finetune", "quantize") if spec.get(key)]
        if taken:
            problems.append(f"{where(('optimize',))}: 'optimize' chooses the pruning and "
                            f"quantization itself; remove {', '.join(taken)} (or optimize)")
        target = optimize.get("target")
        if isinstance(target, dict):
            goals = [k for k in ("speedup", "latency_ms", "flops") if k in target]
            if len(goals) != 1:
                problems.append(f"{where(('optimize', 'target'))}: 'optimize.target' needs "
                                "exactly one of speedup, latency_ms and flops, got "
                                f"{goals or 'none'}")
    if problems:
        raise RecipeError("Recipe has problems:\n  " + "\n  ".join(problems))
    return Recipe(path, spec)


def import_entry_point(spec: str, beside: Optional[Path] = None):
    """``package.module:function`` -> the function.

    ``beside``: the recipe's folder. A module there (``prep.py`` next to the
    recipe) is found without ``PYTHONPATH``; importable modules come first.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise RecipeError(f"Entry point {spec!r} must look like 'package.module:function'.")
    try:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            top = module_name.split(".")[0]
            if beside is None or exc.name != top or not (
                    (beside / f"{top}.py").is_file() or (beside / top).is_dir()):
                raise
            sys.path.insert(0, str(beside))
            try:
                module = importlib.import_module(module_name)
            finally:
                sys.path.remove(str(beside))
        function = getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise RecipeError(f"Cannot import entry point {spec!r}: {exc}. Check the module is "
                          "importable (on PYTHONPATH, or a .py file beside the recipe) and "
                          "defines that function.") from None
    if not callable(function):
        raise RecipeError(f"Entry point {spec!r} is a {type(function).__name__}, not a "
                          "function.")
    return function
