#!/usr/bin/env bash
# Create (or refresh) the repository's Python virtual environment in ./.venv
# with the packages pinned in python-requirements.txt.
#
# Idempotent: the install is skipped when .venv/.requirements.sha256 matches
# the hash of python-requirements.txt. Only pip/PyPI downloads are used.
#
# Usage: scripts/setup-python.sh            (PYTHON=python3.11 to pick the interpreter)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

python="${PYTHON:-python3}"
venv="$root/.venv"
req="$root/python-requirements.txt"
stamp="$venv/.requirements.sha256"

if [ ! -x "$venv/bin/python" ]; then
    echo "setup-python: creating $venv with $("$python" --version 2>&1)"
    "$python" -m venv "$venv"
fi

want="$(sha256sum "$req" | cut -d' ' -f1)"
have="$(cat "$stamp" 2>/dev/null || true)"
if [ "$want" = "$have" ]; then
    echo "setup-python: $venv is up to date"
    exit 0
fi

echo "setup-python: installing python-requirements.txt into $venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
echo "$want" >"$stamp"
echo "setup-python: done"
