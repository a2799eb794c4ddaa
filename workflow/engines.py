"""Search engines behind one small interface, the way faiss's ``index_factory`` hides an index behind
one string. Callers ask for what they need:

- ``engine.nearest(queries, references, k)``: each query's k nearest references, best first;
- ``engine.pairs(vectors, threshold)``: every pair within one set at or above a similarity;

and :func:`choose_engine` is the one place that picks exact search (small jobs) or an approximate
inverted-file index (large ones). ``engine.description`` says which, for the commands to print.

Vectors are float32 N x D and L2-normalised, so the inner product is the cosine. Neither engine ever
holds an N x N matrix: exact search goes through faiss's blocked flat search and exact pairs through
bounded tiles, the approximate one compares each vector with a few cells of the collection only.
``engine.pair_blocks`` gives the pairs a bounded block at a time, for grouping without holding them all.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np

from ..progress import Progress

# Above this many comparisons (queries x references; N x N for dedup) the approximate index is used.
# Measured on 2 cores: exact dedup of 50,000 took 6.2 s (so ~25 s at 100,000, ~40 min at 1,000,000);
# the approximate one took 17-28 s for 200,000 on the same, busy, machine. Up to 100,000, exactness is
# worth its seconds.
EXACT_UP_TO = 100_000 ** 2

BLOCK = 4096  # query rows per exact search: faiss keeps one block's results at a time; the progress line moves
# Pairs within one set are found a tile of TILE x TILE_COLUMNS similarities at a time (16 MB of float32, and
# at most 4 million pairs held at once even when every vector is a copy of every other).
TILE, TILE_COLUMNS = 512, 8192

# A score is a float32 sum of D products: a unit vector's product with itself or with a byte-identical copy
# comes out up to a few 1e-6 below 1.0 (216 of 400 identical pairs did at 256-d). A score this close to a
# threshold meets it, wherever thresholds apply, so that a threshold of 1.0 finds byte-identical copies.
ROUNDING = 1e-5


def meets(scores: np.ndarray | float, threshold: float) -> np.ndarray | bool:
    """Whether ``scores`` are at or above ``threshold``, within float32 rounding (``ROUNDING``)."""
    return scores >= threshold - ROUNDING


class Engine(Protocol):
    """What a search engine offers; see :class:`Exact` and :class:`Ivf`."""

    description: str

    def nearest(self, queries: np.ndarray, references: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices int64 Q x k', scores float32 Q x k'), k' = min(k, R), each row best first; an
        approximate engine may leave a row short, padded with index -1 and score -inf."""

    def pairs(self, vectors: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(i int64, j int64, similarity float32) for every pair i < j whose similarity meets ``threshold``
        (within float32 rounding: :func:`meets`)."""

    def pair_blocks(self, vectors: np.ndarray, threshold: float) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The same pairs as :meth:`pairs`, a bounded block at a time (a pair may come twice): what
        grouping uses, never holding all pairs at once. Long searches draw a progress line."""


def choose_engine(queries: int, references: int, exact: bool = False, exact_up_to: int = EXACT_UP_TO) -> Engine:
    """Exact search if ``exact`` or if ``queries`` x ``references`` comparisons are few (at most
    ``exact_up_to``), else an IVF index sized for ``references`` vectors."""
    if exact or queries * references <= exact_up_to or references < 2:
        return Exact()
    return Ivf.for_size(references)


@dataclass(frozen=True)
class Exact:
    """Every query against every reference (faiss's flat inner-product search: BLAS, in blocks)."""

    description: str = 'exact (faiss flat inner product)'

    def nearest(self, queries: np.ndarray, references: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        faiss = _faiss()
        queries, references = _checked(queries, references)
        k = _check_k(k, len(references))
        indices = np.empty((len(queries), k), np.int64)
        scores = np.empty((len(queries), k), np.float32)
        with Progress(len(queries), 'searching (exact)', unit='query') as progress:
            for start in range(0, len(queries), BLOCK):
                block = slice(start, start + BLOCK)
                scores[block], indices[block] = faiss.knn(queries[block], references, k,
                                                          metric=faiss.METRIC_INNER_PRODUCT)
                progress.advance(len(queries[block]))
        return indices, scores

    def pairs(self, vectors: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return _joined(list(self.pair_blocks(vectors, threshold)))

    def pair_blocks(self, vectors: np.ndarray, threshold: float) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """:meth:`pairs` a tile at a time: each tile of the upper triangle is one matrix product of
        ``TILE`` vectors by ``TILE_COLUMNS``, so memory is bounded however many pairs there are (25,000
        near-identical vectors are 312 million pairs)."""
        vectors, _ = _checked(vectors, vectors)
        threshold = _check_threshold(threshold)
        n = len(vectors)
        with Progress(n, 'finding pairs (exact)', unit='vector') as progress:
            for start in range(0, n, TILE):
                rows = vectors[start:start + TILE]
                for first in range(start, n, TILE_COLUMNS):
                    sims = rows @ vectors[first:first + TILE_COLUMNS].T
                    r, c = np.nonzero(meets(sims, threshold))
                    keep = r + start < c + first
                    r, c = r[keep], c[keep]
                    yield r + start, c + first, sims[r, c]
                progress.advance(len(rows))


@dataclass(frozen=True)
class Ivf:
    """Approximate: the references are split into ``nlist`` cells (spherical k-means, faiss) and each
    query is compared with the members of its ``nprobe`` nearest cells only; for pairs within one set,
    each vector with those of its ``pair_nprobe`` nearest (fewer: a pair is looked for from both sides)."""

    nlist: int
    nprobe: int
    pair_nprobe: int
    seed: int = 1234  # k-means sample and start: the same input gives the same cells, hence results

    @classmethod
    def for_size(cls, n: int) -> 'Ivf':
        """nlist ~ 4 sqrt(n), with enough vectors per cell to train (faiss wants 39). The cells searched
        were measured on random 256-d vectors with planted copies at cosine 0.85-0.95 (the hardest case:
        real descriptors cluster): 2 sqrt(nlist) finds >= 99.2 % of the copies' originals, 0.8 sqrt(nlist)
        per vector >= 99.4 % of the pairs, for n from 20,000 to 1,000,000 (README)."""
        nlist = max(1, min(round(4 * math.sqrt(n)), n // 40))
        return cls(nlist, min(nlist, math.ceil(2 * math.sqrt(nlist))), min(nlist, math.ceil(0.8 * math.sqrt(nlist))))

    @property
    def description(self) -> str:
        return (f'approximate (faiss IVF, {self.nlist} cells: {self.nprobe} searched per query, '
                f'{self.pair_nprobe} per vector for pairs)')

    def _centroids(self, vectors: np.ndarray):
        """A flat inner-product index over the cell centres."""
        faiss = _faiss()
        if len(vectors) < self.nlist:
            raise ValueError(f'{len(vectors)} vectors cannot fill {self.nlist} cells: use fewer cells or exact search')
        kmeans = faiss.Kmeans(vectors.shape[1], self.nlist, niter=10, spherical=True, seed=self.seed,
                              max_points_per_centroid=40, verbose=False)  # trains on a sample of 40 per cell
        with Progress(None, f'clustering into {self.nlist} cells', unit='step'):  # one faiss call: time only
            kmeans.train(vectors)
        return kmeans.index

    def nearest(self, queries: np.ndarray, references: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries, references = _checked(queries, references)
        k = _check_k(k, len(references))
        indices = np.full((len(queries), k), -1, np.int64)  # the best k so far, in no order
        scores = np.full((len(queries), k), -np.inf, np.float32)
        for asking, inside, sims in self._join(queries, references, same=False):
            merged = np.concatenate([scores[asking], sims], axis=1)
            candidates = np.concatenate([indices[asking], np.broadcast_to(inside, sims.shape)], axis=1)
            top = np.argpartition(-merged, k - 1, axis=1)[:, :k]
            scores[asking] = np.take_along_axis(merged, top, axis=1)  # a query asks a cell once: rows unique
            indices[asking] = np.take_along_axis(candidates, top, axis=1)
        order = np.argsort(-scores, axis=1, kind='stable')
        return np.take_along_axis(indices, order, axis=1), np.take_along_axis(scores, order, axis=1)

    def pairs(self, vectors: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        i, j, s = _joined(list(self.pair_blocks(vectors, threshold)))
        # a pair is seen from both sides when each vector searches the other's cell: keep it once
        keep = i < j
        _, first = np.unique(i[keep] * len(vectors) + j[keep], return_index=True)
        return i[keep][first], j[keep][first], s[keep][first]

    def pair_blocks(self, vectors: np.ndarray, threshold: float) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        vectors, _ = _checked(vectors, vectors)
        threshold = _check_threshold(threshold)
        for asking, inside, sims in self._join(vectors, vectors, same=True):
            rows, cols = np.nonzero(meets(sims, threshold))
            i, j = asking[rows], inside[cols]
            keep = i != j
            yield np.minimum(i, j)[keep], np.maximum(i, j)[keep], sims[rows, cols][keep]

    def _join(self, queries: np.ndarray, references: np.ndarray, same: bool) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """For each cell: (the queries that search it, its references, their similarities float32).

        One matrix product per cell (BLAS) rather than faiss's IndexIVFFlat, which scans a cell vector
        by vector and holds a copy of the references: all pairs at 0.8 among 200,000, 32 of 1,788 cells
        searched, took 28 s this way against 49 s with IndexIVFFlat.range_search here, and no copy.
        ``same``: the queries are the references (dedup), whose nearest cell is then known already.
        A crowded cell's product is made in slices of at most TILE x TILE_COLUMNS similarities.
        """
        centroids = self._centroids(references)
        nprobe = self.pair_nprobe if same else self.nprobe
        probes = _nearest_cells(centroids, queries, nprobe)  # Q x nprobe int32, nearest first
        homes = probes[:, 0] if same else _nearest_cells(centroids, references, 1)[:, 0]
        members = _by_cell(homes, self.nlist)
        askers = _by_cell(probes.ravel(), self.nlist)
        del probes, homes
        with Progress(self.nlist, 'finding pairs (IVF)' if same else 'searching (IVF)', unit='cell') as progress:
            for cell in range(self.nlist):
                inside, asking = members[cell], askers[cell] // nprobe
                step = max(1, TILE * TILE_COLUMNS // max(1, len(inside)))
                for part in range(0, len(asking) if len(inside) else 0, step):
                    some = asking[part:part + step]
                    yield some, inside, queries[some] @ references[inside].T
                progress.advance()


def _nearest_cells(centroids, vectors: np.ndarray, nprobe: int, block: int = 65_536) -> np.ndarray:
    """Each vector's ``nprobe`` nearest cells, nearest first (int32 N x nprobe), block by block."""
    cells = np.empty((len(vectors), nprobe), np.int32)
    for start in range(0, len(vectors), block):
        cells[start:start + block] = centroids.search(vectors[start:start + block], nprobe)[1]
    return cells


def _by_cell(cells: np.ndarray, nlist: int) -> list[np.ndarray]:
    """For each cell, the positions in ``cells`` (int64) that name it."""
    order = np.argsort(cells, kind='stable')
    bounds = np.searchsorted(cells[order], np.arange(nlist + 1))
    return [order[bounds[c]:bounds[c + 1]] for c in range(nlist)]


def _joined(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (i int64, j int64, similarity float32) parts as three arrays."""
    types = (np.int64, np.int64, np.float32)
    return tuple(np.concatenate([np.zeros(0, t)] + [p[n] for p in parts]).astype(t) for n, t in enumerate(types))


def _faiss():
    try:
        import faiss
    except ImportError as e:
        raise ImportError('search and dedup need faiss: pip install faiss-cpu (or towhee-isc[workflow])') from e
    return faiss


def _checked(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32, C-ordered 2-d arrays of the same width (what faiss takes)."""
    a, b = (np.ascontiguousarray(x, dtype=np.float32) for x in (a, b))
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f'descriptors must be N x D arrays, got shapes {a.shape} and {b.shape}')
    if a.shape[1] != b.shape[1]:
        raise ValueError(f'descriptor sizes differ: {a.shape[1]} vs {b.shape[1]}')
    return a, b


def _check_k(k: int, references: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise ValueError(f'k (matches per query) must be a positive integer, got {k!r}')
    if references == 0:
        raise ValueError('there are no references to search')
    return min(int(k), references)


def _check_threshold(threshold: float) -> float:
    if not isinstance(threshold, (int, float, np.floating)) or not math.isfinite(threshold):
        raise ValueError(f'the similarity threshold must be a finite number, got {threshold!r}')
    return float(threshold)
