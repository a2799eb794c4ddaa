"""Start-up: help, usage errors and evaluate answer without importing torch, timm or Towhee. Checked by
which modules a fresh process imports (``python -X importtime`` lists them), not by the clock: README's
Start-up section has the times."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from towhee_isc.workflow.cli import COMMANDS

BIN = Path(sys.executable).parent
HEAVY = {'torch', 'timm', 'towhee', 'torchvision', 'numpy', 'PIL', 'faiss', 'pymilvus', 'h5py'}


def run_importing(*argv: str, cwd: Path | None = None) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``python -X importtime ARGV...`` as a user would; returns the result and the top-level
    packages the process imported."""
    result = subprocess.run([sys.executable, '-X', 'importtime', *argv], capture_output=True, text=True, cwd=cwd,
                            timeout=120)
    imported = {line.rsplit('|', 1)[1].strip().split('.')[0] for line in result.stderr.splitlines()
                if line.startswith('import time:') and '|' in line}
    result.stderr = '\n'.join(line for line in result.stderr.splitlines() if not line.startswith('import time:'))
    return result, imported


@pytest.mark.parametrize('argv', [
    [str(BIN / 'towhee-isc'), '--help'],
    ['-m', 'towhee_isc', '--help'],
    ['-m', 'towhee_isc', 'nes', '--help'],
    ['-m', 'towhee_isc', 'embedd', 'photos/'],                # a mistyped command
    ['-m', 'towhee_isc', 'dedup', 'x.h5', '--thresold', '0.9'],  # a mistyped option
    ['-m', 'towhee_isc', 'no_such_photo.jpg'],                # a mistyped image (it took 30-40 s to say so)
    ['-m', 'towhee_isc', 'embed', 'photos/', '-o', 'x.h5', '--checkpoint', 'no_such.pth'],  # and checkpoint
], ids=['towhee-isc --help', 'python -m --help', 'nes --help', 'typo command', 'typo option', 'typo image',
        'typo checkpoint'])
def test_help_and_usage_errors_import_nothing_heavy(argv):
    result, imported = run_importing(*argv)
    assert result.returncode == (0 if '--help' in argv else 2), result.stderr
    assert 'towhee_isc' in imported and not imported & HEAVY, sorted(imported & HEAVY)


def test_python_m_help_lists_every_command():
    result, _ = run_importing('-m', 'towhee_isc', '--help')
    listed = result.stdout.split('\ncommands (')[1].splitlines()[1:]  # the epilog: '  NAME  what it does'
    assert {line.split()[0] for line in listed if line.strip()} == set(COMMANDS)
    assert 'usage: python -m towhee_isc' in result.stdout and '--checkpoint FILE' in result.stdout


def test_evaluate_needs_numpy_only(tmp_path):
    (tmp_path / 'm.csv').write_text('query_id,reference_id,score\nQ1,R1,0.9\nQ2,R9,0.5\n')
    (tmp_path / 'gt.csv').write_text('query_id,reference_id\nQ1,R1\nQ2,\n')
    result, imported = run_importing('-m', 'towhee_isc', 'evaluate', 'm.csv', 'gt.csv', '--json', cwd=tmp_path)
    assert result.returncode == 0 and '"average_precision": 1.0' in result.stdout, result.stderr
    assert 'numpy' in imported and not imported & {'torch', 'timm', 'towhee', 'faiss', 'pymilvus', 'h5py'}
