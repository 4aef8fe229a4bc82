#!/usr/bin/env bash
# Fetch PyTorch for the TorchScript engine (cargo feature `torch`) and its tests, through pip
# only, into a cache outside the clone:
#
#   $OXSERVE_CACHE/venv-torch/            Python torch 2.13.0 (the exact libtorch tch 0.26 binds),
#                                         for fixtures and reference outputs; PyPI's wheel brings
#                                         CUDA libraries, only the CPU is used
#   $OXSERVE_CACHE/torch/2.13.0/libtorch/ the Python-free libtorch tch builds against and the
#                                         server runs with: include/ and lib/ (libtorch_cpu,
#                                         libc10, libtorch, libgomp, and the two CUDA runtime
#                                         libraries libtorch_cpu needs even on CPU), build-version
#
# Build and run with it:  LIBTORCH=$OXSERVE_CACHE/torch/2.13.0/libtorch cargo build --features oxserve/torch
# (the binary records lib/ as its run path). Idempotent. Usage: scripts/setup-torch.sh
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
cache="${OXSERVE_CACHE:-$HOME/.cache/oxserve}"
version="2.13.0"
venv="$cache/venv-torch"
libtorch="$cache/torch/$version/libtorch"
req="$root/python-requirements-torch.txt"

want="$(cat "$req" <(echo "$version") | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$venv/.requirements.sha256" 2>/dev/null || true)" != "$want" ]; then
    echo "setup-torch: installing torch $version into $venv (about 2.6 GB of wheels from PyPI)"
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "torch==$version" -r "$req"
    echo "$want" >"$venv/.requirements.sha256"
fi

if [ ! -f "$libtorch/.complete" ]; then
    echo "setup-torch: laying out libtorch in $libtorch"
    site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    tmp="$(mktemp -d "$cache/torch/layout.XXXXXX" 2>/dev/null || { mkdir -p "$cache/torch"; mktemp -d "$cache/torch/layout.XXXXXX"; })"
    mkdir -p "$tmp/lib"
    cp -r "$site/torch/include" "$tmp/include"
    for lib in libtorch_cpu.so libc10.so libtorch.so libgomp.so.1; do
        cp "$site/torch/lib/$lib" "$tmp/lib/"
    done
    # The CUDA runtime libraries libtorch_cpu needs even on CPU (their wheels' layout differs
    # between CUDA releases: nvidia/cu13/lib or nvidia/cuda_runtime/lib).
    for pattern in 'libcudart.so.[0-9]*' 'libcupti.so.[0-9]*'; do
        found="$(find "$site/nvidia" -name "$pattern" -type f | head -n1)"
        [ -n "$found" ] || { echo "setup-torch: no $pattern in $site/nvidia" >&2; exit 1; }
        cp "$found" "$tmp/lib/"
    done
    echo "$version" >"$tmp/build-version"
    touch "$tmp/.complete"
    chmod 755 "$tmp"
    rm -rf "$libtorch"
    mkdir -p "$(dirname "$libtorch")"
    mv "$tmp" "$libtorch"
fi
echo "setup-torch: LIBTORCH=$libtorch, python $venv/bin/python"
