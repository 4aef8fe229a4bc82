#!/usr/bin/env bash
# Fetch TensorFlow for the TensorFlow engine and its tests, through pip only, into a cache
# outside the clone (so CI re-uses it between runs and a fresh machine builds it once):
#
#   $OXSERVE_CACHE/tensorflow/2.21.0/lib/libtensorflow_cc.so.2         the C API the engine dlopens
#   $OXSERVE_CACHE/tensorflow/2.21.0/lib/libtensorflow_framework.so.2  (found by the first via $ORIGIN)
#   $OXSERVE_CACHE/venv-tf/                Python TensorFlow + the tensorflow-serving-api stubs,
#                                          for fixtures, reference outputs and the TF Serving
#                                          client tests (its protobuf conflicts with tritonclient's
#                                          pin, hence a venv of its own)
#
# OXSERVE_CACHE defaults to ~/.cache/oxserve. The server finds the library there by itself
# (or by --tensorflow-library / OXSERVE__BACKENDS__TENSORFLOW_LIBRARY).
# Idempotent: each part is skipped when its stamp matches. Usage: scripts/setup-tensorflow.sh
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
cache="${OXSERVE_CACHE:-$HOME/.cache/oxserve}"
version="2.21.0"
libdir="$cache/tensorflow/$version/lib"
wheels="$cache/tensorflow/$version/wheels"
venv="$cache/venv-tf"
req="$root/python-requirements-tf.txt"

fetch_wheel() {
    if ! ls "$wheels"/tensorflow_cpu-"$version"-*.whl >/dev/null 2>&1; then
        echo "setup-tensorflow: downloading tensorflow-cpu $version (about 275 MB) with pip" >&2
        mkdir -p "$wheels"
        "$python" -m pip download --quiet --disable-pip-version-check --no-deps \
            --only-binary=:all: -d "$wheels" "tensorflow-cpu==$version"
    fi
    ls "$wheels"/tensorflow_cpu-"$version"-*.whl | head -n1
}

if [ ! -f "$libdir/.complete" ]; then
    wheel="$(fetch_wheel)"
    echo "setup-tensorflow: extracting the C API libraries into $libdir"
    tmp="$(mktemp -d "$cache/tensorflow/extract.XXXXXX")"
    "$python" - "$wheel" "$tmp" <<'PY'
import sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
names = ["tensorflow/libtensorflow_cc.so.2", "tensorflow/libtensorflow_framework.so.2"]
with zipfile.ZipFile(wheel) as z:
    for n in names:
        z.extract(n, out)
PY
    mkdir -p "$libdir"
    mv "$tmp"/tensorflow/libtensorflow_cc.so.2 "$tmp"/tensorflow/libtensorflow_framework.so.2 "$libdir/"
    rm -rf "$tmp"
    touch "$libdir/.complete"
fi

want="$(cat "$req" <(echo "$version") | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$venv/.requirements.sha256" 2>/dev/null || true)" != "$want" ]; then
    wheel="$(fetch_wheel)"
    echo "setup-tensorflow: installing Python TensorFlow and the TF Serving stubs into $venv"
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$wheel" -r "$req"
    # The stubs' own requirement is the GPU `tensorflow` package; tensorflow-cpu provides the
    # same `tensorflow` module, so the stubs are installed without their dependencies.
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
        "tensorflow-serving-api==$version"
    echo "$want" >"$venv/.requirements.sha256"
fi
echo "setup-tensorflow: library $libdir/libtensorflow_cc.so.2, python $venv/bin/python"
