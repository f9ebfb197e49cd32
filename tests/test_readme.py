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
    assert CPU_LINE.match(lines[1]), f"README's headline lost the CPU line `tfopt run` prints:\n{lines[1]}"
    assert re.fullmatch(r"Report: runs/digits_prune_qat/report\.md", lines[2])


# Machine-dependent figures (timings, speed-ups) sit between `<!-- figure: COMMAND -->` and
# `<!-- /figure -->`, with the machine line the command prints:
# tfopt.targets._cpu_int8.describe_cpu() for CPUs, the device's name for GPUs.
FIGURE = re.compile(r"<!-- figure: (?P<command>[^>]+?) -->\n(?P<body>.*?)<!-- /figure -->", re.S)
ISA_FLAGS = {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8"}
CPU_LINE = re.compile(r"CPU: (?P<name>[^,\n]+), (?P<cores>\d+) cores, ISA: (?P<isa>[a-z0-9_ ]+)")
GPU_LINE = re.compile(r"GPU: NVIDIA [A-Z]\d+")
# A timing or a speed-up: what a machine decides.
MACHINE_FIGURE = re.compile(r"\d ?ms\b|\d\.\d+x\b|\dx faster|images/s|\d min \d+ s|\d minutes")
ROOT = README.parent


def figures(text):
    return [(m.group("command"), m.group("body"), m.start()) for m in FIGURE.finditer(text)]


def line_of(text, offset):
    return text.count("\n", 0, offset) + 1


def test_every_machine_dependent_figure_names_its_command_and_machine():
    text = README.read_text()
    found = figures(text)
    assert len(found) >= 5, "README lost its figure markers"
    for command, body, offset in found:
        where = f"README.md:{line_of(text, offset)} ({command})"
        if command.startswith("make "):
            target = command.split()[1]
            assert re.search(rf"^{target}:", (ROOT / "Makefile").read_text(), re.M), where
            printer = ROOT / ("tests/conftest.py" if target == "test" else "tfopt/_pipeline.py")
        else:
            script = re.match(r"python3? (benchmarks/\w+\.py)\b", command)
            assert script, f"{where}: a figure's command is `make ...` or `python benchmarks/...`"
            printer = ROOT / script.group(1)
            assert printer.exists(), where
        gpu = GPU_LINE.search(body)
        if gpu:
            assert "device" in printer.read_text(), f"{where}: the script does not print its GPU"
            continue
        cpu = CPU_LINE.search(body)
        assert cpu, f"{where}: no 'CPU: <name>, <n> cores, ISA: <flags>' line beside the figure"
        assert set(cpu.group("isa").split()) <= ISA_FLAGS, (where, cpu.group("isa"))
        source = printer.read_text()
        assert "describe_cpu" in source or "cpu_line" in source, \
            f"{where}: {printer.name} does not print the CPU line it is quoted with"


def test_no_timing_or_speed_up_outside_a_figure():
    text = README.read_text()
    outside = FIGURE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    stray = [f"README.md:{number}: {line.strip()[:90]}"
             for number, line in enumerate(outside.splitlines(), 1)
             if MACHINE_FIGURE.search(line)]
    assert not stray, "figures without their command and CPU:\n" + "\n".join(stray)


def test_the_figure_checks_catch_a_bare_figure():
    planted = "text\n<!-- figure: python benchmarks/channels.py -->\n| a | 3.2x |\n<!-- /figure -->\n"
    ((command, body, _),) = figures(planted)
    assert command == "python benchmarks/channels.py" and not CPU_LINE.search(body)
    assert MACHINE_FIGURE.search("ResNet50 runs 2.8x / 3.4x faster")
    assert CPU_LINE.fullmatch("CPU: AMD EPYC, 2 cores, ISA: avx2 avx512f avx512_vnni")
