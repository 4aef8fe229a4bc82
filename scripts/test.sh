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

# TensorFlow's C API (for the TensorFlow engine) and Python TensorFlow with the TF Serving
# stubs (fixtures, reference outputs, client tests), cached outside the clone.
echo "== tensorflow"
scripts/setup-tensorflow.sh

# libtorch for the TorchScript engine (cargo feature oxserve/torch) and Python torch for its
# fixtures, cached outside the clone.
echo "== pytorch"
scripts/setup-torch.sh
export LIBTORCH="${OXSERVE_CACHE:-$HOME/.cache/oxserve}/torch/2.13.0/libtorch"

# The real TorchServe 0.12 and torch-model-archiver (Java 17 for its frontend), to make the
# .mar fixtures and record TorchServe's answers that the torchserve mode is compared with.
echo "== torchserve"
scripts/setup-torchserve.sh

echo "== cargo fmt"
cargo fmt --all -- --check

# The binary the Python tests start carries the `testkit` test backend (slow and failing
# models for tests/python/test_scheduler.py) and the TorchScript engine (`torch`, which needs
# the libtorch above); the Rust tests are built with the same features so nothing compiles
# twice. Clippy checks both the default build (no libtorch needed) and this one.
features=(--features oxserve/testkit,oxserve/torch)

echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy --workspace --all-targets --locked "${features[@]}" -- -D warnings

echo "== cargo build"
cargo build --workspace --locked "${features[@]}"

echo "== rust tests"
cargo nextest run --workspace --locked --no-fail-fast "${features[@]}"

# The fidelity corpus (ONNX models + Python onnxruntime reference outputs) is generated, not
# committed: the 224x224 CNN's inputs are large. Regenerated only when the script changes.
echo "== fidelity corpus"
.venv/bin/python scripts/make_corpus.py --if-needed

# SavedModel fixtures made by Python TensorFlow, cached by the script's content hash.
echo "== tensorflow fixtures"
tf_cache="${OXSERVE_CACHE:-$HOME/.cache/oxserve}"
OXSERVE_TF_MODELS="$("$tf_cache/venv-tf/bin/python" scripts/make_tf_models.py --if-needed | tail -n1)"
export OXSERVE_TF_MODELS
torch_models="$("$tf_cache/venv-torch/bin/python" scripts/make_torch_models.py --if-needed | tail -n1)"
export OXSERVE_TORCH_MODELS="$torch_models"
# .mar archives made by torch-model-archiver and TorchServe's recorded answers
# (tests/python/test_torchserve.py), cached by the script's content hash. Assigned before the
# export so that a failing generator stops the script (set -e).
torchserve_fixtures="$("$tf_cache/venv-torchserve/bin/python" scripts/make_torchserve_fixtures.py --if-needed | tail -n1)"
export OXSERVE_TORCHSERVE_FIXTURES="$torchserve_fixtures"

echo "== client conformance (pytest)"
OXSERVE_BIN="$target_dir/debug/oxserve" .venv/bin/python -m pytest tests/python -q
# TF Serving's gRPC API with the real client (tensorflow-serving-api and Python TensorFlow): run
# under the TensorFlow venv, since TensorFlow's protobuf conflicts with tritonclient's.
OXSERVE_BIN="$target_dir/debug/oxserve" "$tf_cache/venv-tf/bin/python" -m pytest tests/python_tf -q
