"""Finding copies: search between descriptor sets (engines in ``engines``), score normalisation, near-duplicate groups.
(Milvus is in ``milvus``; what people read of the results, in ``reports``.)"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np

from .engines import Engine, Exact, choose_engine
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
    offset (score normalisation), kept if at least ``threshold``; best first within each query.
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
            if j >= 0 and (threshold is None or score >= threshold):
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


def duplicate_groups(ids: Sequence[str], pairs: Iterable[tuple[int, int, float]],
                     paths: Sequence[str | None] | None = None) -> list[DuplicateGroup]:
    """Connected components of the near-duplicate ``pairs`` (indices into ``ids``), each with a
    suggested copy to keep: the largest resolution, then the largest file (needs ``paths``)."""
    parent = list(range(len(ids)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j, _ in pairs:
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    members: dict[int, list[int]] = {}
    for i in range(len(ids)):
        members.setdefault(root(i), []).append(i)
    groups = []
    for group in members.values():
        if len(group) > 1:
            best = max(group, key=lambda i: _keep_rank(paths[i] if paths else None))
            groups.append(DuplicateGroup([ids[i] for i in group], ids[best]))
    return sorted(groups, key=lambda g: (-len(g.members), g.members[0]))


def _keep_rank(path: str | None) -> tuple[int, int]:
    if path is None or not os.path.isfile(path):
        return (0, 0)
    from PIL import Image
    try:
        with Image.open(path) as image:
            pixels = image.width * image.height
    except OSError:
        pixels = 0
    return (pixels, os.path.getsize(path))
