#!/usr/bin/env bash
# Runs every check CI runs: formatting, lints, Rust unit and integration tests, and the
# client-conformance tests (tritonclient, onnxruntime fidelity, bad input) against the real
# binary. Installs what the Python tests need into .venv on first use.
set -euo pipefail
cd "$(dirname "$0")/.."

export ORT_DISABLE_TELEMETRY=1
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"

echo "== python environment"
scripts/setup-python.sh

echo "== cargo fmt"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== cargo build"
cargo build --workspace --locked

echo "== rust tests"
cargo nextest run --workspace --locked --no-fail-fast

echo "== client conformance (pytest)"
OXSERVE_BIN="$target_dir/debug/oxserve" .venv/bin/python -m pytest tests/python -q
