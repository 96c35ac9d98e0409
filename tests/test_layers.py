"""The engine, the headless front doors and the app's state (workbench, uploads) never import the UI's
libraries (gradio, plotly)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import hyperrag


def test_engine_imports_neither_gradio_nor_plotly():
    code = ("import sys, hyperrag, hyperrag.rag.pipeline, hyperrag.rag.reader, hyperrag.bench, hyperrag.report, "
            "hyperrag.evaluate, hyperrag.rag.precompute, hyperrag.kv.store, hyperrag.kv.planner, hyperrag.rag.modes, "
            "hyperrag.rag.runtime, hyperrag.workbench.operations, hyperrag.workbench.uploads, hyperrag.data.ingest; "
            "hyperrag.bench.print_table({'rerank': {}, 'e2e': {}, 'quality': {}}); "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('gradio', 'plotly')); "
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


# Layers from the bottom up; a module may import its own layer and the ones below it. The
# top-level modules of hyperrag (bench, evaluate, ui, serve, ...) are the front doors.
LAYERS = ["common", "model", "kv", "data", "rag", "workbench"]
FRONT = len(LAYERS)


def layer_of(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 2 and parts[1] in LAYERS else FRONT


def hyperrag_imports(path: Path) -> list[str]:
    """Every ``hyperrag.*`` module a file imports, at any depth of the file (lazy imports too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("hyperrag.")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "hyperrag":
            found += [f"{node.module}.{a.name}" for a in node.names]
    return found


def test_imports_point_down_the_layers():
    package = Path(hyperrag.__file__).parent
    wrong = []
    for path in sorted(package.rglob("*.py")):
        module = ".".join(("hyperrag", *path.relative_to(package).with_suffix("").parts))
        for target in hyperrag_imports(path):
            if layer_of(target) > layer_of(module):
                wrong.append(f"{module} imports {target}")
    assert not wrong, "imports pointing up a layer:\n" + "\n".join(wrong)


def test_layer_checker_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from hyperrag.rag.rerank import Reranker\n")
    assert layer_of(hyperrag_imports(bad)[0]) > layer_of("hyperrag.kv.store")
