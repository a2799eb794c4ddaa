"""The VSC 2022 metrics (facebookresearch/vsc2022, ``vsc/metrics.py``), restated on plain arrays and
CSV files, with no pandas or scikit-learn:

- :func:`segment_ap`: the matching track's metric. Predictions are taken best first; after each
  group of equal scores, precision and recall are measured on both axes (query and reference
  seconds) as VCSL does — the length of the predicted intervals that lies on ground-truth intervals
  of the same video pair, where only ground-truth segments that some prediction overlaps (in both
  axes) count — and combined as ``P = sqrt(P_query * P_ref)``, ``R = sqrt(R_query * R_ref)``;
  ``AP = sum P(i) (R(i) - R(i-1))``.
- :func:`pairwise_micro_ap`: the matching track's second number, and the descriptor track's metric:
  micro-average precision over (query, reference) pairs, each scored by its best segment, ties taken
  together, recall counted against every true pair (what DrivenData's scorer computes).
- :func:`descriptor_candidates`: the descriptor track's candidate pairs from frame descriptors
  (``descriptor_eval.py``: the 1,200 x queries most similar frame pairs over all pairs, each video
  pair scored by its best frame pair, the 25 x queries best video pairs kept).

Unlike VSC's reader, ids need no ``Q``/``R`` prefix.
"""
from __future__ import annotations

import csv
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from ..csvfiles import read_csv
from ..workflow.metrics import safe_cell, unsafe_cell

MATCH_COLUMNS = ('query_id', 'ref_id', 'query_start', 'query_end', 'ref_start', 'ref_end', 'score')
RETRIEVED_PER_QUERY = 20 * 60    # descriptor track: frame pairs kept per query video (k=20 for ~60 s videos)
CANDIDATES_PER_QUERY = 25        # descriptor track: video pairs scored per query video


class CsvFormatError(ValueError):
    """A match or ground-truth CSV without VSC's columns and values."""


@dataclass(frozen=True)
class Segment:
    """One copied segment: seconds ``[query_start, query_end]`` of ``query_id`` copy
    ``[ref_start, ref_end]`` of ``ref_id``; ``score`` ranks predictions (1.0 in ground truth)."""

    query_id: str
    ref_id: str
    query_start: float
    query_end: float
    ref_start: float
    ref_end: float
    score: float = 1.0

    @property
    def pair(self) -> tuple[str, str]:
        return self.query_id, self.ref_id

    def overlaps(self, other: 'Segment') -> bool:
        """Whether the two boxes (query x reference seconds) share a positive area."""
        q = min(self.query_end, other.query_end) - max(self.query_start, other.query_start)
        r = min(self.ref_end, other.ref_end) - max(self.ref_start, other.ref_start)
        return max(q, 0.0) * max(r, 0.0) > 0.0


def read_segments(path: str | os.PathLike, ground_truth: bool = False) -> list[Segment]:
    """A VSC match CSV (columns in any order, a header naming them). Ground truth needs no ``score``."""
    path = str(path)
    needed = MATCH_COLUMNS[:-1] if ground_truth else MATCH_COLUMNS
    header, rows = read_csv(path, 'CSV file', CsvFormatError)
    missing = [c for c in needed if c not in header]
    if missing:
        raise CsvFormatError(f'{path!r} lacks the column(s) {",".join(missing)}; VSC match files have '
                             f'{",".join(needed)}')
    segments = []
    for line, row in enumerate(rows, start=2):
        values = {}
        for column in needed[2:]:
            try:
                values[column] = float(row.get(column))
            except (TypeError, ValueError):
                raise CsvFormatError(f'{path!r} line {line}: {column} {row.get(column)!r} is not a number') from None
            if not math.isfinite(values[column]):
                raise CsvFormatError(f'{path!r} line {line}: {column} {row.get(column)!r} is not finite')
        if not row.get('query_id') or not row.get('ref_id'):
            raise CsvFormatError(f'{path!r} line {line}: empty query_id or ref_id')
        if values['query_end'] < values['query_start'] or values['ref_end'] < values['ref_start']:
            raise CsvFormatError(f'{path!r} line {line}: a segment ends before it starts')
        segments.append(Segment(unsafe_cell(row['query_id']), unsafe_cell(row['ref_id']), **values))
    return segments


