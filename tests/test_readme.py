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
