"""The package's shape: which module may import which, and one list of bookkeeping keys."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from housing_reg.jobdir import is_bookkeeping

SRC = Path(__file__).parents[1] / "src"
CONF = Path(__file__).parents[1] / "conf"
OURS = ("housing_reg", "hydra_plugins.housing_reg_launcher")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Every module of ours -> the modules of ours it imports, anywhere in the file (function
    bodies and `if TYPE_CHECKING:` blocks included)."""
    paths = [*SRC.glob("housing_reg/*.py"), *SRC.glob("hydra_plugins/housing_reg_launcher/*.py")]
    names = {module_name(p) for p in paths}
    graph: dict[str, set[str]] = {}
    for path in paths:
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in names}
        graph[module_name(path)] = deps - {module_name(path)}
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as a path that ends where it starts; None if there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep] if dep in path else [node, dep]
            if dep not in state and (found := visit(dep, [*path, dep])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


@pytest.mark.unit
def test_the_import_graph_has_no_circle():
    graph = imports()
    assert {"housing_reg.record", "housing_reg.report", "housing_reg.jobdir"} <= set(graph)
    assert cycle(graph) is None, " -> ".join(cycle(graph))


@pytest.mark.unit
def test_nothing_used_while_training_reaches_up_to_the_report():
    graph = imports()
    for module in ("housing_reg.record", "housing_reg.figures", "housing_reg.train"):
        assert "housing_reg.report" not in graph[module], module
    assert graph["housing_reg.jobdir"] == set()  # the job directory's one reader imports none


@pytest.mark.unit
def test_a_circle_is_found_when_there_is_one():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.unit
def test_directory_names_leave_out_only_bookkeeping_keys():
    """conf/config.yaml's exclude_keys (what a sweep's job directories are not named by) and
    jobdir.BOOKKEEPING say the same thing: a key may be left out only if it is bookkeeping."""
    config = yaml.safe_load((CONF / "config.yaml").read_text())
    excluded = config["hydra"]["job"]["config"]["override_dirname"]["exclude_keys"]
    assert excluded and all(is_bookkeeping(k) for k in excluded), excluded


@pytest.mark.cli
def test_the_report_imports_neither_torch_nor_lightning():
    """The report reads files: importing Lightning (seconds) would be most of its time."""
    code = "import sys, housing_reg.report; print(sorted({'torch', 'lightning'} & {*sys.modules}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
