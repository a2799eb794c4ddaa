"""Measuring a command as a child process, for the benchmarks: wall time, CPU time and peak memory.

A small wrapper process starts the command: a child started straight from the (large) benchmark
process would count pages shared with it before exec in its peak. The wrapper writes its figures to a
file, so the command's stderr stays the terminal's, with its progress lines. CPU time is reported
beside wall time because on a shared machine wall time says little alone.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time

_WRAPPER = ('import resource, subprocess, sys; r = subprocess.run(sys.argv[2:]); '
            'u = resource.getrusage(resource.RUSAGE_CHILDREN); '
            'open(sys.argv[1], "w").write(f"{u.ru_maxrss} {u.ru_utime + u.ru_stime}"); sys.exit(r.returncode)')


def run_child(command: list[str]) -> tuple[float, float, float, str]:
    """(wall seconds, CPU seconds, peak resident MiB, stdout) of ``command``; exits if it fails."""
    with tempfile.NamedTemporaryFile('r', suffix='.usage') as usage:
        start = time.perf_counter()
        result = subprocess.run([sys.executable, '-c', _WRAPPER, usage.name, *command], stdout=subprocess.PIPE,
                                text=True)
        seconds = time.perf_counter() - start
        if result.returncode:
            sys.exit(f'{command} failed (its error is above)')
        peak_kib, cpu = usage.read().split()
    return seconds, float(cpu), int(peak_kib) / 1024, result.stdout
