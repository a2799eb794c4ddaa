#!/usr/bin/env bash
# Set up from nothing, one line per step:
#   .venv           what a user needs: this package (editable) with the workflow, serve, ray, triton and
#                   test extras (torch included);
#   .venv-towhee09  Towhee 0.9.0 (the last release with towhee.dc2 and DataCollection chaining), only for
#                   tests/test_towhee.py's seed-example test. It holds Towhee 0.9 and the few packages whose
#                   versions it needs (numpy<2, pyarrow<15, ...) and reads everything else, torch included,
#                   from .venv's site-packages (a .pth file), so the 6 GB of torch are on disk once.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
start=$SECONDS
step() { echo "setup: [$1] $2 ($((SECONDS - start)) s)"; }
# pip's own output only if it fails (its notices would bury the steps).
quietly() {
    local log; log=$(mktemp)
    if ! "$@" > "$log" 2>&1; then cat "$log"; rm -f "$log"; echo "setup: failed: $*"; return 1; fi
    rm -f "$log"
}

step 1/4 "creating .venv"
$python -m venv .venv
# uv installs the same packages as pip from the same index, in parallel: about a minute instead of pip's
# four. Where uv cannot be had, pip does it. Both compile the .py files as they install them, so that no
# process has to (with PYTHONDONTWRITEBYTECODE set, each one would compile torch again).
if .venv/bin/pip install uv > /dev/null 2>&1; then  # its failure is no error: pip does the work then
    # uv does not read pip's configuration: a constraint file pip is told to use (a machine's pinned
    # torch, say) is handed to uv, so both install the same versions.
    constraints=()
    while IFS= read -r file; do constraints+=("--constraint=$file"); done < <(.venv/bin/pip config list 2>/dev/null |
        sed -n "s/^\(global\|install\|:env:\)\.constraint='\(.*\)'$/\2/p")
    install() { local venv=$1; shift; .venv/bin/uv pip install --compile-bytecode ${constraints[@]+"${constraints[@]}"} --python "$venv/bin/python" "$@"; }
else
    echo "setup: uv could not be installed; installing with pip (slower)"
    install() { local venv=$1; shift; "$venv/bin/pip" install "$@"; }
fi
step 2/4 "installing towhee-isc with its extras into .venv (torch, Towhee 1.x, Ray, Milvus; a minute or more the first time)"
# towhee imports pkg_resources, so setuptools<81 goes into the same install as torch (which may upgrade it).
quietly install .venv -e '.[test]' 'setuptools<81'

step 3/4 "creating .venv-towhee09 (for the tests), reading torch and the rest from .venv"
$python -m venv .venv-towhee09
main_site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
own_site=$(.venv-towhee09/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# addsitedir (not a plain path line) so .venv's own .pth files are read too, among them the editable
# install of towhee_isc (and towheeoperator, where Towhee 0.9 looks); it is appended after this venv's
# site-packages, so the versions installed here win.
echo "import site; site.addsitedir('$main_site')" > "$own_site/zz_main_venv.pth"
step 4/4 "installing Towhee 0.9.0 into .venv-towhee09"
# (pip says that .venv's milvus-lite wants pyarrow>=15: Towhee 0.9's tests do not use it.)
quietly install .venv-towhee09 'towhee==0.9.0' 'numpy<2' 'pyarrow<15' 'opencv-python-headless<4.11' \
    'setuptools<81' ipython pandas
.venv-towhee09/bin/python -c 'import towhee.dc2, torch, towhee_isc' || { echo 'setup: .venv-towhee09 does not import'; exit 1; }
echo "setup: done in $((SECONDS - start)) s: .venv/bin/python -m towhee_isc --help"
