"""The seed's workflow from a folder of JPEGs: tf.data wherever arrays are taken.

The folder is made here from scikit-learn's digits: each 8x8 digit becomes a
32x32 RGB JPEG (tf.io.encode_jpeg), one sub-folder per class, in train/ and
val/. Three classes keep it small.
"""

import json
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfopt
from tfopt import _pipeline, _recipe
from tfopt.errors import ConfigError

CLASSES = (0, 1, 2)
SIZE = 32


def write_jpegs(root, x, y, per_class):
    for label in CLASSES:
        folder = root / f"digit_{label}"
        folder.mkdir(parents=True)
        for i, image in enumerate(x[y == label][:per_class]):
            pixels = np.kron(image[..., 0], np.ones((SIZE // 8, SIZE // 8)))
            rgb = np.repeat((255 * pixels).astype("uint8")[..., None], 3, axis=-1)
            (folder / f"{i}.jpg").write_bytes(tf.io.encode_jpeg(rgb, quality=95).numpy())


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory, digits):
    (x, y), (x_test, y_test) = digits
    root = tmp_path_factory.mktemp("jpegs")
    write_jpegs(root / "train", x, y, per_class=60)
    write_jpegs(root / "val", x_test, y_test, per_class=15)
    return root


def small_cnn():
    inputs = keras.Input((SIZE, SIZE, 3), name="image")
    x = keras.layers.Rescaling(1 / 255.0)(inputs)  # preprocessing stays in the model
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="conv1")(x)
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu", name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(len(CLASSES), name="logits")(x))


def test_image_folder_streams_train_and_val_with_class_names(jpeg_folder):
    train, val = tfopt.datasets.image_folder(jpeg_folder, (SIZE, SIZE), batch_size=16)
    assert train.class_names == val.class_names == [f"digit_{c}" for c in CLASSES]
    x, y = next(iter(val))
    assert x.shape == (16, SIZE, SIZE, 3) and x.dtype == tf.float32 and y.dtype == tf.int32
    assert sum(len(b[1]) for b in val) == 45


@pytest.mark.parametrize("problem", ["one_class", "corrupt", "truncated", "empty_class", "no_val",
                                     "image_size", "batch_size", "split", "missing"])
def test_image_folder_refuses_what_it_cannot_train_on_by_name(tmp_path, digits, problem):
    (x, y), _ = digits
    size = (SIZE, SIZE)
    root = tmp_path / "data"
    if problem == "one_class":
        write_jpegs(root / "train", x, y, per_class=3)
        write_jpegs(root / "val", x, y, per_class=3)
        for folder in ("digit_1", "digit_2"):
            for f in (root / "val" / folder).iterdir():
                f.unlink()
        match = r"val/ .* 1 class folder\(s\) with images"
    elif problem == "corrupt":
        write_jpegs(root / "train", x, y, per_class=3)
        write_jpegs(root / "val", x, y, per_class=3)
        (root / "train" / "digit_1" / "1.jpg").write_bytes(b"<html>not an image</html>")
        match = r"1 file\(s\) .* not whole images .*digit_1/1\.jpg \(not a jpg file\)"
    elif problem == "truncated":
        write_jpegs(root / "train", x, y, per_class=3)
        write_jpegs(root / "val", x, y, per_class=3)
        image = root / "val" / "digit_2" / "0.jpg"
        image.write_bytes(image.read_bytes()[:len(image.read_bytes()) // 2])
        match = r"digit_2/0\.jpg \(cut short\)"
    elif problem == "empty_class":
        write_jpegs(root / "train", x, y, per_class=3)
        write_jpegs(root / "val", x, y, per_class=3)
        (root / "train" / "digit_9").mkdir()
        match = r"class folder\(s\) digit_9 hold no images"
    elif problem in ("batch_size", "split"):
        write_jpegs(root, x, y, per_class=3)
        size_or_split = {"batch_size": r"batch_size must be an integer >= 1, got the string '16'",
                         "split": r"validation_split must be a number > 0 and < 1, got 0"}
        with pytest.raises(ConfigError, match=size_or_split[problem]):
            if problem == "batch_size":
                tfopt.datasets.image_folder(root, size, batch_size="16", validation_split=0.2)
            else:
                tfopt.datasets.image_folder(root, size, validation_split=0)
        return
    elif problem == "no_val":
        write_jpegs(root / "train", x, y, per_class=3)
        match = "train/ but no val/"
    elif problem == "image_size":
        write_jpegs(root / "train", x, y, per_class=3)
        write_jpegs(root / "val", x, y, per_class=3)
        size = (SIZE, "wide")
        match = r"image_size must be \[height, width\]"
    else:
        match = "is not a folder"
    with pytest.raises(ConfigError, match=match):
        tfopt.datasets.image_folder(root, size)


def test_export_and_bench_take_datasets(jpeg_folder, tmp_path):
    train, val = tfopt.datasets.image_folder(jpeg_folder, (SIZE, SIZE), batch_size=16)
    model = small_cnn()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(train, epochs=3, verbose=0)
    result = tfopt.export(model, tmp_path / "out", formats=("onnx",), validation_data=val)
    assert result.max_abs_error < 1e-4
    # Labels came with the dataset: the manifest gives each artifact's accuracy beside Keras's.
    validation = result.manifest["validation"]
    assert validation["samples"] == 45
    assert validation["accuracy"]["onnx"] == pytest.approx(validation["keras_accuracy"])
    assert validation["keras_accuracy"] == pytest.approx(model.evaluate(val, verbose=0)[1])
    # Unlabelled and unbatched elements are read too.
    unbatched = val.unbatch().map(lambda image, label: image)
    again = tfopt.export(model, tmp_path / "again", formats=("onnx",), validation_data=unbatched)
    assert again.max_abs_error < 1e-4
    with pytest.raises(ConfigError, match="empty tf.data.Dataset"):
        tfopt.export(model, tmp_path / "none", formats=("onnx",), validation_data=val.take(0))

    report = tfopt.bench.run([model, result.paths["onnx"]], val, batch_sizes=(1, 4),
                             repeats=2, warmup=1, min_seconds=0, progress=False, memory=False)
    assert report.environment["accuracy_samples"] == 45
    keras_accuracy = model.evaluate(val, verbose=0)[1]
    onnx_rows = [r for r in report.rows if r.backend == "ort_cpu"]
    assert onnx_rows and all(r.accuracy == pytest.approx(keras_accuracy, abs=1e-6)
                             for r in onnx_rows)
    with pytest.raises(ConfigError, match="repeats forever"):
        tfopt.bench.run([result.paths["onnx"]], val.repeat(), progress=False)
    with pytest.raises(ConfigError, match="labels= with a tf.data.Dataset"):
        tfopt.bench.run([model], val, labels=np.zeros(45, "int32"), progress=False)


def test_a_recipe_runs_the_workflow_from_a_folder_of_jpegs(jpeg_folder, tmp_path):
    # The model's module sits beside the recipe: found without PYTHONPATH.
    (tmp_path / "my_models.py").write_text(textwrap.dedent(f"""
        import keras

        def small_cnn():
            inputs = keras.Input(({SIZE}, {SIZE}, 3), name="image")
            x = keras.layers.Rescaling(1 / 255.0)(inputs)
            x = keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="conv1")(x)
            x = keras.layers.Conv2D(16, 3, strides=2, activation="relu", name="conv2")(x)
            x = keras.layers.GlobalAveragePooling2D()(x)
            return keras.Model(inputs, keras.layers.Dense({len(CLASSES)}, name="logits")(x))
    """))
    from tfopt.artifacts._openvino import available

    formats = "saved_model, onnx" + (", openvino" if available() else "")
    recipe = tmp_path / "jpegs.yaml"
    recipe.write_text(textwrap.dedent(f"""
        name: jpegs
        model: {{source: "my_models:small_cnn"}}
        data:
          source: image_folder
          args: {{directory: "{jpeg_folder}", image_size: [{SIZE}, {SIZE}], batch_size: 16}}
        train: {{epochs: 4, learning_rate: 0.003}}
        prune: {{structure: channels, final_sparsity: 0.25, epochs: 2}}
        finetune: {{epochs: 1}}
        quantize: {{epochs: 1, calibration_samples: 64}}
        export: {{formats: [{formats}], image_signatures: [image_bytes]}}
        bench: {{batch_sizes: [1], repeats: 2, warmup: 1, min_seconds: 0, memory: false}}
    """))
    metrics = _pipeline.run(_recipe.load(recipe), tmp_path / "run", verbose=0)
    assert metrics["validation_samples"] == 45
    assert any(s.startswith("fine-tuning the stripped model") for s in metrics["steps"])
    assert json.loads((tmp_path / "run" / "stages" / "state.json").read_text())["finished"] == [
        "trained", "pruned", "finetuned", "qat"]
    accuracy = metrics["artifacts_accuracy"]
    assert "optimized onnx int8 / ORT CPU" in accuracy
    assert "baseline saved_model / TensorFlow" in accuracy
    if available():
        assert any(name.startswith("optimized openvino int8") for name in accuracy), accuracy
    assert metrics["baseline_accuracy"] > 0.6  # three digits, four epochs: it learned
    report = (tmp_path / "run" / "report.md").read_text()
    assert "over all 45 test samples" in report
    manifest = json.loads((tmp_path / "run" / "manifest_int8.json").read_text())
    assert "serving_image_bytes" in manifest["artifacts"]["saved_model"]["image_signatures"]
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["artifacts_accuracy"] == pytest.approx(accuracy)


def test_savedmodel_image_signatures_take_encoded_files_and_uint8_images(tmp_path, digits):
    model = small_cnn()
    (x, y), _ = digits
    images = np.stack([np.repeat((255 * np.kron(i[..., 0], np.ones((4, 4))))[..., None], 3, -1)
                       for i in x[:8]]).astype("float32")
    result = tfopt.export(model, tmp_path / "out", formats=("saved_model",),
                          validation_data=images, image_signatures=["image_bytes", "uint8"])
    checked = result.manifest["artifacts"]["saved_model"]["image_signatures"]
    assert set(checked) == {"serving_image_bytes", "serving_uint8"}
    assert all(v["max_rel_to_serving_default"] <= 1e-5 for v in checked.values())

    loaded = tf.saved_model.load(str(result.paths["saved_model"]))
    # A client sends JPEGs of another size: decoded and resized inside the SavedModel.
    raw = np.random.default_rng(0).integers(0, 255, (3, 20, 24, 3), dtype=np.uint8)
    files = [tf.io.encode_jpeg(image).numpy() for image in raw]
    (output,) = loaded.signatures["serving_default"].structured_outputs
    got = loaded.signatures["serving_image_bytes"](image_bytes=tf.constant(files))[output]
    decoded = np.stack([tf.io.decode_jpeg(f).numpy() for f in files]).astype("float32")
    want = model(tf.image.resize(decoded, (SIZE, SIZE)))
    np.testing.assert_allclose(got.numpy(), np.asarray(want), rtol=1e-4, atol=1e-4)
    got = loaded.signatures["serving_uint8"](images=tf.constant(raw))[output]
    want = model(tf.image.resize(raw.astype("float32"), (SIZE, SIZE)))
    np.testing.assert_allclose(got.numpy(), np.asarray(want), rtol=1e-4, atol=1e-4)

    # A QAT model's SavedModel is a frozen graph: its image signatures wrap that one.
    qat = tfopt.quantize(model, calibration_data=images)
    frozen = tfopt.export(qat, tmp_path / "qat", formats=("saved_model",),
                          validation_data=images, image_signatures=["image_bytes"])
    assert frozen.manifest["artifacts"]["saved_model"]["image_signatures"][
        "serving_image_bytes"]["max_rel_to_serving_default"] <= 1e-5


def test_image_signatures_are_refused_where_they_cannot_apply(tmp_path):
    with pytest.raises(ConfigError, match="add 'saved_model' to formats"):
        tfopt.export(small_cnn(), tmp_path / "a", formats=("onnx",),
                     image_signatures=["image_bytes"])
    with pytest.raises(ConfigError, match="Unknown image_signatures"):
        tfopt.export(small_cnn(), tmp_path / "b", image_signatures=["jpeg"])
    inputs = keras.Input((6,))
    vector = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    with pytest.raises(ConfigError, match="one image input"):
        tfopt.export(vector, tmp_path / "c", image_signatures=["uint8"])
    assert not any((tmp_path / d).exists() for d in "abc")


@pytest.mark.parametrize("mismatch", ["classes", "image_size"])
def test_a_recipe_whose_model_does_not_fit_its_folder_is_refused_before_anything(
        jpeg_folder, tmp_path, mismatch):
    (tmp_path / "two.py").write_text(textwrap.dedent(f"""
        import keras

        def classifier(classes=2, size={SIZE}):
            inputs = keras.Input((size, size, 3))
            x = keras.layers.GlobalAveragePooling2D()(inputs)
            return keras.Model(inputs, keras.layers.Dense(classes)(x))
    """))
    args = {"classes": "{classes: 2}", "image_size": "{classes: 3, size: 16}"}[mismatch]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent(f"""
        name: r
        model: {{source: "two:classifier", args: {args}}}
        data: {{source: image_folder, args: {{directory: "{jpeg_folder}", image_size: [{SIZE}, {SIZE}]}}}}
        train: {{epochs: 1}}
    """))
    match = {"classes": "has 3 classes, the model's output has 2",
             "image_size": r"Set data.args.image_size to \[16, 16\]"}[mismatch]
    with pytest.raises(_recipe.RecipeError, match=match):
        _pipeline.run(_recipe.load(recipe), tmp_path / "out", verbose=0)
    assert not (tmp_path / "out").exists()
