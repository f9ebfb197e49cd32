"""Transformer encoders through QAT and the INT8 export: int8 lookup tables, any length.

A tiny BERT trained on a real text task (``tfopt.datasets.load_python_docs``:
which part of Python's language reference a 32-word window comes from),
quantized with its embeddings, fine-tuned, exported; the INT8 ONNX must
decide what the Keras QAT model decides on the held-out windows, at the
trained length and at a shorter one.
"""

import warnings

import keras
import numpy as np
import onnx
import pytest
from keras import layers

import tfopt
from tfopt.quantization import QuantizeTable
from tfopt.quantization._api import quant_wrappers

LENGTH = 32


def _hub():
    return pytest.importorskip("keras_hub")


def _inputs(ids):
    return {"token_ids": ids, "padding_mask": (ids > 0).astype("int32"),
            "segment_ids": np.zeros_like(ids)}


@pytest.fixture(scope="module")
def text_task():
    (x_train, y_train), (x_test, y_test), names = tfopt.datasets.load_python_docs(LENGTH)
    return _inputs(x_train), y_train, _inputs(x_test), y_test, len(names)


@pytest.fixture(scope="module")
def trained_bert(text_task):
    """A 2-layer BERT classifier trained on the text task (about 15 s on 2 cores)."""
    x_train, y_train, x_test, y_test, classes = text_task
    keras.utils.set_random_seed(0)
    backbone = _hub().models.BertBackbone(
        vocabulary_size=2000, num_layers=2, num_heads=2, hidden_dim=64, intermediate_dim=128,
        max_sequence_length=LENGTH, dropout=0.0)
    inputs = {k: keras.Input((None,), dtype="int32", name=k) for k in x_train}
    logits = layers.Dense(classes, name="logits")(backbone(inputs)["pooled_output"])
    model = keras.Model(inputs, logits, name="docs_bert")
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(x_train, y_train, batch_size=32, epochs=8, verbose=0)
    accuracy = model.evaluate(x_test, y_test, verbose=0)[1]
    assert accuracy > 0.6, accuracy  # four classes: the largest is 31% of the test split
    return model, accuracy


