"""A million descriptors on one machine: ``towhee-isc dedup`` of N descriptors and ``towhee-isc search``
of Q queries against them, each run as the real command in a child process (time, peak memory of the
child, planted copies found, false groups).

    .venv/bin/python benchmarks/million.py [--descriptors 1000000] [--pairs 10000] [--queries 100000]
                                           [--threshold 0.8] [--exact]

The descriptors are random unit 256-d vectors (far apart: the largest cosine between two of a million
is about 0.45) with ``--pairs`` planted copies: a vector turned away from its original to a cosine drawn
in [0.85, 0.95]. The queries are ``--pairs`` copies of references made the same way, the rest random.
``--exact`` passes ``--exact`` to both commands (the baseline; hours at a million).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from towhee_isc.workflow.descriptors import write_descriptors
from towhee_isc.workflow.engines import Exact

from child import run_child  # benchmarks/child.py

def random_unit(rng: np.random.Generator, n: int, d: int = 256, block: int = 100_000) -> np.ndarray:
    x = np.empty((n, d), np.float32)
    for start in range(0, n, block):  # in blocks: no float64 temporaries of the whole set
        part = rng.standard_normal((min(block, n - start), d), dtype=np.float32)
        x[start:start + len(part)] = part / np.linalg.norm(part, axis=1, keepdims=True)
    return x


def copies_of(rng: np.random.Generator, originals: np.ndarray, low: float = 0.85, high: float = 0.95) -> np.ndarray:
    """Unit vectors at a cosine drawn in [low, high] from each original."""
    away = rng.standard_normal(originals.shape, dtype=np.float32)
    away -= np.sum(away * originals, axis=1, keepdims=True) * originals
    away /= np.linalg.norm(away, axis=1, keepdims=True)
    cos = rng.uniform(low, high, size=(len(originals), 1)).astype(np.float32)
    return cos * originals + np.sqrt(1 - cos ** 2) * away


def load() -> str:
    return '%.1f %.1f %.1f' % os.getloadavg()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--descriptors', type=int, default=1_000_000)
    parser.add_argument('--pairs', type=int, default=10_000,
                        help='planted copies, in the collection and among the queries')
    parser.add_argument('--queries', type=int, default=100_000, help='0: no search')
    parser.add_argument('--threshold', type=float, default=0.8)
    parser.add_argument('--exact', action='store_true', help='force exact search (the baseline)')
    args = parser.parse_args()
    exact = ['--exact'] if args.exact else []
    work = Path(tempfile.mkdtemp(prefix='isc-million-'))
    try:
        rng = np.random.default_rng(0)
        vectors = random_unit(rng, args.descriptors)
        planted = rng.choice(args.descriptors, size=(args.pairs, 2), replace=False)
        vectors[planted[:, 1]] = copies_of(rng, vectors[planted[:, 0]])
        ids = [f'I{i:07d}' for i in range(args.descriptors)]
        write_descriptors(work / 'big.h5', ids, vectors)

        seconds, cpu, peak, out = run_child([sys.executable, '-m', 'towhee_isc', 'dedup', str(work / 'big.h5'),
                                             '--threshold', str(args.threshold), '-o', str(work / 'groups.csv'),
                                             *exact])
        groups: dict[str, set[int]] = {}
        with open(work / 'groups.csv', newline='') as f:
            for row in csv.DictReader(f):
                groups.setdefault(row['group'], set()).add(int(row['image_id'][1:]))
        want = {frozenset(map(int, p)) for p in planted}
        found = {frozenset(g) for g in groups.values()}
        print(json.dumps({'command': 'dedup', 'descriptors': args.descriptors, 'planted_pairs': args.pairs,
                          'threshold': args.threshold, 'seconds': round(seconds, 1), 'cpu_seconds': round(cpu, 1),
                          'peak_mib': round(peak),
                          'planted_found': len(want & found) / len(want), 'false_groups': len(found - want),
                          'engine': _engine(out), 'load_average': load()}), flush=True)
        os.remove(work / 'groups.csv')
        if not args.queries:
            return

        sources = rng.choice(args.descriptors, size=args.pairs, replace=False)  # queries 0..pairs-1 copy these
        queries = np.concatenate([copies_of(rng, vectors[sources]), random_unit(rng, args.queries - args.pairs)])
        write_descriptors(work / 'queries.h5', [f'Q{i:07d}' for i in range(args.queries)], queries)
        sample = min(1000, args.pairs)  # exact search ranks each planted source first (checked on a sample)
        exact_rank1 = np.mean(Exact().nearest(queries[:sample], vectors, 1)[0][:, 0] == sources[:sample])
        del vectors, queries
        seconds, cpu, peak, out = run_child([sys.executable, '-m', 'towhee_isc', 'search', str(work / 'queries.h5'),
                                             '--references', str(work / 'big.h5'), '-k', '10',
                                             '-o', str(work / 'matches.csv'), *exact])
        best: dict[int, list[int]] = {}
        with open(work / 'matches.csv', newline='') as f:
            for row in csv.DictReader(f):
                best.setdefault(int(row['query_id'][1:]), []).append(int(row['reference_id'][1:]))
        top1 = np.mean([best.get(q, [-1])[0] == s for q, s in enumerate(sources)])
        top10 = np.mean([s in best.get(q, []) for q, s in enumerate(sources)])
        print(json.dumps({'command': 'search', 'queries': args.queries, 'references': args.descriptors, 'k': 10,
                          'seconds': round(seconds, 1), 'cpu_seconds': round(cpu, 1), 'peak_mib': round(peak),
                          'planted_at_rank1': top1, 'planted_in_top10': top10, 'exact_at_rank1_sample': exact_rank1,
                          'engine': _engine(out), 'load_average': load()}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # gigabytes of descriptors


def _engine(stdout: str) -> str:
    return next((line for line in stdout.splitlines() if line.startswith('search engine:')), '?')


if __name__ == '__main__':
    main()
