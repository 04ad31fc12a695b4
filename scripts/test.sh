#!/usr/bin/env bash
# The project's test command (README): prepares the Python reference
# environment (cached outside the clone), builds the binaries and runs every
# test of the workspace.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

cache="${CAPTURE_CACHE:-$HOME/.cache/capture}"
venv="$cache/venv"
stamp="$venv/.requirements.sha256"
want="$(sha256sum scripts/requirements.txt | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "== installing the Python reference environment into $venv (first time: a few minutes, ~5.6 GB)"
  mkdir -p "$cache"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
  "$venv/bin/pip" install --quiet -r scripts/requirements.txt
  echo "$want" > "$stamp"
fi
export CAPTURE_PYTHON="$venv/bin/python"

echo "== services (PostgreSQL, moto S3) on loopback"
source scripts/services.sh
start_postgres
start_moto
trap stop_services EXIT

echo "== building"
cargo build --workspace --bins --locked
echo "== testing"
log="$(mktemp)"
status=0
# --no-fail-fast: a failing test binary does not hide the ones after it.
cargo test --workspace --locked --no-fail-fast -- "$@" 2>&1 | tee "$log" || status=$?
# One closing line over every test binary (the last binary cargo runs is a
# doc-test harness with no tests, which would otherwise close the output).
grep -E '^test result:' "$log" | awk '{p += $4; f += $6} END {printf "tests: %d passed, %d failed\n", p, f}'
rm -f "$log"
exit "$status"
