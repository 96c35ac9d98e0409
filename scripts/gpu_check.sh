#!/usr/bin/env bash
# The GPU check, from a fresh clone: tests/test_cuda.py, then the default bench on CUDA (dtype auto:
# bf16 compute there) into docs/bench/bench-gpu-<device-name-slug>.json (+ .html), then its headline.
#   scripts/gpu_check.sh [more bench flags, e.g. --quick]
# Refuses, saying why, where CUDA is absent (no GPU, or a CPU-only torch in .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
py() { ./run.sh python "$@"; }  # run.sh creates or reuses .venv first
export HYPERRAG_REQUIRE_CUDA=1  # tests/test_cuda.py fails instead of skipping without CUDA

py -c "pass"  # the environment first, so its set-up output stays out of what is read below
slug=$(py - <<'EOF'
import re, sys, torch
if not torch.cuda.is_available():
    why = (f"torch {torch.__version__} in .venv is a CPU-only build; install a CUDA build of the same "
           "version (https://pytorch.org/get-started/locally/)" if torch.version.cuda is None else
           f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU; check nvidia-smi and "
           "CUDA_VISIBLE_DEVICES")
    sys.exit(f"gpu_check: CUDA is not available: {why}. Nothing was run.")
print(re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-"))
EOF
)
out=docs/bench/bench-gpu-$slug

echo "== tests/test_cuda.py ($slug)"
py -m pytest tests/test_cuda.py -q

echo "== the default bench on CUDA -> $out.json"
py -m hyperrag.bench --device cuda --codecs fp32,fp16,bf16,int8,int8:nearest,int4,int4:nearest,int2,int2:nearest \
    --frontier --serve --clients 8 --json "$out.json" --html "$out.html" "$@"

echo "== headline ($out.json)"
py - "$out.json" <<'EOF'
import json, sys
from hyperrag.docs import bench_headline
d = json.load(open(sys.argv[1]))
m = d["machine"]
print(f"{m.get('gpu')}: device {m['device']}, {m['dtype']} compute, {d['config'].get('queries')} questions")
try:
    print(bench_headline([d]))
except KeyError as e:  # a partial run (flags that leave a block out): the ratios it has
    rr, e2e = d["rerank"], d["e2e"]
    print(f"(no full headline: {e} missing) reuse vs full prefill {rr['speedup_vs_full']:.2f}x; end to end "
          f"reuse vs baseline {e2e['speedup_vs_baseline']:.2f}x; reader_kv vs reader_full "
          f"{e2e.get('reader_speedup', 0):.2f}x")
EOF
