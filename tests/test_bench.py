import numpy as np
import pytest

import tfopt
from tfopt.bench import measure
from tfopt.errors import ConfigError

from test_pruning import functional


def test_measure_warms_up_then_times_at_least_repeats_calls():
    calls = []
    timing = measure(lambda: calls.append(1), warmup=2, repeats=5)
    assert len(calls) == 7 and timing.runs == 5
    assert 0 < timing.p50 <= timing.p90 <= timing.p99
    assert timing.throughput(10) == pytest.approx(10 / timing.p50)


def test_run_times_every_backend_and_reports_accuracy_size_and_headline(tmp_path):
    model = functional()
    _, (x, labels) = tfopt.datasets.load_digits()  # the data's own labels
    x, labels = x[:16], labels[:16]
    expected = float(np.mean(model.predict(x, verbose=0).argmax(axis=1) == labels))
    exported = tfopt.export(model, tmp_path, formats=("saved_model", "onnx"), validation_data=x)
    report = tfopt.bench.run([model, exported.paths["saved_model"], exported.paths["onnx"]], x,
                             labels=labels, batch_sizes=(1, 4), repeats=3, min_seconds=0,
                             progress=False)
    assert [(r.backend, r.batch_size) for r in report.rows] == [
        (backend, batch) for backend in ("keras_predict", "keras_eager", "keras_function",
                                         "keras_xla", "saved_model", "ort_cpu")
        for batch in (1, 4)]
    assert expected < 0.9  # an untrained model: accuracy says something only if it can be wrong
    assert all(r.accuracy == pytest.approx(expected) for r in report.rows)
    onnx_row = report.rows[-1]
    assert onnx_row.size_bytes == exported.sizes["onnx"]["raw"] and onnx_row.precision == "fp32"
    assert onnx_row.throughput == pytest.approx(4 / (onnx_row.p50_ms / 1e3))
    # Memory: a fresh process per artifact; none for a model in memory.
    assert all((r.peak_rss_bytes is None) == r.backend.startswith("keras") for r in report.rows)
    served = next(r for r in report.rows if r.backend == "saved_model")
    assert served.peak_rss_bytes > onnx_row.peak_rss_bytes  # TensorFlow's runtime is in it
    # The headline's baseline is what TF Serving runs, at the same batch size.
    fastest = min((r for r in report.rows if r.batch_size == 1 and r is not served
                   and r.backend != "keras_predict"), key=lambda r: r.p50_ms)
    headline = report.headline()
    assert headline.startswith(f"{fastest.name} is {served.p50_ms / fastest.p50_ms:.1f}x faster "
                               f"than {served.name} at batch 1")
    assert "+0.00 accuracy points" in headline
    with pytest.raises(ConfigError, match="model.predict"):
        report.headline(baseline="keras predict")
    assert "| ort_cpu" not in report.markdown() and "keras predict" in report.table()
    assert report.plot(tmp_path / "p.png").stat().st_size > 0


def test_headline_shows_the_float_model_on_the_winners_engine():
    from tfopt.bench import BenchReport, BenchRow

    def row(name, backend, ms):
        return BenchRow(name, backend, "fp32", 1, ms, ms, ms, 1.0, 1e3 / ms, 1000, 900, None,
                        "a", engine=name.split(" / ")[1] if " / " in name else "")

    report = BenchReport([row("keras predict", "keras_predict", 50.0),
                          row("baseline saved_model / TensorFlow", "saved_model", 10.0),
                          row("baseline onnx fp32 / ORT CPU", "ort_cpu", 4.0),
                          row("optimized onnx int8 / ORT CPU", "ort_cpu", 2.0)], {})
    assert report.headline(candidate_prefix="optimized") == (
        "optimized onnx int8 / ORT CPU is 5.0x faster than baseline saved_model / TensorFlow "
        "at batch 1 (2 vs 10 ms), 2.5x for the float model on that engine (baseline onnx fp32 / "
        "ORT CPU: 4 ms), 1.0x smaller than baseline saved_model (0.000954 vs 0.000954 MB).")
    without_savedmodel = BenchReport([r for r in report.rows if r.backend != "saved_model"], {})
    with pytest.raises(ConfigError, match="what TF Serving runs"):
        without_savedmodel.headline()


def test_unknown_artifacts_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="No artifact at"):
        tfopt.bench.runners_for(tmp_path / "missing.onnx")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ConfigError, match="Don't know how to benchmark"):
        tfopt.bench.runners_for(tmp_path / "notes.txt")


def test_interleaved_timing_rotates_the_order_of_the_callables():
    # A fixed order would rank callables by what runs before them (benchmarks/README).
    from tfopt.bench._timing import interleaved

    order = []
    fns = {k: (lambda k=k: order.append(k)) for k in "abc"}
    samples = interleaved(fns, rounds=3, calls=2, warmup=1)
    assert order == list("abc") + list("aabbcc") + list("bbccaa") + list("ccaabb")
    assert {k: len(v) for k, v in samples.items()} == {"a": 6, "b": 6, "c": 6}
    assert all(t >= 0 for v in samples.values() for t in v)
