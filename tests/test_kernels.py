"""The projection kernel is chosen by timing on the machine at hand, cached, and overridable."""
from __future__ import annotations

import json

import pytest
import torch

from hyperrag.model import kernels

SHAPES = [(64, 64), (64, 16), (64, 160), (160, 64)]  # small stand-ins for a layer's projections
HEAD = (64, 1000)  # and for the output head


@pytest.fixture(autouse=True)
def new_start():
    """Each test starts as a fresh process would: nothing measured yet in this one."""
    kernels._THIS_PROCESS.clear()
    yield
    kernels._THIS_PROCESS.clear()


def test_probe_chooses_the_faster_path_per_size_and_keeps_it(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "machine_busy", lambda: False)
    first = kernels.choose(SHAPES, HEAD, torch.float32, str(tmp_path))
    assert first["source"].startswith("probe 1")
    for size, figures in first["figures_ms"].items():
        assert set(figures) <= set(kernels.PATHS) and all(ms > 0 for ms in figures.values())
        assert first[size] == min(figures, key=figures.get), "the faster path by its best repeat"
    files = list((tmp_path / "kernels").glob("*.json"))
    assert len(files) == 1
    record = json.loads(files[0].read_text())
    assert record["small"] == first["small"] and len(record["probes"]) == 1 and not record["confirmed"]
    written = files[0].stat().st_mtime_ns
    assert kernels.choose(SHAPES, HEAD, torch.float32, str(tmp_path)) == first
    assert files[0].stat().st_mtime_ns == written, "one probe per start"
    files[0].write_text(json.dumps({**record, "small": "mkl", "confirmed": True}))  # a kernel this version does not know
    kernels._THIS_PROCESS.clear()
    assert kernels.choose(SHAPES, HEAD, torch.float32, str(tmp_path))["source"].startswith("probe")
    files[0].write_text("{not json")  # a damaged cache file: probed again and rewritten
    kernels._THIS_PROCESS.clear()
    assert kernels.choose(SHAPES, HEAD, torch.float32, str(tmp_path))["source"].startswith("probe 1")
    assert json.loads(files[0].read_text())["small"] in kernels.PATHS
    # another model's shapes get a probe of their own
    kernels.choose([(32, 32)], HEAD, torch.float32, str(tmp_path))
    assert len(list((tmp_path / "kernels").glob("*.json"))) == 2


def test_a_choice_is_cached_for_good_once_two_starts_agree(tmp_path, monkeypatch):
    """One start's probe can be wrong throughout (two bench starts measured one thread per
    stream 25-40% slower than two, where nine other starts measured it faster): a choice is final
    only when probes at two starts agree, per key, and until then each start probes once."""
    monkeypatch.setattr(kernels, "machine_busy", lambda: False)
    results = iter([{"small": "aten", "large": "aten"}, {"small": "onednn", "large": "aten"},
                    {"small": "onednn", "large": "onednn"}])
    calls = []
    measure = lambda: calls.append(1) or {**next(results), "figures_ms": {"small": {}}}  # noqa: E731
    path = tmp_path / "kernels" / "probe.json"
    valid = lambda c: {c.get("small"), c.get("large")} <= set(kernels.PATHS)  # noqa: E731

    def start() -> dict:
        kernels._THIS_PROCESS.clear()
        return kernels.measured(path, valid, measure)

    first = start()
    assert first["small"] == "aten" and not first["confirmed"] and "once a later start" in first["source"]
    assert kernels.measured(path, valid, measure) == first and len(calls) == 1, "one probe per start"
    second = start()  # small disagrees: still pending, showing the latest probe
    assert (second["small"], second["confirmed"], len(second["probes"])) == ("onednn", False, 2)
    third = start()  # now every key has two votes: small onednn (2 of 3), large aten (2 of 3)
    assert (third["small"], third["large"], third["confirmed"]) == ("onednn", "aten", True)
    assert "agreeing" in third["source"]
    fourth = start()
    assert fourth["source"].startswith("cached probe") and (fourth["small"], fourth["large"]) == ("onednn", "aten")
    assert len(calls) == 3, "a confirmed choice is not probed again"


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


def test_cpu_model_is_named(tmp_path):
    assert kernels.cpu_model() and "\n" not in kernels.cpu_model()
    info = tmp_path / "cpuinfo"
    block = "processor\t: {n}\nvendor_id\t: AuthenticAMD\ncpu family\t: {f}\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n\n"
    info.write_text(block.format(n=0, f=26) + block.format(n=1, f=25))
    assert kernels.cpu_model(info) == "AMD EPYC (family 26, model 2)", "two EPYC generations must not share a name"
    info.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nmodel name\t: ARMv8 Processor\n")  # no family on ARM
    assert kernels.cpu_model(info) == "ARMv8 Processor"
    assert kernels.cpu_model(tmp_path / "missing") == "unknown"


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
    kernels._THIS_PROCESS.clear()
    assert kernels.measured(path, lambda c: "small" in c, measure)["source"].startswith("probe 1") and path.exists()


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
