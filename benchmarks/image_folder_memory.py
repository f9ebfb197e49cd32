"""Peak memory of `tfopt run` on a folder of images: it must not grow with the number of images.

For each size in ``--images`` (default 1,000 and 8,000 training images), a
folder of 64x64 RGB JPEGs is written from scikit-learn's digits (each 8x8
digit upscaled, ten classes, a quarter as many in ``val/``), and a recipe
with ``data: {source: image_folder}`` runs the whole workflow on it in a
fresh process (``tfopt run``: dense training, channel pruning, QAT,
SavedModel + ONNX export, bench). The process's peak resident memory
(``ru_maxrss`` of the child) is printed per size, with the ratio to the
smallest.

Usage: python benchmarks/image_folder_memory.py [--images 1000,8000] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64


def write_folder(root: Path, train_images: int) -> None:
    import numpy as np
    import tensorflow as tf

    import tfopt

    (x, y), (x_test, y_test) = tfopt.datasets.load_digits()
    for split, xs, ys, count in (("train", x, y, train_images),
                                 ("val", x_test, y_test, train_images // 4)):
        for i in range(count):
            label = int(ys[i % len(ys)])
            folder = root / split / f"digit_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = np.kron(xs[i % len(xs)][..., 0], np.ones((SIZE // 8, SIZE // 8)))
            rgb = np.repeat((255 * pixels).astype("uint8")[..., None], 3, axis=-1)
            (folder / f"{i}.jpg").write_bytes(tf.io.encode_jpeg(rgb, quality=90).numpy())


RECIPE = """
name: memory
model: {{source: "memory_model:small_cnn"}}
data:
  source: image_folder
  args: {{directory: "{directory}", image_size: [{size}, {size}], batch_size: 32}}
train: {{epochs: 1}}
prune: {{structure: channels, final_sparsity: 0.5, epochs: 1}}
quantize: {{epochs: 1, calibration_samples: 64}}
export: {{formats: [saved_model, onnx]}}
bench: {{batch_sizes: [1], repeats: 5, warmup: 1, min_seconds: 0, memory: false}}
"""

MODEL = f"""
import keras

def small_cnn():
    inputs = keras.Input(({SIZE}, {SIZE}, 3), name="image")
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu", name="conv1")(x)
    x = keras.layers.Conv2D(32, 3, strides=2, activation="relu", name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10, name="logits")(x))
"""


def peak_rss_of_run(work: Path, images: int) -> dict:
    folder = work / f"images_{images}"
    write_folder(folder, images)
    (work / "memory_model.py").write_text(textwrap.dedent(MODEL))
    recipe = work / f"memory_{images}.yaml"
    recipe.write_text(RECIPE.format(directory=folder, size=SIZE))
    started = time.perf_counter()
    # A fresh interpreter per run; ru_maxrss of RUSAGE_CHILDREN is the largest child's peak,
    # so each run gets a wrapper process of its own that reports its one child.
    probe = textwrap.dedent(f"""
        import resource, subprocess, sys
        done = subprocess.run([sys.executable, "-m", "tfopt.cli", "-q", "run", {str(recipe)!r},
                               "--output", {str(work / f"run_{images}")!r}],
                              capture_output=True, text=True)
        if done.returncode:
            sys.exit(done.stderr[-3000:])
        print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    """)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if done.returncode:
        raise SystemExit(f"tfopt run failed on {images} images:\n{done.stderr}")
    metrics = json.loads((work / f"run_{images}" / "metrics.json").read_text())
    return {"train_images": images, "val_images": images // 4,
            "peak_rss_mb": int(done.stdout.split()[-1]) / 1024,
            "seconds": time.perf_counter() - started,
            "validation_samples": metrics["validation_samples"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default="1000,8000")
    parser.add_argument("--json", type=Path,
                        default=ROOT / "benchmarks" / "results" / "image_folder_memory.json")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from tfopt.targets._cpu_int8 import describe_cpu

    rows = []
    with tempfile.TemporaryDirectory(prefix="tfopt-memory-") as tmp:
        for images in (int(n) for n in args.images.split(",")):
            rows.append(peak_rss_of_run(Path(tmp), images))
            print(f"{images:>6} training images: peak RSS {rows[-1]['peak_rss_mb']:.0f} MB "
                  f"({rows[-1]['seconds']:.0f} s)", flush=True)
    base = rows[0]["peak_rss_mb"]
    print("\n| training images | val images | peak RSS of tfopt run | vs smallest |")
    print("| ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['train_images']:,} | {row['val_images']:,} | {row['peak_rss_mb']:.0f} MB | "
              f"{row['peak_rss_mb'] / base:.2f}x |")
    print(f"\n{describe_cpu()}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"cpu": describe_cpu(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
