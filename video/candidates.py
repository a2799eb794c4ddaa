"""Candidates: which (query video, reference video) pairs are worth aligning, from frame-level
nearest neighbours found by the image workflow's engines (exact, or approximate at scale).

Each query frame's ``k`` nearest reference frames vote for their videos; a pair's score is its best
frame similarity (VSC's ``MaxScoreAggregation``), and each query keeps its best ``per_query`` pairs.
Only the k-NN results (query frames x k) are held, never a frame x frame matrix of all pairs.

``dp`` searches them in the space it aligns frames in (``localization.search_space``: less the mean, whitened),
not by the stored vectors' cosine, where a few directions shared by all frames decide the nearest: on
benchmarks/video.py's seeds 0-19 a query's first candidate was the reference it copies for 89 of 100 copies
whitened against 75 (its first 3: 99 against 92), and fresh seed 18's copy had never been a candidate at all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .storage import VideoSet


@dataclass(frozen=True)
class Candidate:
    query: int      # index of the query video in its VideoSet
    ref: int        # index of the reference video
    score: float    # best (score-normalised) frame similarity between them


def noise_offsets(queries: np.ndarray, noise: np.ndarray, engine, factor: float = 1.0) -> np.ndarray:
    """Score normalisation (VSC's baseline, as in ISC 2021): each query frame's similarity to its
    nearest frame of an unrelated "noise" set, times ``factor``, to subtract from its similarities."""
    _, scores = engine.nearest(queries, noise, 1)
    return factor * scores[:, 0].astype(np.float64)


def frame_candidates(queries: VideoSet, refs: VideoSet, engine, k: int = 10, per_query: int = 10,
                     offsets: np.ndarray | None = None, min_score: float = -np.inf,
                     space: Callable[[np.ndarray], np.ndarray] | None = None) -> list[Candidate]:
    """Candidate pairs, best first within each query (see the module docstring).

    ``offsets``: per query frame, subtracted from its similarities (:func:`noise_offsets`). ``space``: where
    frames are compared (``localization.FrameSpace``: (N, D) -> (N, D) unit rows); None: as stored.
    """
    q_features, q_video, _ = queries.frames()
    r_features, r_video, _ = refs.frames()
    if space is not None:  # frames() made these arrays: no one else holds them
        q_features, r_features = within(space, q_features), within(space, r_features)
    indices, scores = engine.nearest(q_features, r_features, k)
    scores = scores.astype(np.float64)
    if offsets is not None:
        scores = scores - offsets[:, None]
    found = indices >= 0  # an approximate engine may leave a row short
    return vote(np.repeat(q_video, indices.shape[1])[found.ravel()], r_video[indices[found]], scores[found],
                per_query, min_score)


def within(space: Callable[[np.ndarray], np.ndarray], features: np.ndarray, rows: int = 2**16) -> np.ndarray:
    """``features`` (N, D) float32 taken into ``space`` in place, ``rows`` at a time (the space works in float64:
    600,000 reference frames at once would be 1.2 GB more, and a copy of them 0.6 GB). Returns ``features``."""
    for a in range(0, len(features), rows):
        features[a:a + rows] = space(features[a:a + rows])
    return features


def vote(pair_q: np.ndarray, pair_r: np.ndarray, pair_s: np.ndarray, per_query: int = 10,
         min_score: float = -np.inf) -> list[Candidate]:
    """Candidate pairs from frame matches: match n is query video ``pair_q[n]``'s frame against
    reference video ``pair_r[n]``'s (int arrays) at similarity ``pair_s[n]``. A pair scores its best
    match; each query keeps its ``per_query`` best pairs, best first within each query."""
    best: dict[tuple[int, int], float] = {}
    order = np.argsort(-np.asarray(pair_s), kind='stable')
    for q, r, s in zip(np.asarray(pair_q)[order].tolist(), np.asarray(pair_r)[order].tolist(),
                       np.asarray(pair_s, dtype=np.float64)[order].tolist()):
        if (q, r) not in best:
            best[q, r] = s
    per: dict[int, list[Candidate]] = {}
    for (q, r), s in best.items():  # already best first
        chosen = per.setdefault(q, [])
        if len(chosen) < per_query and s >= min_score:
            chosen.append(Candidate(q, r, s))
    return [c for q in sorted(per) for c in per[q]]
