"""Localization: candidate pairs -> copied segments in seconds, scored for ranking across pairs.

Each candidate pair's frame-similarity matrix (query frames x reference frames, less the query
frames' score-normalisation offsets) is made, aligned (``alignment``) and dropped: only one query's
candidate matrices are held at a time, never those of all pairs.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from .alignment import Box, dp_alignment, temporal_network
from .candidates import Candidate
from .metrics import Segment
from .storage import VideoSet

ALIGNMENTS = ('dp', 'tn')
# VSC 2022's baseline settings of VCSL's Temporal Network (vsc/baseline/sscd_baseline.py).
VSC_TN = dict(max_step=5, min_length=4, top_k=5, max_path=10, min_sim=0.2, max_iou=0.3)


def align(sims: np.ndarray, method: str = 'dp', threshold: float = 0.6) -> list[tuple[Box, float]]:
    """Boxes of one pair with their scores: the sum of ``sims - threshold`` along each box's path (what
    the DP maximises). It ranks long, clear copies above short or faint ones across all pairs; the
    mean similarity alone ranked short chance matches first (segment AP 0.57 against 0.89 on the
    benchmark's seed 0)."""
    if method == 'tn':
        boxes = temporal_network(sims, **VSC_TN)
    elif method == 'dp':
        boxes = dp_alignment(sims, threshold=threshold)
    else:
        raise ValueError(f'unknown alignment {method!r}: choose one of {", ".join(ALIGNMENTS)}')
    return [(box, float((sims[box.path[:, 0], box.path[:, 1]] - threshold).sum())) for box in boxes]


def localize(queries: VideoSet, refs: VideoSet, candidates: Iterable[Candidate], method: str = 'dp',
             threshold: float = 0.6, offsets: np.ndarray | None = None) -> Iterator[tuple[Candidate, np.ndarray, Box, Segment]]:
    """For each candidate, each box found in it: (candidate, its similarity matrix, box, segment in seconds).

    One query's candidates are compared in one product (query frames x their references' frames: many
    small products were 50 ms each on a busy machine, one larger one is not), then aligned one pair at a time."""
    starts = np.r_[0, np.cumsum([len(v) for v in queries.videos])[:-1]]
    by_query: dict[int, list[Candidate]] = {}
    for candidate in candidates:
        by_query.setdefault(candidate.query, []).append(candidate)
    for query, pairs in by_query.items():
        q = queries.videos[query]
        references = [refs.videos[c.ref] for c in pairs]
        together = (q.features @ np.concatenate([r.features for r in references]).T).astype(np.float64)
        if offsets is not None:
            together -= offsets[starts[query]:starts[query] + len(q), None]
        bounds = np.cumsum([0] + [len(r) for r in references])
        for candidate, r, a, b in zip(pairs, references, bounds[:-1], bounds[1:]):
            sims = together[:, a:b]
            for box, score in align(sims, method, threshold):
                yield candidate, sims, box, Segment(
                    q.video_id, r.video_id, float(q.timestamps[box.query_first, 0]),
                    float(q.timestamps[box.query_last, 1]), float(r.timestamps[box.ref_first, 0]),
                    float(r.timestamps[box.ref_last, 1]), score)


def best_first(segments: Iterable[Segment]) -> list[Segment]:
    return sorted(segments, key=lambda s: -s.score)
