"""Which CPU kernel runs the decoder's projections: chosen by timing both on this machine.

The decoder's projections are GEMMs ``[tokens, hidden] x [hidden, out]``. On CPU two paths
exist: ATen's ``F.linear`` (MKL's sgemm on x86 builds) and oneDNN's linear (an internal op,
``torch.ops.mkldnn._linear_pointwise``). Which is faster depends on the CPU and the torch build:
on the AMD EPYC machine the README's figures come from, oneDNN was ~20% faster in every mode;
vendor lore says MKL favours Intel. So nothing is assumed: at first use the probe times both on
the model's own projection shapes at the two sizes that matter, each as it runs in the engine:

- ``small``: a KV-reuse row stream (10 rows x 20 question tokens) on one OpenMP thread, the
  way :mod:`hyperrag.model.rowsplit` runs it;
- ``large``: a full-prefill stream (10 rows x 200 tokens) on all of torch's threads;
- ``head``: the output head (hidden -> vocabulary) on a decode step's few positions (3 rows x 9
  tokens), all threads. It reads a 113 MB matrix (SmolLM2-135M, fp32) for a few dozen rows: on
  the AMD EPYC machine oneDNN took 7-8 ms where MKL's sgemm took 20-35 ms, a sixth of reading time.

Each size gets the faster path by its best time over interleaved repeats (calls below
:data:`~hyperrag.model.rowsplit.SMALL_STREAM_TOKENS` tokens use the small choice). The choice and its
figures are cached per CPU model, torch version, thread count, dtype and projection shapes in
``<cache_dir>/kernels/``, for good once probes at two starts agree (:func:`measured`);
``Settings.cpu_linear`` (``HYPERRAG_CPU_LINEAR``) overrides it.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger("hyperrag")
Linear = Callable[[torch.Tensor, torch.nn.Linear], torch.Tensor]
CHOICES = ("auto", "aten", "onednn")
SIZES = {"small": (10 * 20, 1), "large": (10 * 200, 0), "head": (3 * 9, 0)}  # tokens per call, OpenMP threads (0 = all)
REPEATS = 7


def _aten(x: torch.Tensor, proj: torch.nn.Linear) -> torch.Tensor:
    return F.linear(x, proj.weight, proj.bias)


def _onednn(x: torch.Tensor, proj: torch.nn.Linear) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, proj.weight, proj.bias, "none", [], "")


PATHS: dict[str, Linear] = {"aten": _aten, "onednn": _onednn}


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name with its family and model numbers (``/proc/cpuinfo``), e.g.
    "AMD EPYC (family 26, model 2)"; "unknown" elsewhere. Why the numbers: cloud VMs often name
    only the brand, and two EPYC generations this project ran on were both "AMD EPYC", with
    kernel and stream timings twice apart: a choice cached for one must not steer the other."""
    fields: dict[str, str] = {}
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "cpu family", "model") and key not in fields:
                fields[key] = value.strip()
            if not line.strip() and fields:  # the first processor's block is enough
                break
    except OSError:
        pass
    name = fields.get("model name", "unknown")
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def onednn_works(dtype: torch.dtype) -> bool:
    """oneDNN's linear exists in this torch build and agrees with ``F.linear`` (it is an internal op)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        proj = torch.nn.Linear(8, 4).to(dtype)
        x = torch.randn(2, 3, 8, dtype=dtype)
        return torch.allclose(_onednn(x, proj), _aten(x, proj), rtol=1e-2, atol=1e-2)
    except (RuntimeError, AttributeError):
        return False


def probe(shapes: list[tuple[int, int]], head: tuple[int, int], dtype: torch.dtype,
          repeats: int = REPEATS) -> dict[str, dict[str, float]]:
    """Best ms (:func:`best_time`) per size and path for one call of each layer projection shape
    ``(in, out)`` (the ``head`` size: of the output head's shape)."""
    paths = {k: v for k, v in PATHS.items() if k == "aten" or onednn_works(dtype)}
    layer = [torch.nn.Linear(i, o, bias=False).to(dtype) for i, o in shapes]
    threads = torch.get_num_threads()
    figures: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for size, (tokens, n_threads) in SIZES.items():
            projs = [torch.nn.Linear(*head, bias=False).to(dtype)] if size == "head" else layer
            xs = [torch.randn(1, tokens, p.in_features, dtype=dtype) for p in projs]
            times: dict[str, list[float]] = {name: [] for name in paths}
            torch.set_num_threads(n_threads or threads)
            try:
                for rep in range(repeats + 1):  # the first round warms up, untimed
                    for name, fn in paths.items():
                        t0 = time.perf_counter()
                        for x, p in zip(xs, projs):
                            fn(x, p)
                        if rep:
                            times[name].append((time.perf_counter() - t0) * 1e3)
            finally:
                torch.set_num_threads(threads)
            figures[size] = {name: round(best_time(t), 3) for name, t in times.items()}
    return figures


def projection_shapes(config) -> list[tuple[int, int]]:
    """``(in, out)`` of a layer's seven projections (q, k, v, o, gate, up, down), from the model
    config (heads x head_dim need not be the hidden size: Gemma 3 270M's is 1,024 for 640)."""
    h, m = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    return [(h, q), (h, kv), (h, kv), (q, h), (h, m), (h, m), (m, h)]


def head_shape(config) -> tuple[int, int]:
    """``(in, out)`` of the output head: hidden size to vocabulary."""
    return config.hidden_size, config.vocab_size


def cache_file(cache_dir: str, kind: str, dtype: torch.dtype, dims: str) -> Path:
    """Where a measured choice of ``kind`` is kept: per CPU model, torch version, torch's thread
    count, dtype and the shapes it was measured on (``dims``)."""
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{cpu_model()}-torch{torch.__version__}-{torch.get_num_threads()}t-{dtype}-{dims}")
    return Path(cache_dir).expanduser() / "kernels" / f"{kind}-{slug.strip('-')}.json"


def best_time(times: list[float]) -> float:
    """A probe's figure for one choice: its fastest repeat. Why not the median: other work can only
    make a repeat slower, never faster, and on 2 cores one interrupted repeat of three moves the
    median (a fresh machine once cached 2 threads per reuse stream, 653 vs 785 ms, where quiet
    re-probes gave 1 thread, 639 vs 669 ms)."""
    return min(times)


def machine_busy(sample_s: float = 0.25) -> bool:
    """Whether other work keeps this machine's CPUs busy: the 1-minute load average at or above
    three quarters of the CPUs this process may use, or the CPUs at least half busy over a short
    sample (the load average lags work that just started or stopped by a minute). A timing taken
    then says little about the machine, and cached it would steer every later start (a probe run
    beside a training job once picked two threads per stream where one is faster on a quiet
    machine)."""
    try:
        cpus = len(os.sched_getaffinity(0))
        if os.getloadavg()[0] >= 0.75 * cpus:
            return True
    except (OSError, AttributeError):
        pass
    import psutil

    return psutil.cpu_percent(interval=sample_s) >= 50.0


CONFIRMING_PROBES = 2  # a choice is cached for good once this many probes, each at its own start, agree
KEPT_PROBES = 5  # probes a pending choice remembers (binary choices agree within three)
_THIS_PROCESS: dict[Path, dict] = {}  # what this process measured: one probe per start


def agreed(probes: list[dict]) -> dict | None:
    """Per choice key the value that :data:`CONFIRMING_PROBES` of ``probes`` chose, or None while
    some key has no such value (``figures_ms`` is not a choice)."""
    choice = {}
    for key in (k for k in probes[-1] if k != "figures_ms"):
        value, votes = Counter(p.get(key) for p in probes).most_common(1)[0]
        if votes < CONFIRMING_PROBES:
            return None
        choice[key] = value
    return choice


def measured(path: Path, valid: Callable[[dict], bool], measure: Callable[[], dict]) -> dict:
    """The choice cached at ``path`` when confirmed and ``valid``, else ``measure()``, with its
    ``source``. Why cached: a probe costs seconds at every start, and the machine does not change.
    Why confirmed: one probe can be wrong for a whole start, not just a repeat. On a 2-core
    AMD EPYC, two bench starts cached two threads per reuse stream (best of five: 587 vs 427 ms,
    540 vs 408 ms) where nine other starts measured one thread faster (294-351 vs 320-374 ms) and
    one thread won 91% of 388 back-to-back pairs in one process (mean 367 vs 407 ms): slow spells
    of a few seconds hit single-threaded streams (no hypervisor steal above 4% during them). So
    each start, until :data:`CONFIRMING_PROBES` probes agree, probes once and adds its result to
    the file; the choice is then cached for good. A probe taken while the machine is busy
    (:func:`machine_busy`) is used by its own start only and not counted."""
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if cached.get("confirmed") and valid(cached):
        return {**cached, "source": f"cached probe ({path})"}
    if path in _THIS_PROCESS:
        return _THIS_PROCESS[path]
    busy = machine_busy()
    probe = measure()
    meta = {"cpu": cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    log.info("probe %s: %s", path.name, probe)
    if busy or machine_busy():
        result = {**probe, **meta, "source": "probe on a busy machine (not cached: measured again next start)"}
    else:
        probes = [p for p in cached.get("probes", []) if valid(p)][-(KEPT_PROBES - 1):] + [probe]
        choice = agreed(probes)
        record = {**probe, **(choice or {}), **meta, "confirmed": choice is not None, "probes": probes}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record, indent=1))
        except OSError as err:  # a read-only cache folder costs a probe per start, nothing more
            log.warning("could not cache the probe in %s: %s", path, err)
        result = {**record, "source": f"probe {len(probes)}, " + (
            "agreeing with an earlier one: cached" if choice else "cached once a later start's probe agrees")}
    _THIS_PROCESS[path] = result
    return result


