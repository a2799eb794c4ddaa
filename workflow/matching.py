"""Finding copies: search between descriptor sets (engines in ``engines``), score normalisation, near-duplicate groups.
(Milvus is in ``milvus``; what people read of the results, in ``reports``.)"""
from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from .engines import Engine, Exact, choose_engine, meets
from .metrics import Match

def nth_neighbour_similarity(queries: np.ndarray, background: np.ndarray, nth: int,
                             engine: Engine | None = None) -> np.ndarray:
    """Each query's similarity to its n-th nearest background descriptor (1-based), float32 Q."""
    if isinstance(nth, bool) or not isinstance(nth, (int, np.integer)) or not 1 <= nth <= len(background):
        raise ValueError(f'--nth must be between 1 and the {len(background)} background descriptors, got {nth}')
    engine = engine or choose_engine(len(queries), len(background))
    nth_scores = engine.nearest(queries, background, nth)[1][:, nth - 1]
    short = ~np.isfinite(nth_scores)  # an approximate engine found fewer than nth: look again, exactly
    if short.any():
        nth_scores[short] = Exact().nearest(queries[short], background, nth)[1][:, nth - 1]
    return nth_scores


def search(query_ids: Sequence[str], queries: np.ndarray, reference_ids: Sequence[str],
           references: np.ndarray, k: int, threshold: float | None = None,
           offsets: np.ndarray | None = None, engine: Engine | None = None) -> list[Match]:
    """Each query's k best references by inner product (cosine for unit vectors), minus the query's
    offset (score normalisation), kept if at least ``threshold`` (within float32 rounding); best first within each query.
    ``engine`` defaults to the one :func:`choose_engine` picks for the sizes."""
    _check_dims(queries, references)
    if threshold is not None and not math.isfinite(threshold):
        raise ValueError(f'--threshold must be a finite number, got {threshold}')
    engine = engine or choose_engine(len(queries), len(references))
    indices, scores = engine.nearest(queries, references, k)
    if offsets is not None:
        scores = scores - offsets[:, None]
    matches = []
    for row in range(len(indices)):
        for j, score in zip(indices[row], scores[row]):
            if j >= 0 and (threshold is None or meets(score, threshold)):
                matches.append(Match(query_ids[row], reference_ids[j], float(score)))
    return matches


def search_exact(query_ids: Sequence[str], queries: np.ndarray, reference_ids: Sequence[str],
                 references: np.ndarray, k: int, threshold: float | None = None,
                 offsets: np.ndarray | None = None) -> list[Match]:
    """:func:`search` with exact search whatever the sizes."""
    return search(query_ids, queries, reference_ids, references, k, threshold, offsets, Exact())


def _check_dims(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f'descriptor sizes differ: {a.shape[1]} vs {b.shape[1]}')


@dataclass
class DuplicateGroup:
    members: list[str]
    keep: str


def near_duplicate_pairs(vectors: np.ndarray, threshold: float,
                         engine: Engine | None = None) -> Iterator[tuple[int, int, float]]:
    """(i, j, similarity) for i < j at or above ``threshold``. ``engine`` defaults to the one
    :func:`choose_engine` picks for the size; none builds the N x N matrix."""
    engine = engine or choose_engine(len(vectors), len(vectors))
    for i, j, similarity in zip(*engine.pairs(vectors, threshold)):
        yield int(i), int(j), float(similarity)


def near_duplicate_groups(ids: Sequence[str], vectors: np.ndarray, threshold: float, engine: Engine | None = None,
                          paths: Sequence[str | None] | None = None) -> list[DuplicateGroup]:
    """:func:`duplicate_groups` of the pairs at or above ``threshold``, joined a block of pairs at a time:
    memory stays bounded however large a group of near-duplicates is (25,000 copies of one image are
    312 million pairs)."""
    engine = engine or choose_engine(len(vectors), len(vectors))
    components = Components(len(ids))
    for i, j, _ in engine.pair_blocks(vectors, threshold):
        components.join(i, j)
    return components.groups(ids, paths)


def duplicate_groups(ids: Sequence[str], pairs: Iterable[tuple[int, int, float]],
                     paths: Sequence[str | None] | None = None, batch: int = 100_000) -> list[DuplicateGroup]:
    """Connected components of the near-duplicate ``pairs`` (indices into ``ids``), each with a
    suggested copy to keep: the largest resolution, then the largest file (needs ``paths``). The pairs
    are read ``batch`` at a time, never all held."""
    components, pairs = Components(len(ids)), iter(pairs)
    while chunk := list(itertools.islice(pairs, batch)):
        i, j, _ = zip(*chunk)
        components.join(np.asarray(i, np.int64), np.asarray(j, np.int64))
    return components.groups(ids, paths)


class Components:
    """Union-find over ``n`` items, joined by whole arrays of pairs at a time (numpy, not a Python loop per
    pair): each item points to a smaller one, and a root to itself."""

    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)

    def roots(self, items: np.ndarray) -> np.ndarray:
        r = self.parent[items]
        while True:
            up = self.parent[r]
            if np.array_equal(up, r):
                return r
            r = up

    def join(self, i: np.ndarray, j: np.ndarray) -> None:
        """Put ``i[k]`` and ``j[k]`` in one component, for every k (int64 arrays of equal length)."""
        given = i, j
        while len(i):
            a, b = self.roots(i), self.roots(j)
            apart = a != b
            lo, hi = np.minimum(a[apart], b[apart]), np.maximum(a[apart], b[apart])
            np.minimum.at(self.parent, hi, lo)  # each root offered several smaller ones takes the smallest...
            i, j = lo, hi  # ...and the pairs whose roots are still apart go round again
        for items in given:  # short paths for the next join, which often asks about the same items
            self.parent[items] = self.roots(items)

    def groups(self, ids: Sequence[str], paths: Sequence[str | None] | None = None) -> list[DuplicateGroup]:
        """The components of more than one item, largest first, each with its suggested copy to keep."""
        roots = self.roots(np.arange(len(ids)))
        order = np.argsort(roots, kind='stable')
        starts = np.flatnonzero(np.diff(roots[order], prepend=-1))
        groups = []
        for group in np.split(order, starts[1:]):
            if len(group) > 1:
                best = max(group.tolist(), key=lambda i: _keep_rank(paths[i] if paths else None))
                groups.append(DuplicateGroup([ids[i] for i in group.tolist()], ids[best]))
        return sorted(groups, key=lambda g: (-len(g.members), g.members[0]))


def _keep_rank(path: str | None) -> tuple[int, int]:
    """(pixels, bytes) of the file at ``path``, the larger the better to keep; (0, bytes) for a file that is no
    usable image (read from its header through ``image_size``, as embedding would check it)."""
    if path is None or not os.path.isfile(path):
        return (0, 0)
    from ..images import ImageError, image_size
    try:
        width, height = image_size(Path(path), path)
        pixels = width * height
    except (ImageError, OSError):  # not an image, or one refused (damaged, crafted, over the pixel limit): last
        pixels = 0
    return (pixels, os.path.getsize(path))
