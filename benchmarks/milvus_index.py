"""Recall@10 and speed of Milvus's index types against exact search, through our MilvusIndex.

    .venv/bin/python benchmarks/milvus_index.py [--server] [--n 100000] [--queries 1000]

100,000 random unit 256-d vectors (float32) are indexed as FLAT, IVF_FLAT and HNSW with the build
parameters `towhee-isc index --index-type` uses; 1,000 queries are searched for their 10 nearest
neighbours at several search widths (nprobe, ef). Two kinds of query:
- random unit vectors: the hardest case (in 256 dimensions all distances are nearly equal); recall@10 is
  the share of the exact top 10 that Milvus returns;
- copies: database vectors with noise (cosine about 0.8 to their original), the copy-detection case; the
  figure is the share whose original is Milvus's top 1.
`--server` runs a real Milvus 2.3.5 standalone server on 127.0.0.1 (tests/milvus_server.py, from PyPI's
`milvus` package); without it Milvus Lite (a temporary folder). Times include the client's own work.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from towhee_isc.workflow.milvus import MilvusIndex, close_milvus_lite, index_params, ivf_nlist

WIDTHS = {'FLAT': [None], 'IVF_FLAT': [16, 32, 64, 128, 256], 'HNSW': [32, 64, 128, 256, 512]}


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def exact_top(queries: np.ndarray, vectors: np.ndarray, k: int) -> np.ndarray:
    sim = queries @ vectors.T
    return np.argsort(-sim, axis=1)[:, :k]


def wait_indexed(index: MilvusIndex, timeout: float = 1800) -> None:
    """A server builds the index of each sealed segment in the background: wait until all rows are in it
    (searching before that would scan unindexed segments exactly and overstate the recall)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = index.client.describe_index(index.collection, index.client.list_indexes(index.collection)[0])
        if int(info.get('indexed_rows', 0)) >= int(info.get('total_rows', 1)) and info.get('state') == 'Finished':
            return
        time.sleep(1)
    raise TimeoutError('index not built in time')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--server', action='store_true', help='a real Milvus server instead of Milvus Lite')
    parser.add_argument('--n', type=int, default=100_000)
    parser.add_argument('--queries', type=int, default=1000)
    parser.add_argument('--types', nargs='+', default=['FLAT', 'IVF_FLAT', 'HNSW'])
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    vectors = unit(rng.standard_normal((args.n, 256)))
    ids = [f'R{i:07d}' for i in range(args.n)]
    random_queries = unit(rng.standard_normal((args.queries, 256)))
    originals = rng.choice(args.n, args.queries, replace=False)
    copies = unit(vectors[originals] + 0.048 * rng.standard_normal((args.queries, 256)))
    query_ids = [f'Q{i:05d}' for i in range(args.queries)]
    started = time.perf_counter()
    want = exact_top(random_queries, vectors, 10)
    exact_s = time.perf_counter() - started
    cosine = float(np.mean(np.sum(copies * vectors[originals], axis=1)))
    print(f'{args.n:,} vectors, {args.queries:,} queries; exact top 10 with numpy: {exact_s:.2f} s; '
          f'copies at mean cosine {cosine:.3f} to their originals')

    folder = Path(tempfile.mkdtemp(prefix='milvus_bench_'))
    server = None
    try:
        if args.server:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'tests'))
            from milvus_server import MilvusServerProcess
            server = MilvusServerProcess(folder / 'server')
            server.start()
            uri, token, where = server.uri, server.token, 'Milvus 2.3.5 standalone server'
        else:
            uri, token, where = str(folder / 'bench.db'), None, 'Milvus Lite'
        print(f'engine: {where}; IVF_FLAT nlist {ivf_nlist(args.n)}; HNSW {index_params("HNSW", args.n)}')
        print(f'| index | search width | build s | search s ({args.queries:,} queries) | recall@10, random queries | copies found at rank 1 |')
        print('| --- | ---: | ---: | ---: | ---: | ---: |')
        for index_type in args.types:
            index = MilvusIndex(uri, f'bench_{index_type.lower()}', token)
            started = time.perf_counter()
            index.add(ids, vectors, batch=2000, index_type=index_type)
            if server is not None:
                index.load()
                wait_indexed(index)
                # Until the query node takes over the sealed, indexed segments it serves the growing ones
                # with a temporary index of its own (fixed nprobe): reload to measure the index asked for.
                index.client.release_collection(index.collection)
                index.load()
            else:
                # Milvus Lite builds the index in a background thread that closing the database waits for
                # (as the end of `towhee-isc index` does); searching before that would scan exactly.
                index.close()
                index = MilvusIndex(uri, f'bench_{index_type.lower()}', token)
                index.load()
            build_s = time.perf_counter() - started
            for width in WIDTHS[index_type]:
                nprobe = width if index_type == 'IVF_FLAT' else None
                ef = width if index_type == 'HNSW' else None
                started = time.perf_counter()
                matches = index.search(query_ids, random_queries, 10, nprobe=nprobe, ef=ef)
                search_s = time.perf_counter() - started
                got: dict[str, set[str]] = {}
                for m in matches:
                    got.setdefault(m.query_id, set()).add(m.reference_id)
                recall = np.mean([len(got.get(q, set()) & {ids[j] for j in want[i]}) / 10
                                  for i, q in enumerate(query_ids)])
                top1 = {}
                for m in index.search(query_ids, copies, 1, nprobe=nprobe, ef=ef):
                    top1[m.query_id] = m.reference_id
                found = np.mean([top1.get(q) == ids[originals[i]] for i, q in enumerate(query_ids)])
                label = {'IVF_FLAT': f'nprobe {width}', 'HNSW': f'ef {width}'}.get(index_type, '')
                print(f'| {index_type} | {label} | {build_s:.1f} | {search_s:.2f} | {recall:.3f} | {found:.3f} |',
                      flush=True)
    finally:
        if server is not None:
            server.stop()
        else:  # Milvus Lite runs in this process: close it first, or it writes into the folder again at exit
            close_milvus_lite()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == '__main__':
    main()
