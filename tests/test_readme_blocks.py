"""Every fenced ```python and ```bash block of README.md, run as written, each in a fresh process.

Each block runs in its own scratch copy of the repository (so the example photos are at ``examples/``
and nothing a block writes lands in the checkout), with the test's virtual environment first on PATH
(``python``, ``towhee-isc``, ``ray``) and linked as ``.venv``, a home folder of its own, no network
and no weights. The HTML comment on the line right before a block's opening fence says what else it
needs:

- ``<!-- readme: excerpt -->``: a fragment, not run (the text around it says so);
- ``<!-- readme: run by tests/test_x.py -->``: run as written by that test, which sets up what it
  needs (the file must exist and read README.md);
- ``<!-- readme: needs NAME ... -->``: this test provides each NAME first:
    ``weights``       the published weights from a mirror on 127.0.0.1 (TOWHEE_ISC_WEIGHTS_URL): synthetic
                      weights of the published architecture, one mirror and one torch hub cache for all blocks;
    ``milvus-server`` a Milvus standalone server on 127.0.0.1 (tests/milvus_server.py) at $MILVUS_URI,
                      token $MILVUS_TOKEN, one for all blocks;
    ``ray``           a Ray head on 127.0.0.1 (2 CPUs) at $RAY_ADDRESS, with its token, one for all blocks;
    ``setup``         what scripts/setup.sh builds: the test's own environment (its setup.sh is a stand-in
                      that checks it; the real script is run by CI before the tests);
    ``towhee09``      a ```python block for Towhee 0.9, run by .venv-towhee09's python (made by setup.sh).
A block with any other marker, or none where it cannot run, fails: nothing is skipped. Blocks that
later sections add are picked up by themselves.
"""
from __future__ import annotations

import functools
import http.server
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from commands import BIN, ray_head
from milvus_server import MilvusServerProcess, free_port

REPO = Path(__file__).resolve().parents[1]
README = REPO / 'README.md'
TOWHEE09_PYTHON = Path(os.environ.get('TOWHEE09_PYTHON', REPO / '.venv-towhee09' / 'bin' / 'python'))
LANGUAGES = {'python': 'python', 'py': 'python', 'bash': 'bash', 'sh': 'bash', 'shell': 'bash'}
PROVIDED = ('weights', 'milvus-server', 'ray', 'setup', 'towhee09')
NO_NETWORK = 'http://127.0.0.1:9/offline'  # the discard port: a download fails at once
BLOCK_TIMEOUT_S = 600
COPY_IGNORE = shutil.ignore_patterns('.git', '.venv*', '__pycache__', '*.egg-info', '.pytest_cache', 'saved')


@dataclass(frozen=True)
class Block:
    line: int        # line number of the opening fence
    language: str    # 'python' or 'bash'
    code: str
    marker: str      # the marker's text ('excerpt', 'needs weights', 'run by tests/x.py'), '' if none

    @property
    def id(self) -> str:
        return f'L{self.line}-{self.language}'

    @property
    def needs(self) -> list[str]:
        return self.marker.split()[1:] if self.marker.startswith('needs ') else []


