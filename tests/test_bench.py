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
    exported = tfopt.export(model, tmp_path, formats=("onnx",), validation_data=x)
    report = tfopt.bench.run([model, exported.paths["onnx"]], x, labels=labels,
                             batch_sizes=(1, 4), repeats=3, min_seconds=0, progress=False)
    assert [(r.backend, r.batch_size) for r in report.rows] == [
        ("keras_predict", 1), ("keras_predict", 4), ("keras_function", 1),
        ("keras_function", 4), ("ort_cpu", 1), ("ort_cpu", 4)]
    assert expected < 0.9  # an untrained model: accuracy says something only if it can be wrong
    assert all(r.accuracy == pytest.approx(expected) for r in report.rows)
    onnx_row = report.rows[-1]
    assert onnx_row.size_bytes == exported.sizes["onnx"]["raw"] and onnx_row.precision == "fp32"
    assert onnx_row.throughput == pytest.approx(4 / (onnx_row.p50_ms / 1e3))
    predict = report.rows[0]
    fastest = min((r for r in report.rows if r.batch_size == 1 and r is not predict),
                  key=lambda r: r.p50_ms)
    headline = report.headline(baseline="keras predict")
    assert headline.startswith(f"{fastest.name} is {predict.p50_ms / fastest.p50_ms:.1f}x faster")
    assert "+0.00 accuracy points" in headline
    assert "| ort_cpu" not in report.markdown() and "keras predict" in report.table()
    assert report.plot(tmp_path / "p.png").stat().st_size > 0


def test_unknown_artifacts_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="No artifact at"):
        tfopt.bench.runners_for(tmp_path / "missing.onnx")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ConfigError, match="Don't know how to benchmark"):
        tfopt.bench.runners_for(tmp_path / "notes.txt")
