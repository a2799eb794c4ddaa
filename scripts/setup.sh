#!/usr/bin/env bash
# Set up from nothing: .venv (the operator, export and test dependencies) and .venv-towhee09
# (Towhee 0.9.0, the last release with towhee.dc2 and DataCollection chaining, for the seed-example test).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}

# towhee imports pkg_resources, so setuptools<81 goes into the same install as torch (which may upgrade it).
$python -m venv .venv
.venv/bin/pip install -q -e '.[test]' 'setuptools<81'

$python -m venv .venv-towhee09
.venv-towhee09/bin/pip install -q -e . 'towhee==0.9.0' 'numpy<2' 'pyarrow<15' ipython pandas \
    'opencv-python-headless<4.11' 'setuptools<81'
