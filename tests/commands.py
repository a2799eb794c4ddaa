"""Running ``towhee-isc`` the way users do: a separate process per command."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
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


def descendants(pid: int) -> list[int]:
    """Every process started by process ``pid``, and by those, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                parent = int(Path(f'/proc/{entry}/stat').read_text().rsplit(')', 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@contextlib.contextmanager
def ray_head(args: list[str], env: dict, temp: Path):
    """``ray start ARGS --block --temp-dir TEMP`` in its own process, waited for until it blocks (at most
    3 minutes, its log in TEMP/head.log); yields the process and stops it by PID (``ray start --block``
    stops every process it started when it is terminated)."""
    log_path = temp / 'head.log'
    with open(log_path, 'w') as log:
        head = subprocess.Popen([sys.executable, '-m', 'ray.scripts.scripts', 'start', *args, '--block',
                                 f'--temp-dir={temp}'], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while 'will now block' not in log_path.read_text():
            assert head.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        yield head
    finally:
        processes = [head.pid, *descendants(head.pid)]  # known only while the head is their parent
        head.terminate()
        try:
            head.wait(timeout=10)
        except subprocess.TimeoutExpired:  # Ray's graceful stop takes ~40 s after jobs ran: not for tests
            pass
        for pid in processes:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        head.wait()
