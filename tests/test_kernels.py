"""The projection kernel is chosen by timing on the machine at hand, cached, and overridable."""
from __future__ import annotations

import json

import pytest
import torch

from hyperrag import kernels

SHAPES = [(64, 64), (64, 16), (64, 160), (160, 64)]  # small stand-ins for a layer's projections
HEAD = (64, 1000)  # and for the output head


def test_probe_chooses_per_size_caches_and_reuses(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "machine_busy", lambda: False)
    first = kernels.choose(SHAPES, HEAD, torch.float32, str(tmp_path))
    assert first["source"] == "probe"
    for size, figures in first["figures_ms"].items():
        assert set(figures) <= set(kernels.PATHS) and all(ms > 0 for ms in figures.values())
        assert first[size] == min(figures, key=figures.get), "the faster path by its best repeat"
    files = list((tmp_path / "kernels").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["small"] == first["small"]
    written = files[0].stat().st_mtime_ns
    again = kernels.choose(SHAPES, HEAD, torch.float32, str(tmp_path))
    assert again["source"].startswith("cached probe") and again["small"] == first["small"]
    assert files[0].stat().st_mtime_ns == written, "a cached choice is not probed again"
    files[0].write_text("{not json")  # a damaged cache file: probed again and rewritten
    assert kernels.choose(SHAPES, HEAD, torch.float32, str(tmp_path))["source"] == "probe"
    stale = json.loads(files[0].read_text())
    files[0].write_text(json.dumps({**stale, "small": "mkl"}))  # a kernel this version does not know
    assert kernels.choose(SHAPES, HEAD, torch.float32, str(tmp_path))["source"] == "probe"
    # another model's shapes get a probe of their own
    kernels.choose([(32, 32)], HEAD, torch.float32, str(tmp_path))
    assert len(list((tmp_path / "kernels").glob("*.json"))) == 2


def test_setting_overrides_and_errors(tmp_path):
    assert kernels.choose(SHAPES, HEAD, torch.float32, str(tmp_path), "aten") == {"small": "aten", "large": "aten", "head": "aten",
                                                                            "source": "setting"}
    assert not (tmp_path / "kernels").exists(), "an explicit setting runs no probe"
    with pytest.raises(ValueError, match="cpu_linear 'mkl': choose one of auto, aten, onednn"):
        kernels.choose(SHAPES, HEAD, torch.float32, str(tmp_path), "mkl")


@pytest.mark.parametrize("small,large", [("aten", "aten"), ("aten", "onednn"), ("onednn", "aten")])
def test_dispatch_computes_the_same_projection(small, large):
    if "onednn" in (small, large) and not kernels.onednn_works(torch.float32):
        pytest.skip("this torch build has no oneDNN linear")
    linear = kernels.dispatch({"small": small, "large": large}, small_tokens=100)
    if small == large:
        assert linear is kernels.PATHS[small]
    proj = torch.nn.Linear(64, 48)
    for tokens in (10, 400):  # one call below the cut, one above
        x = torch.randn(2, tokens // 2, 64)
        torch.testing.assert_close(linear(x, proj), torch.nn.functional.linear(x, proj.weight, proj.bias),
                                   rtol=1e-5, atol=1e-5)


def test_cpu_model_is_named():
    assert kernels.cpu_model() and "\n" not in kernels.cpu_model()


def test_a_probe_on_a_busy_machine_is_not_cached(tmp_path, monkeypatch):
    """A timing taken while other work holds the CPUs would steer every later start: it serves
    this process (measured once) and is taken again next start, on a quiet machine."""
    calls = []
    measure = lambda: calls.append(1) or {"small": "aten"}  # noqa: E731
    path = tmp_path / "kernels" / "probe.json"
    monkeypatch.setattr(kernels, "machine_busy", lambda: True)
    first = kernels.measured(path, lambda c: "small" in c, measure)
    assert first["small"] == "aten" and "busy" in first["source"] and not path.exists()
    assert kernels.measured(path, lambda c: "small" in c, measure)["source"] == first["source"] and len(calls) == 1
    monkeypatch.setattr(kernels, "machine_busy", lambda: False)
    kernels._UNCACHED.clear()
    assert kernels.measured(path, lambda c: "small" in c, measure)["source"] == "probe" and path.exists()


def test_work_that_just_started_makes_the_machine_busy(monkeypatch):
    """Every CPU spinning for a second: the 1-minute load average has barely moved, the short
    utilisation sample sees it (a probe right after or beside other work must not be cached)."""
    import os
    import subprocess
    import sys

    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # as if the average had not caught up
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in os.sched_getaffinity(0)]
    try:
        assert kernels.machine_busy(sample_s=0.5)
    finally:
        for p in spinners:
            p.kill()
            p.wait()
