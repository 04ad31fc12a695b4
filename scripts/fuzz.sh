#!/usr/bin/env bash
# Runs every cargo-fuzz target (or those named as arguments) for
# FUZZ_SECONDS (default 20) each, starting from the committed corpus in
# fuzz/corpus/ (new coverage goes to a scratch copy, so the repository's
# corpus only changes when someone commits it).
# Needs the nightly toolchain; installs cargo-fuzz from crates.io if absent.
# Prints, per target, the executions, coverage and corpus size libFuzzer
# reports. Exits non-zero on the first crash (the input is in
# fuzz/artifacts/<target>/).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

seconds="${FUZZ_SECONDS:-20}"
targets=(pt_reader prompt_file manifest)
if [ "$#" -gt 0 ]; then
  targets=("$@")
fi

if ! rustup toolchain list | grep -q '^nightly'; then
  echo "fuzz: installing the nightly toolchain" >&2
  rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked --quiet
fi

# --sanitizer none: the code under test is safe Rust (the workspace forbids
# unsafe), so AddressSanitizer adds build time, not findings; libFuzzer's
# coverage, panics, overflow checks (debug assertions) and -rss_limit stay.
build_flags=(--sanitizer none --debug-assertions)
echo "== fuzz build" >&2
cargo +nightly fuzz build "${build_flags[@]}" >&2

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
for target in "${targets[@]}"; do
  mkdir -p "$scratch/$target"
  log="$scratch/$target.log"
  if ! cargo +nightly fuzz run "${build_flags[@]}" "$target" "$scratch/$target" "fuzz/corpus/$target" -- \
      -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "fuzz: $target FAILED (see fuzz/artifacts/$target/)" >&2
    exit 1
  fi
  runs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')"
  cov="$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 | grep -o '[0-9]*' || echo '?')"
  corpus="$(find "$scratch/$target" fuzz/corpus/"$target" -type f | wc -l)"
  echo "fuzz: $target ok: ${seconds} s, ${runs} executions, coverage ${cov} edges, corpus ${corpus} inputs"
done