def test_trained_bert_int8_with_int8_tables_decides_what_keras_qat_decides(
        trained_bert, text_task, tmp_path):
    model, float_accuracy = trained_bert
    x_train, y_train, x_test, y_test, _ = text_task
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = tfopt.quantize(model, calibration_data={k: v[:256] for k, v in x_train.items()})
    tables = [w for w in quant_wrappers(qat) if isinstance(w, QuantizeTable)]
    assert sorted(w.layer.name for w in tables) == [
        "position_embedding", "segment_embedding", "token_embedding"]
    qat.compile(optimizer=keras.optimizers.Adam(1e-4),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qat.fit(x_train, y_train, batch_size=32, epochs=1, verbose=0)

    result = tfopt.export(qat, tmp_path / "int8", formats=("onnx",),
                          validation_data={k: v[:64] for k, v in x_test.items()})
    # validated at the trained length and at half of it
    assert result.manifest["artifacts"]["onnx"]["second_length"]["length"] == LENGTH // 2

    # every table is stored as int8 and read through its lookup
    proto = onnx.load(str(result.paths["onnx"]))
    initializers = {i.name: i for i in proto.graph.initializer}
    lookups = [n for n in proto.graph.node if n.op_type in ("Gather", "Slice")
               and n.input[0] in initializers and len(initializers[n.input[0]].dims) == 2
               and initializers[n.input[0]].dims[1] == 64]
    assert len(lookups) == 3
    assert all(initializers[n.input[0]].data_type == onnx.TensorProto.INT8 for n in lookups)
    assert not any(i.data_type == onnx.TensorProto.FLOAT and list(i.dims) == [2000, 64]
                   for i in proto.graph.initializer)

    import onnxruntime as ort

    session = ort.InferenceSession(str(result.paths["onnx"]), providers=["CPUExecutionProvider"])
    for length in (LENGTH, 20):  # any length up to the trained one
        feed = {k: v[:, :length] for k, v in x_test.items()}
        expected = np.asarray(qat.predict(feed, batch_size=128, verbose=0))
        actual = session.run(None, feed)[0]
        agreement = np.mean(actual.argmax(1) == expected.argmax(1))
        cosine = np.sum(actual * expected) / np.linalg.norm(actual) / np.linalg.norm(expected)
        print(f"length {length}: agreement {agreement:.4f}, cosine {cosine:.6f}")
        assert agreement >= 0.995, (length, agreement)
        assert cosine >= 0.999, (length, cosine)
    accuracy = float(np.mean(session.run(None, x_test)[0].argmax(1) == y_test))
    print(f"accuracy: float {float_accuracy:.4f}, int8 onnx {accuracy:.4f}")
    assert accuracy >= float_accuracy - 0.03, (accuracy, float_accuracy)


def test_embedding_tables_int8_per_row_and_exported_as_int8_lookups(tmp_path):
    inputs = keras.Input((None,), dtype="int32", name="ids")
    x = layers.Embedding(300, 16, name="table")(inputs)
    x = layers.GlobalAveragePooling1D()(x)
    model = keras.Model(inputs, layers.Dense(3, name="head")(x))
    # rows of very different magnitudes: one scale per row keeps the small ones
    table = model.get_layer("table")
    values = np.random.default_rng(0).normal(size=(300, 16)).astype("float32")
    values *= np.logspace(-3, 1, 300, dtype="float32")[:, None]
    table.embeddings.assign(values)
    ids = np.random.default_rng(1).integers(0, 300, (64, 12)).astype("int32")
    qat = tfopt.quantize(model, calibration_data=ids)
    wrapper = next(w for w in quant_wrappers(qat) if isinstance(w, QuantizeTable))
    (_, quantized), = wrapper.quantized_weights()
    quantized = np.asarray(quantized)
    steps = np.abs(values).max(axis=1) / 127
    assert np.all(np.abs(quantized - values) <= steps[:, None] / 2 + 1e-7)
    np.testing.assert_allclose(quantized / steps[:, None], np.round(quantized / steps[:, None]),
                               atol=1e-3)
    result = tfopt.export(qat, tmp_path, formats=("onnx",), validation_data=ids)
    assert result.manifest["artifacts"]["onnx"]["second_length"]["length"] == 6
    proto = onnx.load(str(result.paths["onnx"]))
    kinds = {i.name: i.data_type for i in proto.graph.initializer}
    gather = next(n for n in proto.graph.node if n.op_type == "Gather" and n.input[0] in kinds
                  and kinds[n.input[0]] == onnx.TensorProto.INT8)
    assert gather is not None
    assert all(e["max_rel"] < 1e-3 for e in result.errors["onnx"].values()), result.errors


def test_quantize_embeddings_false_keeps_tables_float_and_lists_them():
    inputs = keras.Input((None,), dtype="int32")
    x = layers.GlobalAveragePooling1D()(layers.Embedding(50, 8, name="table")(inputs))
    model = keras.Model(inputs, layers.Dense(2)(x))
    with pytest.warns(UserWarning, match=r"Embedding x1 \(table\)"):
        qat = tfopt.quantize(model, tfopt.QuantizationConfig(quantize_embeddings=False))
    assert not any(isinstance(w, QuantizeTable) for w in quant_wrappers(qat))


def test_quantization_config_saved_before_int8_tables_loads_with_float_tables():
    config = tfopt.QuantizationConfig().get_config()
    del config["quantize_embeddings"]
    assert not tfopt.QuantizationConfig.from_config(config).quantize_embeddings
    with pytest.raises(tfopt.errors.ConfigError, match="quantize_embeddings"):
        tfopt.QuantizationConfig(quantize_embeddings="yes")


def test_image_model_is_not_validated_at_a_second_length(tmp_path, trained_digits):
    result = tfopt.export(trained_digits, tmp_path, formats=("onnx",))
    assert "second_length" not in result.manifest["artifacts"]["onnx"]


def test_a_tied_table_is_looked_up_in_int8_and_projects_in_float(tmp_path):
    # keras-hub's ReversibleEmbedding as a language model's input and output: the lookup
    # reads int8 rows; the tied output projection (a product of activations with the
    # table) computes with the float table, in Keras QAT and in the file alike.
    hub = _hub()
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    table = hub.layers.ReversibleEmbedding(60, 16, tie_weights=True, name="tied")
    hidden = layers.Dense(16, activation="tanh", name="mix")(table(tokens))
    model = keras.Model(tokens, table(hidden, reverse=True))
    ids = np.random.default_rng(0).integers(0, 60, (32, 10)).astype("int32")
    qat = tfopt.quantize(model, calibration_data=ids)
    assert any(isinstance(w, QuantizeTable) for w in quant_wrappers(qat))
    result = tfopt.export(qat, tmp_path, formats=("onnx",), validation_data=ids)
    assert all(e["max_rel"] < 1e-3 for e in result.errors["onnx"].values()), result.errors
    proto = onnx.load(str(result.paths["onnx"]))
    kinds = {i.name: i.data_type for i in proto.graph.initializer}
    assert any(n.op_type == "Gather" and kinds.get(n.input[0]) == onnx.TensorProto.INT8
               for n in proto.graph.node)


def test_a_file_that_fails_at_the_second_length_is_refused_and_nothing_is_written(
        tmp_path, monkeypatch):
    from tfopt.export import _api

    inputs = keras.Input((None,), dtype="int32", name="ids")
    x = layers.GlobalAveragePooling1D()(layers.Embedding(40, 8)(inputs))
    model = keras.Model(inputs, layers.Dense(2)(x))
    ids = np.random.default_rng(0).integers(0, 40, (8, 10)).astype("int32")
    second = _api._second_length

    def broken(plan):  # a feed the engine cannot run, where Keras could
        length, full, feed, reference = second(plan)
        return length, full, [a.astype("float64") for a in feed], reference

    monkeypatch.setattr(_api, "_second_length", broken)
    with pytest.raises(tfopt.errors.ExportValidationError, match="fails at 5"):
        tfopt.export(model, tmp_path / "out", formats=("onnx",), validation_data=ids)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("center", [True, False])
def test_layer_normalization_is_one_onnx_node(tmp_path, center):
    # tf2onnx writes Keras' LayerNormalization as 13 nodes ONNX Runtime runs one by one;
    # the export makes it one LayerNormalization node (the whole pattern only).
    inputs = keras.Input((None, 12), name="x")
    x = layers.LayerNormalization(center=center, name="ln")(layers.Dense(12)(inputs))
    model = keras.Model(inputs, layers.Dense(3)(x))
    model.get_layer("ln").gamma.assign(np.linspace(0.5, 2.0, 12).astype("float32"))
    if center:
        model.get_layer("ln").beta.assign(np.linspace(-1.0, 1.0, 12).astype("float32"))
    data = np.random.default_rng(0).normal(size=(8, 6, 12)).astype("float32")
    result = tfopt.export(model, tmp_path, formats=("onnx",), validation_data=data)
    ops = [n.op_type for n in onnx.load(str(result.paths["onnx"])).graph.node]
    if center:
        assert ops.count("LayerNormalization") == 1 and "GlobalAveragePool" not in ops, ops
    else:  # another pattern: left as tf2onnx wrote it
        assert "LayerNormalization" not in ops
    assert all(e["max_abs"] < 1e-5 for e in result.errors["onnx"].values()), result.errors


def test_token_ids_the_model_cannot_take_are_named_before_anything_runs(tmp_path):
    inputs = keras.Input((None,), dtype="int32", name="ids")
    x = layers.GlobalAveragePooling1D()(layers.Embedding(40, 8)(inputs))
    model = keras.Model(inputs, layers.Dense(2)(x))
    ids = np.random.default_rng(0).integers(0, 40, (8, 10)).astype("int32")
    with pytest.raises(tfopt.errors.ConfigError, match="cannot run calibration_data"):
        tfopt.quantize(model, calibration_data=ids + 40)  # out of the table's range
    with pytest.raises(tfopt.errors.ConfigError, match="fractional values"):
        tfopt.export(model, tmp_path / "out", formats=("onnx",),
                     validation_data=ids.astype("float32") + 0.7)
    assert not (tmp_path / "out").exists()


def test_a_composite_embedding_is_not_listed_as_float_when_its_tables_are_int8():
    hub = _hub()
    model = hub.models.DistilBertBackbone(vocabulary_size=100, num_layers=1, num_heads=2,
                                          hidden_dim=16, intermediate_dim=32,
                                          max_sequence_length=16)
    with pytest.warns(UserWarning) as caught:
        qat = tfopt.quantize(model)
    summary = next(str(w.message) for w in caught if "left in float" in str(w.message))
    assert "2 lookup table(s)" in summary and "Embedding" not in summary, summary
    assert len([w for w in quant_wrappers(qat) if isinstance(w, QuantizeTable)]) == 2
