"""Localization: candidate pairs -> copied segments in seconds, scored for ranking across pairs.

Each candidate pair's frame-similarity matrix (query frames x reference frames, less the query
frames' score-normalisation offsets) is made, aligned (``alignment``) and dropped: only one query's
candidate matrices are held at a time, never those of all pairs; a pair too large to hold is aligned from
blocks of its rows, with the same results.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np

from .alignment import (MIN_SCORE, OTHER_OFFSET_RATIO, Box, above_background, dp_alignment, dp_alignment_by_rows,
                        gain_above, other_offset, split_weak_ends, temporal_network, tn_nodes, tn_paths)
from .candidates import Candidate
from .metrics import Segment
from .storage import VideoFeatures, VideoSet

ALIGNMENTS = ('dp', 'tn')
# VSC 2022's baseline settings of VCSL's Temporal Network (vsc/baseline/sscd_baseline.py).
VSC_TN = dict(max_step=5, min_length=4, top_k=5, max_path=10, min_sim=0.2, max_iou=0.3)
# How far above its frames' background a cell must be to count as copied (``above_background``). On
# benchmarks/video.py's seeds 0-4, segment AP 1.000, 0.954, 0.916, 0.670, 0.847: at or above the plain
# threshold's on every seed (1.000, 0.954, 0.553, 0.670, 0.829); 0.2 gave 1.000, 0.968, 0.976, 0.672,
# 0.779 and 0.3 lost more on seeds 3 and 4 (0.462, 0.663). Those were before the descriptors were
# centred (``search_space``); since, on seeds 0-7, 0.05-0.15 give the same, 0.2 trades seed 4 (0.982 -> 0.957)
# for seed 7 (0.724 -> 0.761), and no background at all loses seeds 2, 4, 6 (0.914, 0.956, 0.715) for 7 (0.837).
BACKGROUND_MARGIN = 0.1
# A reference frame's background is also this quantile of its similarity to QUERY_SAMPLE frames spread over
# all queries (``query_sample``): a reference shot that resembles a quarter of everything searched is no
# copy's evidence. On benchmarks/video.py's seeds 0-11 (references of distinct photos) it raised segment AP
# on seeds 1, 2, 3, 6, 9, 10 (seed 3: 0.560 -> 0.749), lowered none by over 0.001; the 0.9 quantile lost seeds 0, 1.
COLUMN_QUANTILE, QUERY_SAMPLE = 0.75, 256
# Similarities computed at once beyond one pair's (float64: 128 MiB): a query's candidates in one product up to this.
PRODUCT_CELLS = 2**24
# One pair's similarities held whole up to this (128 MiB; the alignment needs ~5 times as much); beyond, a pair
# (a 4-hour film at 4 fps against itself: 57,600 x 57,600 frames, 25 GiB) is aligned from blocks of rows made
# when needed (``LargePair``): the same boxes, in memory ~ the frames' and sqrt(Q) x R, however long the videos.
PAIR_CELLS = 2**24
# Similarities made at once of such a pair (8 MiB).
BLOCK_CELLS = 2**20


def may_hold_a_copy(sims: np.ndarray, threshold: float) -> bool:
    """Whether the pair's cells above ``threshold`` add up to a segment's least score (``MIN_SCORE``): no
    alignment can find a copy in a pair where they do not."""
    return bool(np.maximum(sims - threshold, 0).sum() >= MIN_SCORE)


def fainter_readings(box: Box, score: float, gains: np.ndarray, rows, shape: tuple[int, int], path_gain,
                     ranked_last: list[tuple[Box, float]], other_offsets: bool = True) -> Box:
    """``dp``'s box less its weak ends (``alignment.split_weak_ends``), which go to ``ranked_last`` with their
    own scores, as does the best path at another reference offset of the box's query frames where it scores
    at least ``OTHER_OFFSET_RATIO`` x ``score`` (``alignment.other_offset``: ``rows(a, b)`` the pair's gain on
    rows a..b-1, ``shape`` the pair's, ``path_gain(path)`` the gain at a path's cells; not looked for without
    ``other_offsets``: a second alignment of the pair, whose result a caller that drops the fainter readings,
    such as ``video dedup``, does not need). Returns the box kept.

    Ranked below every other segment (``best_first``), these only add recall at the end of the list (segment
    AP cannot fall for it). On benchmarks/video.py's seeds 0-35 (`video search` run again on its kept descriptors) the other offset
    alone raised seeds 23 and 33 (a copy placed at the wrong offset of a reference whose shots look alike: 0.754
    -> 0.850, 0.801 -> 0.923), 26 (0.623 -> 0.680), 1, 7 and 27 a little; the weak ends seed 32 (0.770 -> 0.903)."""
    kept, ends = split_weak_ends(box, gains)
    for end in ends:
        ranked_last.append((dataclasses.replace(end, ranked_last=True),
                            float(gains[np.isin(box.path[:, 0], end.path[:, 0])].sum())))
    other = other_offset(rows, *shape, kept, path_gain, cells=BLOCK_CELLS) if other_offsets else None
    if other is not None and other[1] >= OTHER_OFFSET_RATIO * score:
        ranked_last.append((dataclasses.replace(other[0], ranked_last=True), other[1]))
    return kept


def align(sims: np.ndarray, method: str = 'dp', threshold: float = 0.6,
          row_background: np.ndarray | None = None, column_background: np.ndarray | None = None,
          ranked_last: list[tuple[Box, float]] | None = None, other_offsets: bool = True
          ) -> list[tuple[Box, float]]:
    """Boxes of one pair with their scores, the sum of each cell's gain along the box's path (what the
    DP maximises): long, clear copies rank above short or faint ones (the mean alone ranked short chance
    matches first: segment AP 0.57 against 0.89 on the benchmark's seed 0).

    ``dp``: the gain is ``above_background`` (the similarity above ``threshold``, or above the frames'
    background plus ``BACKGROUND_MARGIN`` where that is higher; ``row_background`` (Q,) defaults to
    each row's median; ``column_background`` (R,), optional, is a floor of the reference frames').
    ``tn``: VCSL's Temporal Network as VSC's baseline runs it; gain ``sims - threshold``.

    With ``ranked_last`` (a list), ``dp``'s fainter readings of the pair go there (``fainter_readings``, which
    ``other_offsets`` is passed to)."""
    if method == 'tn':
        boxes = temporal_network(sims, **VSC_TN)
        gain = sims - threshold
    elif method == 'dp':
        if not may_hold_a_copy(sims, threshold):  # most pairs, at once
            return []
        if row_background is None:
            row_background = np.median(sims, axis=1) if sims.size else np.zeros(len(sims))
        gain = above_background(sims, row_background, threshold, BACKGROUND_MARGIN, column_background)
        boxes = dp_alignment(gain, threshold=0.0)
    else:
        raise ValueError(f'unknown alignment {method!r}: choose one of {", ".join(ALIGNMENTS)}')
    out = []
    for box in boxes:
        gains = gain[box.path[:, 0], box.path[:, 1]]
        score = float(gains.sum())
        if method == 'dp' and ranked_last is not None:
            box = fainter_readings(box, score, gains, lambda a, b: gain[a:b], gain.shape,
                                   lambda p: gain[p[:, 0], p[:, 1]], ranked_last, other_offsets)
        out.append((box, score))
    return out


@dataclass(frozen=True)
class LargePair:
    """A pair whose similarity matrix (``query`` (Q, D) x ``ref`` (R, D) frames, less ``offsets`` (Q, 1) where
    given) is too large to hold: its rows, columns or cells made when asked, as ``localize`` makes the whole."""

    query: np.ndarray
    ref: np.ndarray
    offsets: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.query), len(self.ref)

    def rows(self, a: int, b: int) -> np.ndarray:
        """Rows a..b-1: float64 (b - a, R)."""
        sims = (self.query[a:b] @ self.ref.T).astype(np.float64)
        return sims if self.offsets is None else sims - self.offsets[a:b]

    def blocks(self):
        """(a, b) spans of rows of ``BLOCK_CELLS`` similarities."""
        step = max(1, BLOCK_CELLS // max(len(self.ref), 1))
        return ((a, min(a + step, len(self.query))) for a in range(0, len(self.query), step))

    def cells(self, path: np.ndarray) -> np.ndarray:
        """The similarities at ``path``'s (query, reference) frames (int (L, 2), query frames ascending)."""
        values = np.empty(len(path))
        for a, b in self.blocks():
            inside = (path[:, 0] >= a) & (path[:, 0] < b)
            if inside.any():
                values[inside] = self.rows(a, b)[path[inside, 0] - a, path[inside, 1]]
        return values

    def column_median(self) -> np.ndarray:
        """Each reference frame's median similarity to the query frames: float64 (R,)."""
        step = max(1, BLOCK_CELLS // max(len(self.query), 1))
        medians = []
        for a in range(0, len(self.ref), step):
            sims = (self.query @ self.ref[a:a + step].T).astype(np.float64)
            medians.append(np.median(sims if self.offsets is None else sims - self.offsets, axis=0))
        return np.concatenate(medians)

    def may_hold_a_copy(self, threshold: float) -> bool:
        """:func:`may_hold_a_copy` of the whole matrix."""
        return bool(sum(np.maximum(self.rows(a, b) - threshold, 0).sum() for a, b in self.blocks()) >= MIN_SCORE)


def align_large(pair: LargePair, method: str, threshold: float, row_background: np.ndarray,
                column_background: np.ndarray | None = None, ranked_last: list[tuple[Box, float]] | None = None,
                other_offsets: bool = True) -> list[tuple[Box, float]]:
    """:func:`align` of a pair too large to hold, the same boxes and scores, from blocks of its rows."""
    if method == 'tn':
        settings = {k: v for k, v in VSC_TN.items() if k != 'top_k'}
        nodes = [tn_nodes(pair.rows(a, b), VSC_TN['top_k']) for a, b in pair.blocks()]
        boxes = tn_paths(np.concatenate([n[0] for n in nodes]), np.concatenate([n[1] for n in nodes]), pair.cells,
                         **settings)
        return [(box, float((pair.cells(box.path) - threshold).sum())) for box in boxes]
    if method != 'dp':
        raise ValueError(f'unknown alignment {method!r}: choose one of {", ".join(ALIGNMENTS)}')
    if not pair.may_hold_a_copy(threshold):
        return []
    median = pair.column_median()
    row = np.asarray(row_background, dtype=np.float64)

    def gain_rows(a: int, b: int) -> np.ndarray:
        return gain_above(pair.rows(a, b), row[a:b, None], median, threshold, BACKGROUND_MARGIN, column_background)

    def path_gain(path: np.ndarray) -> np.ndarray:
        q, r = path[:, 0], path[:, 1]
        return gain_above(pair.cells(path), row[q], median[r], threshold, BACKGROUND_MARGIN,
                          None if column_background is None else column_background[r])

    boxes = dp_alignment_by_rows(gain_rows, *pair.shape, cells=BLOCK_CELLS)
    out = []
    for box in boxes:
        gain = path_gain(box.path)
        score = float(gain.sum())
        if ranked_last is not None:
            box = fainter_readings(box, score, gain, gain_rows, pair.shape, path_gain, ranked_last, other_offsets)
        out.append((box, score))
    return out


# Whitening's shrinkage: the covariance's eigenvalues each plus SHRINKAGE times their mean (1: halfway to
# the isotropic covariance of the same total variance). On benchmarks/video.py's seeds 0-11, 0.3, 1 and 3
# gave a mean segment AP of 0.902, 0.949 and 0.938 (centring alone 0.877); on fresh seeds 12-15, 1 gave 0.968.
SHRINKAGE = 1.0


@dataclass(frozen=True)
class FrameSpace:
    """Where ``dp`` compares frames: descriptors less ``mean`` (D,), times ``projection`` (D, D), then
    L2-normalised; the cosine there. With the identity as ``projection``, the mean is only removed."""

    mean: np.ndarray
    projection: np.ndarray | None = None  # None: the identity (no D x D matrix made for it)
    whitened: bool = False

    def __call__(self, features: np.ndarray) -> np.ndarray:
        """``features`` (N, D) -> (N, D) float64 unit rows."""
        x = features.astype(np.float64) - self.mean
        if self.projection is not None:
            x = x @ self.projection
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def search_space(queries: VideoSet, references: Sequence[VideoFeatures], whiten: bool = True) -> FrameSpace:
    """The space of this search's frames (all query frames and the ``references``' frames: every reference
    of a file, the candidates read back from a collection): their mean removed and, with ``whiten``, their
    shrunk covariance's PCA whitening (eigenvalues raised by ``SHRINKAGE`` x their mean, so directions
    the frames hardly vary in are not blown up), if there are at least as many frames as dimensions: from
    fewer, the covariance is singular and whitening drives all frames apart (n frames whitened in their
    n - 1 dimensions are all at cosine -1/(n - 1) of each other), copies included.

    Descriptors share a common part (under the synthetic checkpoint's random weights, any two frames of
    the benchmark are at cosine 0.2-0.3 on average), and a frame with little content is mostly that part,
    so it resembles everything: removed, a copy's cells stand out from look-alikes. Weak descriptors also
    vary most along a few directions, which then decide every cosine; whitened, each direction counts
    about as much, as descriptor pipelines whiten on a training set (here the frames searched: no other
    data, no labels). On benchmarks/video.py's seeds 0-11 (random weights), a copied query frame's best
    reference frame was its original (within 1 s) for 66 % of them against 60 % centred only, and ranking
    query frames by their best similarity found the copied ones with an AP of 0.91 against 0.78."""
    videos = [*queries.videos, *references]
    dim = queries.videos[0].features.shape[1]
    count = sum(len(v) for v in videos)
    # fewer frames than dimensions: no covariance to whiten with (see above), and no D x D matrix made
    whiten = whiten and count >= dim
    total, outer = np.zeros(dim), np.zeros((dim, dim)) if whiten else None
    for v in videos:  # sums video by video: no copy of all frames
        x = v.features.astype(np.float64)
        total += x.sum(axis=0)
        if whiten:
            outer += x.T @ x
    mean = total / max(count, 1)
    if not whiten:
        return FrameSpace(mean)
    values, vectors = np.linalg.eigh(outer / max(count, 1) - np.outer(mean, mean))
    values = np.maximum(values, 0.0)
    values += SHRINKAGE * values.mean()
    return FrameSpace(mean, vectors / np.sqrt(np.maximum(values, 1e-12)), whitened=True)


def localize(queries: VideoSet, refs: VideoSet, candidates: Iterable[Candidate], method: str = 'dp',
             threshold: float = 0.6, offsets: np.ndarray | None = None, space: FrameSpace | None = None,
             query_sample: np.ndarray | None = None, other_offsets: bool = True
             ) -> Iterator[tuple[Candidate, np.ndarray, Box, Segment]]:
    """For each candidate, each box found in it: (candidate, its similarity matrix, box, segment in seconds).
    ``space``: where frames are compared (:func:`search_space`; None: the plain cosine). ``query_sample``
    (S, D), query frames of the whole search in that space: ``dp``'s reference frames' background is also their
    ``COLUMN_QUANTILE`` of similarity to them (computed once per reference video, for pairs that may hold a copy).

    One query's candidates are compared in one product (query frames x their references' frames: many
    small products were 50 ms each on a busy machine, one larger one is not), then aligned one pair at a
    time; where that product would exceed ``PRODUCT_CELLS`` (a 4-hour film x ten: 15 GiB), each pair's
    matrix is made on its own, and each query frame's background (its median similarity to all its
    candidates' frames) in blocks of query frames; a pair over ``PAIR_CELLS`` is aligned from blocks of its
    rows (``LargePair``, ``align_large``) and yielded with None for its matrix. ``dp``'s fainter readings come
    after each pair's boxes (``Box.ranked_last``; ``other_offsets``: ``fainter_readings``')."""
    from ..progress import Progress
    starts = np.r_[0, np.cumsum([len(v) for v in queries.videos])[:-1]]
    by_query: dict[int, list[Candidate]] = {}
    for candidate in candidates:
        by_query.setdefault(candidate.query, []).append(candidate)
    columns: dict[int, np.ndarray] = {}
    cells = sum(len(queries.videos[c.query]) * len(refs.videos[c.ref]) for c in itertools.chain(*by_query.values()))
    # Alignment costs time in proportion to the pairs' cells: a 30,000-frame film against itself was minutes
    # without a word. The line appears only once it has taken 2 s (progress.DELAY).
    with Progress(cells, 'aligning candidate pairs', unit='cell', scale=True) as progress:
        for query, pairs in by_query.items():
            q = queries.videos[query]
            within = space or (lambda x: x.astype(np.float64))
            q_frames = within(q.features)
            q_offsets = None if offsets is None else offsets[starts[query]:starts[query] + len(q), None]
            references = [refs.videos[c.ref] for c in pairs]
            r_frames = [within(r.features) for r in references]

            def similarities(rows: slice, frames: np.ndarray) -> np.ndarray:
                sims = (q_frames[rows] @ frames.T).astype(np.float64)
                return sims if q_offsets is None else sims - q_offsets[rows]

            columns_in_all = sum(len(f) for f in r_frames)
            if len(q) * columns_in_all <= PRODUCT_CELLS:
                together = similarities(slice(None), np.concatenate(r_frames))
                background = np.median(together, axis=1)
                bounds = np.cumsum([0] + [len(f) for f in r_frames])
                matrices = (together[:, a:b] for a, b in zip(bounds[:-1], bounds[1:]))
            else:  # a block of query frames against every candidate frame at a time: no copy of all frames either
                step = max(1, PRODUCT_CELLS // columns_in_all)
                background = np.concatenate([
                    np.median(np.hstack([similarities(slice(a, a + step), frames) for frames in r_frames]), axis=1)
                    for a in range(0, len(q), step)])
                matrices = (similarities(slice(None), frames) if len(q_frames) * len(frames) <= PAIR_CELLS
                            else LargePair(q_frames, frames, q_offsets) for frames in r_frames)
            for candidate, r, frames, sims in zip(pairs, references, r_frames, matrices):
                large = isinstance(sims, LargePair)
                column = None
                if query_sample is not None and method == 'dp' and (
                        sims.may_hold_a_copy(threshold) if large else may_hold_a_copy(sims, threshold)):
                    if candidate.ref not in columns:
                        columns[candidate.ref] = column_quantile(query_sample, frames)
                    column = columns[candidate.ref]
                last: list[tuple[Box, float]] = []
                found = align_large(sims, method, threshold, background, column, last, other_offsets) if large \
                    else align(sims, method, threshold, background, column, last, other_offsets)
                for box, score in found + last:
                    yield candidate, None if large else sims, box, Segment(
                        q.video_id, r.video_id, float(q.timestamps[box.query_first, 0]),
                        float(q.timestamps[box.query_last, 1]), float(r.timestamps[box.ref_first, 0]),
                        float(r.timestamps[box.ref_last, 1]), score)
                progress.advance(len(q) * len(r))


def column_quantile(sample: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """Each of ``frames``' (R, D) ``COLUMN_QUANTILE`` of similarity to the ``sample`` (S, D) of query frames:
    float64 (R,); ``PRODUCT_CELLS`` at a time for a film's frames."""
    if len(sample) * len(frames) <= PRODUCT_CELLS:
        return np.quantile(sample @ frames.T, COLUMN_QUANTILE, axis=0)
    step = max(1, BLOCK_CELLS // max(len(sample), 1))
    return np.concatenate([np.quantile(sample @ frames[a:a + step].T, COLUMN_QUANTILE, axis=0)
                           for a in range(0, len(frames), step)])


def best_first(segments: Iterable[Segment], last: Iterable[Segment] = ()) -> list[Segment]:
    """Segments by score, after :func:`rank_against_other_references`; then the ``last`` (fainter readings of
    pairs, ``fainter_readings``) by their own scores, each lowered below every segment before them (by the
    same amount, so that their order stays)."""
    ranked = sorted(rank_against_other_references(segments), key=lambda s: -s.score)
    last = sorted(last, key=lambda s: -s.score)
    if last:
        shift = min([0.0, *(s.score for s in ranked)]) - 1.0 - last[0].score
        ranked += [dataclasses.replace(s, score=s.score + shift) for s in last]
    return ranked


def rank_against_other_references(segments: Iterable[Segment], overlap: float = 0.5) -> list[Segment]:
    """A segment whose query seconds lie (over ``overlap`` of them) within a better segment of the same
    query with another reference is scored by its score less that one's (so at most 0: after every
    segment without such a rival).

    Seconds copied from one reference resemble others' look-alike shots only less: such a second
    match ranked among true copies (benchmarks/video.py: seed 5's segment AP 0.878, 0.998 with this,
    and no seed of 0-7 lower). It stays listed, low, for references that are copies of each other."""
    kept: list[Segment] = []
    out = []
    for s in sorted(segments, key=lambda s: -s.score):
        rival = next((k for k in kept if k.query_id == s.query_id and k.ref_id != s.ref_id and
                      min(k.query_end, s.query_end) - max(k.query_start, s.query_start)
                      > overlap * (s.query_end - s.query_start)), None)
        if rival is None:
            kept.append(s)
            out.append(s)
        else:
            out.append(dataclasses.replace(s, score=s.score - rival.score))
    return out