def readme_blocks(text: str) -> list[Block]:
    """The python and bash blocks of a Markdown text, with the marker on the line before each."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        opening = re.fullmatch(r'```\s*([\w+-]*)\s*', lines[i])
        if not opening:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == '```'), None)
        assert end is not None, f'README line {i + 1}: a code block is never closed'
        language = LANGUAGES.get(opening.group(1).lower())
        if language:
            marker = re.fullmatch(r'\s*<!--\s*readme:\s*(.*?)\s*-->\s*', lines[i - 1]) if i else None
            blocks.append(Block(i + 1, language, '\n'.join(lines[i + 1:end]) + '\n', marker.group(1) if marker else ''))
        i = end + 1
    return blocks


BLOCKS = readme_blocks(README.read_text())


def test_blocks_and_markers_are_read_as_written():
    text = '\n'.join(['# t', '```python', 'print(1)', '```', '<!-- readme: needs weights ray -->', '```bash',
                      'echo a', '```', '```text', 'not code', '```', '<!-- readme: excerpt -->', '```py', 'x', '```'])
    blocks = readme_blocks(text)
    assert [(b.line, b.language, b.code, b.marker) for b in blocks] == [
        (2, 'python', 'print(1)\n', ''), (6, 'bash', 'echo a\n', 'needs weights ray'), (13, 'python', 'x\n', 'excerpt')]
    assert blocks[1].needs == ['weights', 'ray']
    assert len(BLOCKS) >= 10  # README's own


# --- what blocks need, one of each for the whole module ---

class Mirror:
    """A static HTTP server on 127.0.0.1 serving ``folder``; stopped with ``close``."""

    def __init__(self, folder: Path):
        handler = functools.partial(QuietFiles, directory=str(folder))
        self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
        self.url = f'http://127.0.0.1:{self.httpd.server_port}/'
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope='module')
def weights(tmp_path_factory, effnet_ckpt, seed_onnx_cache):
    """The published weights' file names served from 127.0.0.1 (synthetic weights of the published
    network, 512 px), and one torch hub cache for every block: one download; the ONNX export the
    session made already."""
    from towhee_isc.weights import WEIGHTS, WEIGHTS_URL_ENV
    folder = tmp_path_factory.mktemp('weights_mirror')
    for spec in WEIGHTS.values():
        (folder / spec.file_name).symlink_to(effnet_ckpt)
    torch_home = tmp_path_factory.mktemp('readme_torch')
    seed_onnx_cache(torch_home)
    mirror = Mirror(folder)
    yield {WEIGHTS_URL_ENV: mirror.url, 'TORCH_HOME': str(torch_home)}
    mirror.close()


@pytest.fixture(scope='module')
def milvus_server(tmp_path_factory):
    server = MilvusServerProcess(tmp_path_factory.mktemp('readme_milvus'))
    server.start()
    yield {'MILVUS_URI': server.uri, 'MILVUS_TOKEN': server.token}
    server.stop()


@pytest.fixture(scope='module')
def ray(weights):
    """A Ray head of 2 CPUs on 127.0.0.1, started apart as README says, stopped by its PID. Its workers
    (Ray starts them with the head's environment) see the weights mirror and the blocks' torch hub cache."""
    token = secrets.token_hex(16)
    temp = Path(tempfile.mkdtemp(prefix='ray', dir='/tmp'))  # Ray's socket paths must stay short
    env = {**os.environ, **weights, 'RAY_AUTH_MODE': 'token', 'RAY_AUTH_TOKEN': token}
    port = free_port()
    args = ['--head', '--node-ip-address', '127.0.0.1', f'--port={port}', '--num-cpus=2', '--num-gpus=0',
            '--include-dashboard=false', '--disable-usage-stats', f'--ray-client-server-port={free_port()}']
    try:
        with ray_head(args, {**env, 'RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER': '0'}, temp):
            yield {'RAY_ADDRESS': f'127.0.0.1:{port}', 'RAY_AUTH_MODE': 'token', 'RAY_AUTH_TOKEN': token,
                   'RAY_USAGE_STATS_ENABLED': '0'}
    finally:
        shutil.rmtree(temp, ignore_errors=True)


SETUP_STAND_IN = """#!/usr/bin/env bash
# Written by tests/test_readme_blocks.py: the environment scripts/setup.sh builds is the test's own.
set -e
cd "$(dirname "$0")/.."
.venv/bin/python -c 'import towhee_isc, towhee'
echo 'setup: the test environment stands in for scripts/setup.sh'
"""


def scratch_copy(tmp_path: Path) -> Path:
    """The repository's files (no .git, no environments) in a folder of their own, with ``.venv``
    linked to the test's environment."""
    root = tmp_path / 'repo'
    shutil.copytree(REPO, root, ignore=COPY_IGNORE)
    (root / '.venv').symlink_to(Path(sys.prefix))
    return root


@pytest.fixture(scope='module')
def checkout_state():
    """``git status`` of the checkout before the blocks ran (None where it is not a git checkout)."""
    done = subprocess.run(['git', 'status', '--porcelain'], cwd=REPO, capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else None


@pytest.mark.parametrize('block', BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block_runs_as_written(block: Block, request, tmp_path, checkout_state):
    if block.marker == 'excerpt':
        return  # not code to run; the text says so
    if block.marker.startswith('run by '):
        test_file = REPO / block.marker.removeprefix('run by ')
        assert test_file.is_file() and 'README' in test_file.read_text(), \
            f'README line {block.line}: {block.marker!r}, but that file does not exist or does not read README.md'
        return
    assert not block.marker or block.needs, f'README line {block.line}: unknown marker {block.marker!r}'
    unknown = [name for name in block.needs if name not in PROVIDED]
    assert not unknown, f'README line {block.line} needs {unknown}, which this test cannot provide (it knows {PROVIDED})'

    root = scratch_copy(tmp_path)
    home = tmp_path / 'home'
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(('RAY_', 'TOWHEE', 'MILVUS_'))}
    env.update({'HOME': str(home), 'PATH': f'{BIN}{os.pathsep}{env["PATH"]}', 'TORCH_HOME': str(tmp_path / 'torch'),
                'TOWHEE_ISC_WEIGHTS_URL': NO_NETWORK, 'PYTHONPATH': ''})
    for name in block.needs:
        if name == 'setup':
            (root / 'scripts' / 'setup.sh').write_text(SETUP_STAND_IN)
        elif name != 'towhee09':
            env.update({k: v for k, v in request.getfixturevalue(name.replace('-', '_')).items() if v is not None})
    if block.language == 'bash':
        command = ['bash', '-e', '-o', 'pipefail', '-c', block.code]
    elif 'towhee09' in block.needs:
        assert TOWHEE09_PYTHON.is_file(), f'{TOWHEE09_PYTHON} is missing: scripts/setup.sh makes it'
        command = [str(TOWHEE09_PYTHON), '-c', block.code]
    else:
        command = [str(BIN / 'python'), '-c', block.code]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    assert done.returncode == 0, (f'README line {block.line} failed (exit code {done.returncode})', done.stdout[-2000:],
                                  done.stderr[-4000:])
    assert 'Traceback' not in done.stderr, done.stderr[-4000:]
    # what a terminal shows: not the repr of a notebook object (Towhee 0.9's show() without tablefmt)
    assert '<IPython.core.display' not in done.stdout, (f'README line {block.line} prints a notebook object', done.stdout[-2000:])
    if checkout_state is not None:
        now = subprocess.run(['git', 'status', '--porcelain'], cwd=REPO, capture_output=True, text=True)
        assert now.stdout == checkout_state, f'README line {block.line} changed the checkout'
