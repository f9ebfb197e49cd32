"""tfopt's import graph: data flows one way, and no package imports one above it.

Every ``import`` in tfopt, at module level or inside a function, is an arrow
from one part of tfopt to another (a top-level module, or a subpackage as a
whole). The parts are ranked below, lowest first; an arrow may only point to
a part of the same rank or lower, and the arrows between parts may form no
circle. keras-hub's import-rule test does the same for its own layout.
"""

import ast
import collections
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "tfopt"

# Lowest first. Parts of one rank may import each other, as long as no circle forms.
RANKS = [
    {"tfopt._version", "tfopt.errors", "tfopt._warn", "tfopt._quiet", "tfopt.targets",
     "tfopt.examples"},
    {"tfopt._compat", "tfopt._checks", "tfopt._recipe", "tfopt._data", "tfopt.datasets"},
    {"tfopt._tree", "tfopt._substitute", "tfopt.distribute"},
    {"tfopt._prunable", "tfopt._flops", "tfopt.artifacts"},
    {"tfopt.pruning", "tfopt.quantization"},
    {"tfopt.strip", "tfopt.callbacks"},
    {"tfopt.export"},
    {"tfopt.bench"},
    {"tfopt._optimize"},
    {"tfopt", "tfopt._inspect", "tfopt._pipeline", "tfopt.cli"},
]
RANK = {part: i for i, parts in enumerate(RANKS) for part in parts}


def modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def part(module: str) -> str:
    """``tfopt.export._api`` -> ``tfopt.export``; ``tfopt._tree`` -> itself."""
    return ".".join(module.split(".")[:2])


def arrows() -> dict[tuple[str, str], list[str]]:
    """``{(from part, to part): [module:line, ...]}`` for every import between parts."""
    known = modules()
    found = collections.defaultdict(list)
    for module, path in known.items():
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    prefix = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(prefix + ([base] if base else []))
                # ``from tfopt import _checks`` imports the module tfopt._checks
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                           for alias in node.names]
            else:
                continue
            for target in targets:
                if target.split(".")[0] == "tfopt" and part(target) != part(module):
                    found[(part(module), part(target))].append(f"{module}:{node.lineno}")
    return found


def test_every_part_of_tfopt_has_a_rank():
    parts = {part(m) for m in modules()}
    assert parts - set(RANK) == set(), "rank these parts in RANKS"


def test_no_import_climbs_to_a_higher_part():
    climbs = [f"{a} -> {b} ({', '.join(where[:3])})" for (a, b), where in arrows().items()
              if RANK.get(b, 99) > RANK.get(a, 99)]
    assert climbs == []


def circles() -> list[str]:
    graph = collections.defaultdict(set)
    for a, b in arrows():
        graph[a].add(b)
    found = []

    def visit(node, path):
        for nxt in graph[node]:
            if nxt in path:
                found.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            else:
                visit(nxt, path + [nxt])

    for start in list(graph):
        visit(start, [start])
    return found


def test_no_circle_between_parts():
    assert circles() == []


@pytest.fixture
def plant():
    """Write throwaway modules into tfopt's tree (removed afterwards)."""
    planted = []

    def write(relative: str, source: str) -> None:
        path = ROOT / relative
        path.write_text(source)
        planted.append(path)

    yield write
    for path in planted:
        path.unlink()


@pytest.mark.parametrize("source, target", [
    ("from tfopt.export import export\n", "tfopt.export"),  # pruning reaching up to export
    ("import tfopt\n", "tfopt"),                            # the package's face
])
def test_the_rule_catches_a_planted_climb(source, target, plant):
    plant("pruning/_planted_for_test.py", source)
    climbs = [(a, b) for (a, b) in arrows() if RANK[b] > RANK[a]]
    assert ("tfopt.pruning", target) in climbs


def test_the_rule_catches_a_planted_circle(plant):
    plant("pruning/_planted_for_test.py", "from tfopt.quantization import is_quantized\n")
    plant("quantization/_planted_for_test.py", "from tfopt.pruning import is_pruned\n")
    assert any("tfopt.pruning" in c and "tfopt.quantization" in c for c in circles())
