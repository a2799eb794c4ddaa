"""Peak memory of ``towhee-isc dedup`` on one huge group of near-duplicates: N copies of one image (a
vector plus tiny noise, every pair above the threshold: N (N - 1) / 2 pairs, 312 million at 25,000), run
as the real command in a child process. Before grouping streamed its pairs, 10,000 such vectors took
3.3 GB and 25,000 ended in MemoryError; the goal is 25,000 in at most 1.5 GB.

    .venv/bin/python benchmarks/dedup_memory.py [--copies 25000] [--threshold 0.8] [--exact]

Prints the wall time, the child's peak resident memory (which includes the ~0.5-0.9 GB every
``towhee-isc`` command spends importing its libraries; a do-nothing command is measured too) and the
groups found (one group of N is right).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from towhee_isc.workflow.descriptors import write_descriptors


def peak_of(command: list[str]) -> tuple[float, float, subprocess.CompletedProcess]:
    """(wall seconds, peak resident GiB, result) of ``python -m towhee_isc COMMAND`` in a fresh child.
    Run through a wrapper child so that RUSAGE_CHILDREN holds this command alone."""
    wrapper = ('import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); '
               'print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); '
               'sys.stderr.write(r.stdout + r.stderr); sys.exit(r.returncode)')
    started = time.perf_counter()
    done = subprocess.run([sys.executable, '-c', wrapper, sys.executable, '-m', 'towhee_isc', *map(str, command)],
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    peak_kib = int(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else 0
    return wall, peak_kib / 2**20, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--copies', type=int, default=25_000)
    parser.add_argument('--threshold', type=float, default=0.8)
    parser.add_argument('--exact', action='store_true', help='pass --exact (the default engine is exact to 100,000)')
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    one = rng.standard_normal(256).astype(np.float32)
    copies = one + 0.01 * rng.standard_normal((args.copies, 256)).astype(np.float32)
    copies /= np.linalg.norm(copies, axis=1, keepdims=True)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        write_descriptors(folder / 'copies.h5', [f'C{i:06d}' for i in range(args.copies)], copies)
        lowest = float((copies[:2000] @ copies[:2000].T).min())
        print(f'{args.copies:,} near-identical 256-d vectors (lowest cosine among 2,000 of them: {lowest:.4f}), '
              f'{args.copies * (args.copies - 1) // 2:,} pairs above {args.threshold}')
        _, baseline, _ = peak_of(['dedup', '--help'])
        print(f'start-up alone (towhee-isc dedup --help): peak {baseline:.2f} GiB')
        wall, peak, done = peak_of(['dedup', folder / 'copies.h5', '--threshold', str(args.threshold),
                                    '-o', folder / 'groups.json', *(['--exact'] if args.exact else [])])
        if done.returncode != 0:
            sys.exit(f'dedup failed (exit {done.returncode}): {done.stderr[-2000:]}')
        groups = json.loads((folder / 'groups.json').read_text())
        print(f'dedup: {wall:.1f} s wall, peak {peak:.2f} GiB (goal: at most 1.5 GB); '
              f'{len(groups)} group(s), sizes {sorted((len(g["members"]) for g in groups), reverse=True)[:3]}')


if __name__ == '__main__':
    main()