def choose(shapes: list[tuple[int, int]], head: tuple[int, int], dtype: torch.dtype, cache_dir: str,
           setting: str = "auto") -> dict:
    """``{"small": path, "large": path, "head": path, "source": ..., "figures_ms": ...}`` for this machine:
    the setting when it names a path, else the cached probe, else a new probe (then cached)."""
    if setting not in CHOICES:
        raise ValueError(f"cpu_linear {setting!r}: choose one of {', '.join(CHOICES)}")
    if setting != "auto":
        if setting == "onednn" and not onednn_works(dtype):
            raise ValueError("cpu_linear 'onednn': this torch build has no working oneDNN linear; use 'aten' or 'auto'")
        return {**{size: setting for size in SIZES}, "source": "setting"}

    def measure() -> dict:
        figures = probe(shapes, head, dtype)
        return {**{size: min(f, key=f.get) for size, f in figures.items()}, "figures_ms": figures}

    dims = "-".join(f"{i}x{o}" for i, o in sorted(set(shapes))) + f"-head{head[0]}x{head[1]}"
    return measured(cache_file(cache_dir, "linear", dtype, dims),
                    lambda c: set(c.get("figures_ms", {})) == set(SIZES) and {c.get(s) for s in SIZES} <= set(PATHS),
                    measure)


def dispatch(choice: dict, small_tokens: int) -> Linear:
    """One linear for the decoder: calls of fewer than ``small_tokens`` tokens take the small
    choice, the rest the large one (a single path when both agree)."""
    small, large = PATHS[choice["small"]], PATHS[choice["large"]]
    if small is large:
        return small

    def linear(x: torch.Tensor, proj: torch.nn.Linear) -> torch.Tensor:
        return (small if x.numel() // x.shape[-1] < small_tokens else large)(x, proj)

    return linear
