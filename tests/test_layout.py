"""The package's shape: which module may import which (downwards only), that the sources use
other packages through their public interfaces only, and one list of bookkeeping keys."""

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
    assert graph["housing_reg.jobdir"] == {"housing_reg.csvfile"}  # the dialect's defaults


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


# Each module may import only modules of the layers below its own: data flows one way, from
# the files a job reads to the command line that runs it. The plugins stand in front of the
# package; nothing in it imports them (Hydra's plugin scan finds them).
LAYERS = [
    [  # foundations: no module of ours
        "housing_reg.startup",
        "housing_reg.cores",
        "housing_reg.kernels",
        "housing_reg.forking",
        "housing_reg.stats",
        "housing_reg.csvfile",
        "housing_reg.figures",
        "housing_reg.progress",
    ],
    [
        "housing_reg",  # its __init__: the Ctrl-C guard and the cores' first look
        "housing_reg.callbacks",
        "housing_reg.jobdir",
        "housing_reg.data",
        "housing_reg.images",
    ],
    [
        "housing_reg.fuse",
        "housing_reg.lost",
        "housing_reg.settings",
        "housing_reg.model",
        "housing_reg.report",
    ],
    [
        "housing_reg.memory",
        "housing_reg.resume",
        "housing_reg.record",
        "housing_reg.sweep",
        "housing_reg.group",
    ],
    [
        "housing_reg.checkpoints",
        "housing_reg.prepare",
        "housing_reg.argv",
        "housing_reg.runs",
        "housing_reg.scaleout",
    ],
    ["housing_reg.fit", "housing_reg.cli", "housing_reg.evaluate"],
    ["housing_reg.train"],
    [
        "hydra_plugins.housing_reg_launcher",
        "hydra_plugins.housing_reg_launcher.slurm",
        "hydra_plugins.housing_reg_launcher.fused",
    ],
]


def upward(graph: dict[str, set[str]], layers: list[list[str]]) -> list[str]:
    """Every import of a module in its own layer or above, as 'importer -> imported'."""
    level = {m: i for i, layer in enumerate(layers) for m in layer}
    return [
        f"{m} -> {d}"
        for m, deps in sorted(graph.items())
        for d in sorted(deps - {"housing_reg"})  # the package itself: its __init__
        if level[d] >= level[m]
    ]


@pytest.mark.unit
def test_every_module_has_a_layer_and_imports_only_downwards():
    graph = imports()
    placed = {m for layer in LAYERS for m in layer}
    assert set(graph) == placed, set(graph) ^ placed
    assert upward(graph, LAYERS) == []


@pytest.mark.unit
def test_an_upward_import_is_found_when_there_is_one():
    assert upward({"a": {"b"}, "b": set()}, [["a"], ["b"]]) == ["a -> b"]
    assert upward({"a": {"b"}, "b": set()}, [["a", "b"]]) == ["a -> b"]  # a layer's own
    assert upward({"a": set(), "b": {"a"}}, [["a"], ["b"]]) == []


# Other packages through their front doors: no private module (a dotted name part starting
# with "_"), no private attribute of an object not our own (`x._y`, but self's and cls's), and
# no plugin's parts replaced at run time (another object's launcher, sweeper, hydra context or
# config loader; an attribute set on what a call returned, such as HydraConfig.instance()).
PUBLIC_BY_NAME = {"os._exit"}  # documented, underscore and all
REPLACED = {"launcher", "sweeper", "hydra_context", "config_loader"}


def private_uses(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module != "__future__":
            names = [*node.module.split("."), *(a.name for a in node.names)]
            if any(n.startswith("_") for n in names):
                found.append(f"line {node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Import):
            found += [
                f"line {node.lineno}: import {a.name}"
                for a in node.names
                if any(p.startswith("_") for p in a.name.split("."))
            ]
        elif isinstance(node, ast.Attribute):
            dunder = node.attr.startswith("__") and node.attr.endswith("__")
            own = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            public = dunder or own or ast.unparse(node) in PUBLIC_BY_NAME
            if node.attr.startswith("_") and not public:
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if not isinstance(t, ast.Attribute):
                    continue
                own = isinstance(t.value, ast.Name) and t.value.id in ("self", "cls")
                if (t.attr in REPLACED and not own) or isinstance(t.value, ast.Call):
                    found.append(f"line {node.lineno}: {ast.unparse(t)} = ...")
    return sorted(found, key=lambda f: int(f.split(":")[0].removeprefix("line ")))


@pytest.mark.unit
def test_the_sources_use_other_packages_through_their_public_interfaces():
    found = {
        str(path.relative_to(SRC)): uses
        for path in sorted(SRC.rglob("*.py"))
        if (uses := private_uses(path.read_text()))
    }
    assert found == {}


@pytest.mark.unit
def test_a_private_use_is_found_when_there_is_one():
    code = """
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from omegaconf import _utils
import torch._C
ret._return_value = 1
writer._get_file_writer().add_summary(x)
self.inner.hydra_context = context
HydraConfig.instance().cfg = job
self._mine = 1
os._exit(1)
launcher.launch(jobs)
"""
    assert [f.split(":")[0] for f in private_uses(code)] == [
        "line 2",
        "line 3",
        "line 4",
        "line 5",
        "line 6",
        "line 7",
        "line 8",
    ]
