#!/usr/bin/env bash
# The wheels swapctl's image installs offline (Dockerfile, with `--no-index`): swapctl's own,
# built from this checkout, its dependencies' for the image's Python, and pip's, which runs
# from its wheel in an image that has no pip. Downloaded here, on the host: no registry is
# reachable from inside a build.
# Usage: image-wheels.sh DEST [PYTHON_VERSION]   (default 3.14, the python3 of swapctl/llama-server:sid)
set -euo pipefail

DEST=${1:?usage: image-wheels.sh DEST [PYTHON_VERSION]}
PYTHON_VERSION=${2:-3.14}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PIP=${PIP:-$ROOT/.venv/bin/pip}
ARCH=$(uname -m)

rm -rf "$DEST"
mkdir -p "$DEST"
"$PIP" wheel --quiet --no-deps --wheel-dir "$DEST" "$ROOT"
# every dependency as a wheel for that interpreter on glibc Linux (pip matches each tag named, no older)
"$PIP" download --quiet --dest "$DEST" --only-binary=:all: \
    --python-version "$PYTHON_VERSION" --implementation cp \
    --platform "manylinux_2_28_$ARCH" --platform "manylinux_2_17_$ARCH" --platform "manylinux2014_$ARCH" \
    --platform "manylinux_2_5_$ARCH" --platform "manylinux1_$ARCH" --platform "linux_$ARCH" \
    "$DEST"/swapctl-*.whl pip
echo "image-wheels: $(ls "$DEST" | wc -l) wheels in $DEST"
