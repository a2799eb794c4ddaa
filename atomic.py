"""Files that appear whole or not at all (weights, ONNX exports, descriptor files, CSVs, reports), and the
checks and locks around writing them."""
from __future__ import annotations

import contextlib
import glob
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterator


@contextlib.contextmanager
def atomic_write(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` to write to. If the block succeeds it is renamed to
    ``target`` (readable like any new file, not mkstemp's 0600); if it fails it is removed. A crash
    or a concurrent reader never sees a partial ``target``. A ``target`` that is a device, a FIFO or a
    socket (``/dev/null``) is refused: the rename would replace it with a file."""
    target = Path(target)
    check_not_special(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name + '.', suffix='.partial')
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_writable(target: str | os.PathLike, what: str = 'output') -> Path:
    """Fail before any work if ``target`` cannot be written: it is a folder, or the nearest existing
    folder above it is not writable. A long job must not discover that only at the end."""
    target = Path(target)
    if target.is_dir():
        raise ValueError(f'{what} {str(target)!r} is a folder: give a file name')
    check_not_special(target, what)
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f'cannot write {what} {str(target)!r}: {str(folder)!r} is not a writable folder')
    return target


def check_not_special(target: Path, what: str = 'output') -> None:
    """Refuse a ``target`` that exists as a device, FIFO or socket: outputs are written beside it and renamed
    over it, which would replace, say, ``/dev/null`` itself (as root) with a regular file."""
    try:
        mode = os.lstat(target).st_mode
    except OSError:
        return  # not there (yet): a new file
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode) or stat.S_ISDIR(mode)):
        raise ValueError(f'{what} {str(target)!r} is a device, FIFO or socket, not a file: writing the {what} would '
                         'replace it; give a file name')


@contextlib.contextmanager
def exclusive(folder: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (created if needed) across processes, e.g. while one
    process downloads or exports into it; others wait. No lock where ``fcntl`` is missing (Windows)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def read_memo(path: str | os.PathLike) -> dict:
    """A JSON object kept to save time (at most 1 MiB read); a file that is missing, damaged or not an
    object counts as empty: only time is lost."""
    try:
        with open(path, 'rb') as f:
            data = json.loads(f.read(1 << 20))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def update_memo(path: str | os.PathLike, change: Callable[[dict], dict]) -> None:
    """Write ``change(read_memo(path))`` to ``path``, atomically and under ``exclusive`` on its folder, so
    processes updating it at once never lose each other's entries. A folder that cannot be written is
    passed over: a memo only saves time."""
    path = Path(path)
    try:
        with exclusive(path.parent):
            memo = change(read_memo(path))
            with atomic_write(path) as tmp:
                tmp.write_text(json.dumps(memo))
    except OSError:
        pass


def remove_partials(target: str | os.PathLike) -> None:
    """Remove the temporary files an interrupted ``atomic_write(target)`` left (a killed process cannot
    clean up). Call it only while holding ``exclusive`` on the folder, so no live writer loses its file."""
    target = Path(target)
    for stale in target.parent.glob(glob.escape(target.name) + '.*.partial'):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()


class Busy(ValueError):
    """Another process holds the lock on a file that this one was about to write."""


@contextlib.contextmanager
def sole_writer(target: str | os.PathLike, what: str) -> Iterator[None]:
    """Fail at once (``Busy``, naming ``what``) if another process is writing ``target``; else hold a lock on
    it until the block ends. The lock is ``<target>.lock`` (flock, released by the kernel even when the
    process is killed), an empty file removed afterwards; a file of that name with something in it is the
    user's own and stays (it is locked, never written). No lock where ``fcntl`` is missing (Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    lock = Path(str(target) + '.lock')
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Busy(f'another {what} is writing {str(target)!r} (it holds {str(lock)!r}): wait for it to end, '
                       'or choose another output') from None
        try:  # the holder before us may have removed the file we locked: lock the one that is there now
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_size == 0:  # ours are empty
                lock.unlink()
        os.close(fd)
