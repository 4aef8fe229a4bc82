#!/usr/bin/env bash
# Install the real TorchServe 0.12.0 + torch-model-archiver 0.12.0 (the peer oxserve's
# TorchServe-compatible front end is compared with), through pip only, into a cache outside
# the clone:
#
#   $OXSERVE_CACHE/venv-torchserve/   torchserve, torch-model-archiver, torchvision, captum,
#                                     PyYAML (python-requirements-torchserve.txt), on top of
#                                     venv-torch's torch 2.13.0
#
# OXSERVE_CACHE defaults to ~/.cache/oxserve. TorchServe's frontend also needs Java 17
# (`java` on PATH or JAVA_HOME; Debian: apt-get install openjdk-17-jre-headless).
#
# How torch gets in, and why:
#  - Not `--system-site-packages`: a venv made from venv-torch's python takes the *base*
#    interpreter's site-packages (pyenv's global one here: awscli, IPython, PyYAML, ...), never
#    venv-torch's. Torch is not visible, and whatever happens to be installed globally leaks in
#    (PyYAML there even hid TorchServe's undeclared dependency on it).
#  - Not a second `pip install torch==2.13.0`: PyPI only has the +cu130 wheel, 2.6 GB of
#    downloads and 4.7 GB on disk again (no pip cache is kept on these machines).
#  - Instead: a plain venv from the same base interpreter as venv-torch plus a .pth file that
#    appends venv-torch's site-packages to sys.path. pip sees torch 2.13.0 there as installed,
#    so torchvision==0.28.0 (which pins torch==2.13.0) resolves against it, and everything
#    new lands in venv-torchserve only. TorchServe starts its workers with the launcher's
#    sys.executable (this venv's python), so they see torch too.
# Runs scripts/setup-torch.sh first (itself idempotent). Idempotent: skipped when the stamp
# matches. Usage: scripts/setup-torchserve.sh
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${OXSERVE_CACHE:-$HOME/.cache/oxserve}"
torch_venv="$cache/venv-torch"
venv="$cache/venv-torchserve"
req="$root/python-requirements-torchserve.txt"

"$root/scripts/setup-torch.sh" >&2

torch_site="$("$torch_venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
want="$(cat "$req" <(echo "$torch_site") "$torch_venv/.requirements.sha256" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$venv/.requirements.sha256" 2>/dev/null || true)" != "$want" ]; then
    echo "setup-torchserve: installing TorchServe 0.12.0 into $venv" >&2
    if [ ! -x "$venv/bin/python" ]; then
        base="$("$torch_venv/bin/python" -c 'import sys; print(sys._base_executable)')"
        "$base" -m venv "$venv"
    fi
    site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    echo "$torch_site" >"$site/_oxserve_venv_torch.pth"
    "$venv/bin/python" -c 'import torch' \
        || { echo "setup-torchserve: torch from $torch_site is not importable" >&2; exit 1; }
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
    "$venv/bin/python" -c 'import ts, model_archiver, torchvision, captum, yaml'
    echo "$want" >"$venv/.requirements.sha256"
fi
echo "setup-torchserve: python $venv/bin/python, torchserve $venv/bin/torchserve"