def write_segments(path: str | os.PathLike, segments: Iterable[Segment]) -> None:
    """VSC's match CSV, whole or not at all, in the order given (callers sort best first); ids a spreadsheet
    would take for formulas escaped as image CSVs escape them (``read_segments`` undoes it)."""
    from ..atomic import atomic_write
    with atomic_write(path) as tmp, open(tmp, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(MATCH_COLUMNS)
        for s in segments:
            writer.writerow([safe_cell(s.query_id), safe_cell(s.ref_id), *(repr(float(v)) for v in  # float: numpy's repr names its type
                             (s.query_start, s.query_end, s.ref_start, s.ref_end, s.score))])


def union_length(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length covered by intervals (overlapping or touching ones merged)."""
    total, start, end = 0.0, None, None
    for s, e in sorted(intervals):
        if start is not None and s <= end:
            end = max(end, e)
            continue
        if start is not None:
            total += end - start
        start, end = s, e
    return total if start is None else total + (end - start)


def _intersection(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """|A n B| = |A| + |B| - |A u B| for two sets of intervals (each merged first)."""
    return union_length(a) + union_length(b) - union_length(a + b)


_AXES = (('query_start', 'query_end'), ('ref_start', 'ref_end'))


def _intervals(segments: Iterable[Segment], axis: int) -> list[tuple[float, float]]:
    start, end = _AXES[axis]
    return [(getattr(s, start), getattr(s, end)) for s in segments]


class _Pair:
    """One video pair's ground truth and the predictions taken so far."""

    def __init__(self):
        self.truth: list[Segment] = []
        self.predicted: list[Segment] = []
        self.found: list[bool] = []          # per ground-truth segment: overlapped by some prediction
        self.intersection = [0.0, 0.0]
        self.length = [0.0, 0.0]

    def add(self, prediction: Segment) -> tuple[list[float], list[float]]:
        """Take one more prediction; return how much the intersection and predicted length grew."""
        self.predicted.append(prediction)
        self.found = [f or t.overlaps(prediction) for f, t in zip(self.found, self.truth)]
        counted = [t for t, f in zip(self.truth, self.found) if f]
        grown_intersection, grown_length = [0.0, 0.0], [0.0, 0.0]
        for axis in (0, 1):
            predicted = _intervals(self.predicted, axis)
            intersection = _intersection(predicted, _intervals(counted, axis))
            length = union_length(predicted)
            grown_intersection[axis] = intersection - self.intersection[axis]
            grown_length[axis] = length - self.length[axis]
            self.intersection[axis], self.length[axis] = intersection, length
        return grown_intersection, grown_length


@dataclass(frozen=True)
class PrecisionRecall:
    """The curve's points, one per score at which recall grew: precision, recall and that score."""

    precision: np.ndarray
    recall: np.ndarray
    score: np.ndarray


def segment_ap(truth: Sequence[Segment], predictions: Sequence[Segment]) -> tuple[float, PrecisionRecall]:
    """VSC's matching-track segment AP of ``predictions`` against ``truth`` (see the module)."""
    pairs: dict[tuple[str, str], _Pair] = defaultdict(_Pair)
    for t in truth:
        pairs[t.pair].truth.append(t)
        pairs[t.pair].found.append(False)
    truth_length = [sum(union_length(_intervals(p.truth, axis)) for p in pairs.values()) for axis in (0, 1)]
    if min(truth_length) <= 0:
        raise ValueError('the ground truth has no segment of positive length: segment AP is undefined')
    intersection, length = [0.0, 0.0], [0.0, 0.0]
    ap = recall = 0.0
    curve: list[tuple[float, float, float]] = []
    ordered = sorted(predictions, key=lambda s: s.score, reverse=True)
    i = 0
    while i < len(ordered):
        score = ordered[i].score
        while i < len(ordered) and ordered[i].score == score:  # equal scores count as one step
            grown_intersection, grown_length = pairs[ordered[i].pair].add(ordered[i])
            for axis in (0, 1):
                intersection[axis] += grown_intersection[axis]
                length[axis] += grown_length[axis]
            i += 1
        # nothing predicted yet (only zero-length segments) has no precision; VSC divides by zero there
        precision = math.sqrt(math.prod(intersection[a] / length[a] if length[a] else 0.0 for a in (0, 1)))
        new_recall = math.sqrt((intersection[0] / truth_length[0]) * (intersection[1] / truth_length[1]))
        ap += precision * (new_recall - recall)
        if new_recall > recall:
            curve.append((precision, new_recall, score))
        recall = new_recall
    points = np.array(curve, dtype=np.float64).reshape(-1, 3)
    return ap, PrecisionRecall(points[:, 0], points[:, 1], points[:, 2])


def pair_scores(segments: Iterable[Segment]) -> dict[tuple[str, str], float]:
    """Each video pair's score: its best segment's, and never below 0, as VSC turns matches into candidate
    pairs (``CandidatePair.from_matches`` starts every pair at 0.0): pairs whose segments all score below
    0 tie at 0, which changes the micro AP when such a pair is a true copy."""
    best: dict[tuple[str, str], float] = {}
    for s in segments:
        best[s.pair] = max(s.score, best.get(s.pair, 0.0))
    return best


def pairwise_micro_ap(truth_pairs: Iterable[tuple[str, str]], predicted: dict[tuple[str, str], float]) -> float:
    """Micro-average precision of scored pairs: ``sum over distinct scores s (best first) of
    precision(score >= s) x (true pairs newly found at s) / (all true pairs)``."""
    truth_pairs = set(truth_pairs)
    if not truth_pairs:
        raise ValueError('the ground truth has no pairs: average precision is undefined')
    scores = np.array(list(predicted.values()), dtype=np.float64)
    if not np.isfinite(scores).all():
        raise ValueError('pair scores must be finite')
    correct = np.array([pair in truth_pairs for pair in predicted], dtype=np.float64)
    order = np.argsort(-scores, kind='stable')
    scores, correct = scores[order], correct[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1] if len(scores) else np.array([], int)
    hits = np.cumsum(correct)[last_of_tie]
    precision = hits / (last_of_tie + 1)
    found = np.diff(np.r_[0.0, hits])
    return float(np.sum(precision * found) / len(truth_pairs))


def evaluate_matching(truth: Sequence[Segment], predictions: Sequence[Segment]) -> dict:
    """Both matching-track numbers, as ``matching_eval.py`` and ``evaluate_matching_track`` give them."""
    ap, _ = segment_ap(truth, predictions)
    return {'segment_ap': ap,
            'pairwise_micro_ap': pairwise_micro_ap(pair_scores(truth), pair_scores(predictions)),
            'predictions': len(predictions), 'ground_truth_segments': len(truth),
            'ground_truth_pairs': len(pair_scores(truth))}


def descriptor_candidates(query_ids: Sequence[str], queries: np.ndarray, ref_ids: Sequence[str],
                          refs: np.ndarray, retrieved_per_query: int = RETRIEVED_PER_QUERY,
                          candidates_per_query: int = CANDIDATES_PER_QUERY, block: int = 2048
                          ) -> dict[tuple[str, str], float]:
    """The descriptor track's candidate pairs, as ``descriptor_eval.py`` makes them.

    Args:
        query_ids, ref_ids: each frame's video id (frames of one video contiguous).
        queries, refs: frame descriptors, float32 (Nq, D) and (Nr, D); inner product is the similarity.

    The ``retrieved_per_query x videos`` most similar (query frame, reference frame) pairs of all are
    kept; each video pair among them gets its best frame similarity, and the ``candidates_per_query x
    videos`` best video pairs are returned ({(query, reference): score}). Only a block of query frames
    is compared with all references at a time.
    """
    q_videos, q_starts = _runs(query_ids)
    r_videos, r_starts = _runs(ref_ids)
    keep = int(retrieved_per_query * len(q_videos))
    best = np.full((len(q_videos), len(r_videos)), -np.inf, np.float32)  # best frame pair per video pair
    kept = np.empty(0, np.float32)  # the `keep` largest similarities so far
    q_of_frame = np.repeat(np.arange(len(q_videos)), np.diff(np.r_[q_starts, len(query_ids)]))
    for start in range(0, len(queries), block):
        sims = queries[start:start + block] @ refs.T
        per_ref = np.maximum.reduceat(sims, r_starts, axis=1)       # (block, reference videos)
        rows = q_of_frame[start:start + block]
        np.maximum.at(best, rows, per_ref)
        floor = kept.min() if len(kept) >= keep else -np.inf
        values = np.concatenate([kept, sims[sims >= floor].ravel()])
        kept = values if len(values) <= keep else np.partition(values, len(values) - keep)[-keep:]
    threshold = kept.min() if len(kept) >= keep else -np.inf  # the global k-th frame similarity
    qi, ri = np.nonzero(best >= threshold)
    scores = best[qi, ri]
    order = np.argsort(-scores, kind='stable')[:int(candidates_per_query * len(q_videos))]
    return {(q_videos[qi[o]], r_videos[ri[o]]): float(scores[o]) for o in order}


def _runs(ids: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Video ids in order and the index where each one's contiguous frames start."""
    ids = np.asarray(ids)
    if not len(ids):
        raise ValueError('no frames')
    starts = np.r_[0, np.flatnonzero(ids[1:] != ids[:-1]) + 1]
    videos = [str(v) for v in ids[starts]]
    if len(set(videos)) != len(videos):
        raise ValueError('the frames of one video must be contiguous (a video id appears in two places)')
    return videos, starts


def evaluate_files(matches: str, ground_truth: str, descriptors: Sequence[str] | None = None) -> dict:
    """``video evaluate``: the matching-track numbers of a match CSV, and with ``descriptors``
    (query and reference npz) the descriptor track's micro-AP."""
    truth = read_segments(ground_truth, ground_truth=True)
    result = evaluate_matching(truth, read_segments(matches))
    if descriptors:
        from .storage import check_same_source, frame_norms, read_video_descriptors
        queries = read_video_descriptors(descriptors[0])
        refs = read_video_descriptors(descriptors[1], dim=queries.videos[0].features.shape[1])
        check_same_source({descriptors[0]: queries, descriptors[1]: refs})
        q_ids = np.concatenate([np.full(len(v), v.video_id) for v in queries.videos])
        r_ids = np.concatenate([np.full(len(v), v.video_id) for v in refs.videos])
        q = np.concatenate([v.features for v in queries.videos])
        r = np.concatenate([v.features for v in refs.videos])
        # the products are taken as given, as VSC does, in float32: norms far from 1 overflow or vanish there
        norms = [frame_norms(x) for x in (q, r)]
        low, high = ([float(f(n[n > 0])) if (n > 0).any() else 1.0 for n in norms] for f in (np.min, np.max))
        if high[0] * high[1] > float(np.finfo(np.float32).max) or low[0] * low[1] < float(np.finfo(np.float32).tiny):
            raise ValueError(f'{descriptors[0]!r} and {descriptors[1]!r} hold vectors of norms {low[0]:.3g} to '
                             f'{high[0]:.3g} and {low[1]:.3g} to {high[1]:.3g}: their inner products overflow or '
                             "vanish in float32, in which VSC's descriptor_eval.py scores them")
        result['descriptor_micro_ap'] = pairwise_micro_ap(pair_scores(truth), descriptor_candidates(q_ids, q, r_ids, r))
    return result
