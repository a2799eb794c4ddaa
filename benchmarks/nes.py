"""The cost of the winner's post-processing (``towhee_isc.postprocess``): augmenting the negatives
(once per negative set), and the subtraction per image, plus the exact k-nearest-neighbour engines.

    .venv/bin/python benchmarks/nes.py [--negatives 100000] [--large 1000000] [--skip-large]

Random unit 256-d vectors stand in for descriptors: exact search costs the same whatever the values.
The augmentation runs as ``towhee-isc nes`` in a child process (peak memory = its maximum resident
set size, imports included) with an empty cache; the rest runs here. For ``--large`` negatives (the
winner's 1,000,000) the augmentation is timed on a slice of rows and extrapolated: all of it takes
about an hour here. faiss (``faiss-cpu``, IndexFlatIP) is timed beside our blocked numpy if installed.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from towhee_isc.postprocess import NegativeEmbeddings, nearest
from towhee_isc.workflow.descriptors import write_descriptors

# Runs a command and reports its peak memory; a small wrapper starts it, so pages shared with this
# (large) process before exec are not counted in the child's peak.
_WRAPPER = ('import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); '
            'print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(r.returncode)')


def unit_vectors(count: int, seed: int, dim: int = 256) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((count, dim), np.float32)
    for start in range(0, count, 100_000):  # in pieces: no float64 copy of a large set
        x = rng.standard_normal((min(100_000, count - start), dim), dtype=np.float32)
        out[start:start + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def median_seconds(call, repeats: int) -> tuple[float, float]:
    """Median (wall, CPU) seconds of ``call``. CPU time summed over threads, divided by the cores,
    says what the wall time would be on idle cores when other work shares the machine."""
    call()  # warm up
    walls, cpus = [], []
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        call()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    return float(np.median(walls)), float(np.median(cpus))


def knn_engines(database: np.ndarray, rows: int, k: int = 10) -> dict:
    """Seconds per 1,000 query rows for each exact search engine, and the extrapolation to all rows."""
    queries = database[:rows]
    engines = {'numpy, blocked, grouped top-k (ours)': lambda: nearest(queries, database, k),
               'numpy, blocked, argpartition': lambda: _plain_numpy(queries, database, k)}
    try:
        import faiss
        index = faiss.IndexFlatIP(database.shape[1])
        index.add(database)
        engines[f'faiss {faiss.__version__} IndexFlatIP'] = lambda: index.search(queries, k)
    except ImportError:
        pass
    out = {}
    for name, call in engines.items():
        seconds, cpu = median_seconds(call, 1)
        out[name] = {'s_per_1000_rows': seconds / rows * 1000, 'all_rows_s': seconds / rows * len(database),
                     'all_rows_cpu_s': cpu / rows * len(database)}
        print(f'  {name}: {seconds / rows * 1000:.3f} s per 1,000 rows -> {seconds / rows * len(database):.0f} s '
              f'for all {len(database):,} (CPU {cpu / rows * len(database):.0f} s)', flush=True)
    return out


def _plain_numpy(queries, database, k):
    rows = max(1, (1 << 25) // len(database))  # at most 128 MB at a time, like ours
    for start in range(0, len(queries), rows):
        sim = queries[start:start + rows] @ database.T
        np.argpartition(sim, sim.shape[1] - k, axis=1)


def per_image(nes: NegativeEmbeddings, batch: int) -> dict:
    queries = unit_vectors(batch, seed=7)
    (batch_s, batch_cpu), (single_s, single_cpu) = (median_seconds(lambda: nes.subtract(queries), 3),
                                                    median_seconds(lambda: nes.subtract(queries[:1]), 50))
    result = {'batch': batch, 'batch_ms_per_image': batch_s / batch * 1000, 'single_image_ms': single_s * 1000,
              'batch_cpu_ms_per_image': batch_cpu / batch * 1000, 'single_image_cpu_ms': single_cpu * 1000}
    print(f'  subtraction with {len(nes.negatives):,} negatives: {result["batch_ms_per_image"]:.3f} ms/image in a '
          f'batch of {batch} (CPU {result["batch_cpu_ms_per_image"]:.3f}), {result["single_image_ms"]:.2f} ms for '
          f'one image alone (CPU {result["single_image_cpu_ms"]:.2f})', flush=True)
    return result


def augment_command(work: Path, count: int) -> dict:
    """``towhee-isc nes`` with ``count`` negatives and an empty cache: time, peak memory."""
    negatives = unit_vectors(count, seed=1)
    write_descriptors(work / 'negatives.h5', [f'N{i:07d}' for i in range(count)], negatives)
    write_descriptors(work / 'queries.h5', [f'Q{i:05d}' for i in range(1000)], unit_vectors(1000, seed=2))
    # An empty cache: the augmentation runs; its progress line is drawn into the pipe, to be read below.
    env = {**os.environ, 'TORCH_HOME': str(work / 'torch'), 'TOWHEE_ISC_PROGRESS': '1'}
    command = [sys.executable, '-m', 'towhee_isc', 'nes', str(work / 'queries.h5'), '--negatives',
               str(work / 'negatives.h5'), '-o', str(work / 'out.h5')]
    start = time.perf_counter()
    result = subprocess.run([sys.executable, '-c', _WRAPPER, *command], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if result.returncode:
        sys.exit(f'{command} failed:\n{result.stderr[-3000:]}')
    peak_mib = int(result.stderr.strip().splitlines()[-1]) / 1024
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = cpu.ru_utime + cpu.ru_stime  # the wrapper and the command: nothing else has been waited for
    bar = [line for line in result.stderr.replace('\r', '\n').splitlines() if 'augmenting negatives: 100%' in line]
    start = time.perf_counter()
    subprocess.run(command, capture_output=True, env=env, check=True)  # again: the cache is used
    cached_s = time.perf_counter() - start
    out = {'negatives': count, 'command_s': seconds, 'command_cpu_s': cpu_s, 'peak_mib': peak_mib, 'progress_bar': bar[-1].strip() if bar else None,
           'command_again_cached_s': cached_s}
    print(f'  towhee-isc nes, {count:,} negatives, 1,000 queries: {seconds:.1f} s wall (augmentation, import, '
          f'files; CPU {cpu_s:.0f} s), peak {peak_mib:.0f} MiB; again with the cache: {cached_s:.1f} s\n  last bar: {out["progress_bar"]}',
          flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--negatives', type=int, default=100_000)
    parser.add_argument('--large', type=int, default=1_000_000)
    parser.add_argument('--large-rows', type=int, default=2000, help='rows timed to extrapolate the large set')
    parser.add_argument('--skip-large', action='store_true')
    parser.add_argument('--json', help='write the report here')
    args = parser.parse_args()
    report = {'cores': len(os.sched_getaffinity(0)), 'load_average_before': os.getloadavg()}
    work = Path(tempfile.mkdtemp(prefix='isc-nes-'))
    try:
        print(f'augmentation of {args.negatives:,} negatives (the command, end to end):', flush=True)
        report['augment'] = augment_command(work, args.negatives)
        negatives = unit_vectors(args.negatives, seed=1)
        print(f'exact 10 nearest neighbours among {args.negatives:,} (the augmentation\'s search):', flush=True)
        report['knn'] = knn_engines(negatives, 5000)
        nes = NegativeEmbeddings(negatives, cache_dir=work / 'cache', progress=False)
        start, cpu = time.perf_counter(), time.process_time()
        nes.augmented  # noqa: B018
        report['augment_in_process_s'] = time.perf_counter() - start
        report['augment_in_process_cpu_s'] = time.process_time() - cpu
        print(f'  augmentation in this process: {report["augment_in_process_s"]:.1f} s '
              f'(CPU {report["augment_in_process_cpu_s"]:.1f} s)', flush=True)
        report['per_image'] = per_image(nes, 1000)
        del nes, negatives
        if not args.skip_large:
            print(f'{args.large:,} negatives (the winner\'s setting), extrapolated from {args.large_rows:,} rows:', flush=True)
            large = unit_vectors(args.large, seed=3)
            report['large_knn'] = knn_engines(large, args.large_rows)
            nes = NegativeEmbeddings(large, cache=False)
            nes._augmented = large  # the subtraction's cost does not depend on the values
            report['large_per_image'] = per_image(nes, 1000)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report['load_average_after'] = os.getloadavg()
    print(f'load average (1, 5, 15 min) before {report["load_average_before"]}, after {report["load_average_after"]}: '
          f'above {report["cores"]} other work shared the cores, and wall times grow with it')
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(json.dumps(report))


if __name__ == '__main__':
    main()
