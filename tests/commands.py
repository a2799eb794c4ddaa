"""Running ``towhee-isc`` the way users do: a separate process per command."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def towhee_isc(*args, cwd=None, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m towhee_isc ARGS...`` in a fresh process (the same as the ``towhee-isc`` script)."""
    return subprocess.run([sys.executable, '-m', 'towhee_isc', *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=None if env is None else {**os.environ, **env})


def assert_one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
    """Exit code 2 and exactly one line on stderr, ``error: ...``, containing ``message`` (besides a
    'Downloading URL' progress line)."""
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith('Downloading ')]
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr[-3000:]
    assert message in lines[0], (message, lines[0])
