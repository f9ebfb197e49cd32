"""The README's example runs as written."""

import contextlib
import io
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def example_block() -> str:
    text = README.read_text()
    match = re.search(r"<!-- example:.*?-->\s*```python\n(.*?)```", text, re.S)
    assert match, "README lost its example block"
    return match.group(1)


def test_readme_example_runs_and_prints_80_percent_sparsity():
    code = example_block()
    assert len(code.strip().splitlines()) <= 12
    out = io.StringIO()
    namespace = {}
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), namespace)
    sparsity = namespace["tfopt"].sparsity(namespace["plain"])
    assert len(sparsity) == 4
    assert all(abs(v - 0.8) < 0.01 for v in sparsity.values()), sparsity
    assert "conv1/kernel" in out.getvalue()


def headline_block() -> str:
    text = README.read_text()
    match = re.search(r"<!-- headline:.*?-->\s*```\n(.*?)```", text, re.S)
    assert match, "README lost its headline example"
    return match.group(1)


# The shape of `tfopt run`'s headline (tfopt._pipeline.report_headline), numbers left out.
NUMBER = r"[0-9][0-9.e+-]*"
HEADLINE = re.compile(
    rf"optimized (?P<winner>[^/]+) / (?P<engine>.+?) is {NUMBER}x faster than "
    rf"baseline saved_model / TensorFlow at batch 1 \({NUMBER} vs {NUMBER} ms\), "
    rf"{NUMBER}x for the float model on that engine \(baseline [^:]+ / (?P=engine): {NUMBER} ms\), "
    rf"{NUMBER}x smaller than baseline saved_model \({NUMBER} vs {NUMBER} MB\), "
    rf"at [+-]{NUMBER} accuracy points \({NUMBER}% vs {NUMBER}%\)\.")


def test_readme_headline_example_has_the_shape_of_todays_report():
    from tfopt import _pipeline
    from tfopt.bench import BenchReport, BenchRow

    def row(name, backend, ms, size, accuracy):
        return BenchRow(name, backend, "fp32", 1, ms, ms, ms, 1.0, 1e3 / ms, size, size,
                        accuracy, "a", engine=name.split(" / ", 1)[1] if " / " in name else "")

    report = BenchReport([
        row("baseline keras predict", "keras_predict", 30.0, None, 0.98),
        row("baseline saved_model / TensorFlow", "saved_model", 0.5, 200_000, 0.98),
        row("baseline openvino fp32 / OpenVINO CPU bf16", "openvino_cpu", 0.05, 180_000, 0.98),
        row("optimized openvino int8 / OpenVINO CPU bf16", "openvino_cpu", 0.04, 70_000, 0.97),
    ], {})
    today = _pipeline.report_headline(report)
    assert HEADLINE.fullmatch(today), today
    lines = headline_block().strip().splitlines()
    assert HEADLINE.fullmatch(lines[0]), f"README's headline is not today's shape:\n{lines[0]}"
    assert re.fullmatch(r"Report: runs/digits_prune_qat/report\.md", lines[1])
