"""The engine, the headless front doors and the app's state (workbench, uploads) never import the UI's
libraries (gradio, plotly)."""
from __future__ import annotations

import subprocess
import sys


def test_engine_imports_neither_gradio_nor_plotly():
    code = ("import sys, hyperrag, hyperrag.pipeline, hyperrag.reader, hyperrag.bench, hyperrag.report, "
            "hyperrag.evaluate, hyperrag.precompute, hyperrag.kv.store, hyperrag.kv.planner, hyperrag.modes, "
            "hyperrag.runtime, hyperrag.workbench, hyperrag.uploads, hyperrag.ingest; "
            "hyperrag.bench.print_table({'rerank': {}, 'e2e': {}, 'quality': {}}); "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('gradio', 'plotly')); "
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
