"""Temporal alignment: one video pair's frame-similarity matrix -> the copied segments in it.

Both methods take ``sims``, a float (Q, R) matrix (query frames x reference frames, e.g. cosine
similarities), and return boxes ``(query_first, ref_first, query_last, ref_last)`` of frame indices
(inclusive), each with the path of (query, reference) frames it was found on.

- :func:`temporal_network`: VCSL's Temporal Network (Tan et al., ACM MM 2009, as ``vcsl/vta.py`` of
  ant-research/VCSL implements it), the VSC 2022 baseline's alignment. Each query frame's ``top_k``
  most similar reference frames are nodes; an edge joins two nodes that move forward in both videos
  by less than ``max_step`` frames with no other chosen reference frame between them (C1-C3), into a
  node of similarity at least ``min_sim`` (C4), weighted by that similarity. The heaviest path is a
  copy; its edges are zeroed and the next heaviest is looked for, ``max_path + 1`` times. A path is
  kept if its mean similarity per frame of extent exceeds ``min_sim``, it spans more than
  ``min_length`` frames on both axes and overlaps no kept box by an IoU of ``max_iou`` or more.
- :func:`dp_alignment`: ours. A local alignment (Smith-Waterman) on ``sims - threshold`` whose steps
  are (1, 1), (1, 2) and (2, 1): a path may follow a copy played up to twice as fast or as slow (a side
  step costs more where it turns the path than where it keeps its speed). The best-scoring path is a
  copy; its query frames are then excluded and the next is looked for.
- :func:`dp_alignment_by_rows` and :func:`tn_nodes` / :func:`tn_paths`: the same on a matrix too large to
  hold, given a block of its rows at a time (``localization.LargePair``).
- :func:`above_background`: what ``dp`` aligns: each similarity less a threshold raised, where a frame
  resembles most others (a low-information frame), above that frame's background (see there).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Box:
    """A copied segment in frame indices (inclusive), with the path that found it."""

    query_first: int
    ref_first: int
    query_last: int
    ref_last: int
    path: np.ndarray  # int (L, 2): (query frame, reference frame) pairs, in order
    # a fainter reading of a pair ``localization`` also reports, below every other segment of the search: a
    # weak end split off a path (``split_weak_ends``) or another offset of its query frames (``other_offset``)
    ranked_last: bool = False

    @classmethod
    def of(cls, path: np.ndarray) -> 'Box':
        """The box of a path (int (L, 2), query frames ascending)."""
        return cls(int(path[0, 0]), int(path[0, 1]), int(path[-1, 0]), int(path[-1, 1]), path=path)


def _check(sims: np.ndarray) -> np.ndarray:
    sims = np.asarray(sims, dtype=np.float64)
    if sims.ndim != 2:
        raise ValueError(f'a similarity matrix must be 2-d (query frames x reference frames), got shape {sims.shape}')
    if not np.isfinite(sims).all():
        raise ValueError('the similarity matrix holds NaN or infinite values')
    return sims


def box_iou(box: tuple[int, int, int, int], others: list[tuple[int, int, int, int]]) -> float:
    """Largest IoU of ``box`` with ``others`` (inclusive frame boxes, so a box is at least 1 x 1)."""
    best = 0.0
    for o in others:
        w = min(box[2], o[2]) - max(box[0], o[0]) + 1
        h = min(box[3], o[3]) - max(box[1], o[1]) + 1
        inter = max(w, 0) * max(h, 0)
        area = lambda b: (b[2] - b[0] + 1) * (b[3] - b[1] + 1)  # noqa: E731
        best = max(best, inter / (area(box) + area(o) - inter))
    return best


def temporal_network(sims: np.ndarray, max_step: int = 10, top_k: int = 5, max_path: int = 10,
                     min_sim: float = 0.2, min_length: int = 5, max_iou: float = 0.3) -> list[Box]:
    """VCSL's Temporal Network on one similarity matrix (defaults: VCSL's; the VSC baseline uses
    ``max_step=5, min_length=4``). See the module docstring."""
    sims = _check(sims)
    if sims.shape[0] == 0 or sims.shape[1] == 0:
        return []
    refs, node_sims = tn_nodes(sims, top_k)
    return tn_paths(refs, node_sims, lambda path: sims[path[:, 0], path[:, 1]], max_step, max_path, min_sim,
                    min_length, max_iou)


def tn_nodes(sims: np.ndarray, top_k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Each query frame's ``top_k`` most similar reference frames (int (Q, top)) and their similarities
    (float64 (Q, top)): the Temporal Network's nodes. Row by row: blocks of rows give the same."""
    # a copy, not a view: a view keeps the whole (Q, R) ordering alive (a pair's blocks all of it)
    refs = np.argsort(-sims, axis=1, kind='stable')[:, :min(top_k, sims.shape[1])].copy()
    return refs, np.take_along_axis(sims, refs, axis=1)


def tn_paths(refs: np.ndarray, node_sims: np.ndarray, cells, max_step: int = 10, max_path: int = 10,
             min_sim: float = 0.2, min_length: int = 5, max_iou: float = 0.3) -> list[Box]:
    """:func:`temporal_network` from its nodes (:func:`tn_nodes`); ``cells(path)``: the similarities of a
    path's (query, reference) frames (int (L, 2)) -> float64 (L,)."""
    n_q, top = refs.shape
    # Node n >= 1 is (query frame (n-1) // top, reference frame refs[...]); node 0 is VCSL's source,
    # which no edge reaches. Edges as arrays: source node, target node, weight (target's similarity); kept
    # as arrays, not lists of Python numbers (~36 bytes each: 3 M edges of a 30,000-frame pair were ~300 MB).
    sources, targets, weights = [], [], []
    for q_i in range(n_q):
        between = np.empty(0, dtype=refs.dtype)  # reference frames already linked from q_i
        for q_j in range(q_i + 1, min(n_q, q_i + max_step)):                        # C1
            step = refs[q_j][:, None] - refs[q_i][None, :]                        # (target k, source k)
            ok = (step > 0) & (step < max_step)                                  # C2
            if len(between):                                                     # C3: nothing chosen between
                inside = (between[None, None, :] > refs[q_i][None, :, None]) & \
                         (between[None, None, :] < refs[q_j][:, None, None])
                ok &= ~inside.any(axis=2)
            ok &= (node_sims[q_j] >= min_sim)[:, None]                           # C4
            t, s = np.nonzero(ok)
            sources.append(1 + q_i * top + s)
            targets.append(1 + q_j * top + t)
            weights.append(node_sims[q_j][t])
            between = np.unique(np.concatenate([between, refs[q_j][t]]))
    sources, targets = (np.concatenate([np.empty(0, np.int64), *x]).astype(np.int64) for x in (sources, targets))
    weights = np.concatenate([np.empty(0), *weights]).astype(np.float64)
    # VCSL links every node that precedes its last node closely enough to it, with weight 0 (an edge
    # already there keeps its place and gets weight 0).
    last = n_q * top

    def frames_of(n: int) -> tuple[int, int]:
        return (-1, -1) if n == 0 else ((n - 1) // top, int(refs.flat[n - 1]))

    lq, lr = frames_of(last)
    qs, rs = np.r_[-1, np.arange(last - 1) // top], np.r_[-1, refs.reshape(-1)[:last - 1]]
    near = np.flatnonzero((lq > qs) & (lr > rs) & (lq - qs <= max_step) & (lr - rs <= max_step))
    into_last = np.flatnonzero(targets == last)
    existing = dict(zip(sources[into_last].tolist(), into_last.tolist()))
    weights[[existing[n] for n in near.tolist() if n in existing]] = 0.0
    added = np.array([n for n in near.tolist() if n not in existing], dtype=np.int64)
    graph = _Dag(last + 1, np.r_[sources, added], np.r_[targets, np.full(len(added), last, np.int64)],
                 np.r_[weights, np.zeros(len(added))])

    boxes: list[Box] = []
    for _ in range(max_path + 1):
        path_edges, path_nodes = graph.heaviest_path()
        nodes = [n for n in path_nodes if n not in (0, last)]
        graph.weights[path_edges] = 0.0  # the path's edges are used up
        if not nodes:
            break
        path = np.array([frames_of(n) for n in nodes], dtype=np.int64)
        score = cells(path).sum()
        if score > 0:
            q0, q1, r0, r1 = path[:, 0].min(), path[:, 0].max(), path[:, 1].min(), path[:, 1].max()
        else:
            q0 = q1 = r0 = r1 = 0
        extent = ((r1 - r0) + (q1 - q0)) / 2
        box = (int(q0), int(r0), int(q1), int(r1))
        with np.errstate(divide='ignore', invalid='ignore'):
            dense = score / extent > min_sim if extent else score > 0  # VCSL divides by zero here: inf
        if dense and min(r1 - r0, q1 - q0) > min_length and box_iou(box, [b[:4] for b in _as_tuples(boxes)]) < max_iou:
            boxes.append(Box(*box, path=path))
    return boxes


def _as_tuples(boxes: list[Box]) -> list[tuple[int, int, int, int]]:
    return [(b.query_first, b.ref_first, b.query_last, b.ref_last) for b in boxes]


class _Dag:
    """A weighted DAG as edge arrays (in the order they were added), searched in networkx's
    topological order (``topological_generations``) so that ties resolve as VCSL's do."""

    def __init__(self, n_nodes: int, sources: np.ndarray, targets: np.ndarray, weights: np.ndarray):
        self.sources, self.weights = sources, weights
        by_target = np.argsort(targets, kind='stable')
        self.into = np.split(by_target, np.searchsorted(targets[by_target], np.arange(1, n_nodes)))
        by_source = np.argsort(sources, kind='stable')
        out = np.split(targets[by_source], np.searchsorted(sources[by_source], np.arange(1, n_nodes)))
        waiting = np.bincount(targets, minlength=n_nodes)
        generation = [v for v in range(n_nodes) if waiting[v] == 0]
        self.order: list[int] = []
        while generation:
            self.order += generation
            following = []
            for v in generation:
                for child in out[v].tolist():
                    waiting[child] -= 1
                    if waiting[child] == 0:
                        following.append(child)
            generation = following

    def heaviest_path(self) -> tuple[np.ndarray, list[int]]:
        """As networkx's ``dag_longest_path``: a node's distance is its best predecessor's (the first
        of equals) plus the edge, or 0 if that is negative or it has none; the path ends at the first
        node (in topological order) of largest distance. Returns (its edges' indices, its nodes)."""
        dist = {}
        via = {}
        for v in self.order:
            edges = self.into[v]
            dist[v], via[v] = 0.0, -1
            if len(edges):
                candidates = [dist[u] + w for u, w in zip(self.sources[edges].tolist(), self.weights[edges].tolist())]
                best = max(range(len(candidates)), key=candidates.__getitem__)
                if candidates[best] >= 0:
                    dist[v], via[v] = candidates[best], int(edges[best])
        v = max(dist, key=dist.__getitem__)
        edges, nodes = [], [v]
        while via[v] >= 0:
            edges.append(via[v])
            v = int(self.sources[via[v]])
            nodes.append(v)
        return np.array(edges[::-1], dtype=np.int64), nodes[::-1]


def above_background(sims: np.ndarray, row_background: np.ndarray, threshold: float = 0.6,
                     margin: float = 0.1, column_background: np.ndarray | None = None) -> np.ndarray:
    """What a cell adds to a copy: ``sims`` (Q, R) less the higher of ``threshold`` and the cell's
    background plus ``margin``. A cell's background is the higher of ``row_background`` (Q,) (its query
    frame's median similarity to the frames it was compared with: all of the query's candidate
    references), its column's median (the reference frame's median similarity to the query's frames) and
    ``column_background`` (R,) where given (``localization.localize``: a quantile over all queries' frames).

    A low-information frame (a near-uniform shot) resembles most frames of the other video, so its whole
    row or column is high and nothing in it stands out: such a reference shot aligned with every query's
    look-alike filler and outranked true copies (benchmarks/video.py, seed 2: segment AP 0.55), and paths
    ran on past a copy's end into it. A copied frame resembles its original more than the rest. The row's
    median is taken over all candidate references, not this one, so that a copied shot filling over half
    of its reference still stands out (over this pair alone, seed 1 fell from 0.95 to 0.76).
    """
    sims = _check(sims)
    row = np.asarray(row_background, dtype=np.float64).reshape(-1, 1)
    if row.shape[0] != sims.shape[0]:
        raise ValueError(f'row_background has {row.shape[0]} values for {sims.shape[0]} query frames')
    if not sims.size:
        return sims
    return gain_above(sims, row, np.median(sims, axis=0, keepdims=True), threshold, margin, column_background)


def gain_above(sims: np.ndarray, row_background: np.ndarray, column_median: np.ndarray, threshold: float,
               margin: float, column_background: np.ndarray | None = None) -> np.ndarray:
    """:func:`above_background` of cells ``sims`` (any shape) given their rows' background, their columns'
    median similarity and floor (each broadcast to ``sims``): also for blocks of a matrix too large to hold."""
    background = np.maximum(row_background, column_median)
    if column_background is not None:  # (R,): a floor under the reference frames' background
        background = np.maximum(background, np.asarray(column_background, dtype=np.float64))
    return sims - np.maximum(threshold, background + margin)


MIN_SCORE = 1.0  # dp_alignment's least score of a segment
# What a (1, 2) or (2, 1) step costs a ``dp`` path: SIDE_STEP_TURN where it turns the path (after a step of
# another kind, or at the path's first cell), SIDE_STEP_STEADY after one of its own kind (a copy at exactly 2x or
# 0.5x). At 0.1 for every side step, paths slipped sideways in still shots, whose frames look alike. A trade,
# measured in README's "Videos" ("A side step costs 0.2 ..."): on benchmarks/video.py's mild seeds 0-63, copies
# with both ends within 1 s 293 -> 302 of 320; copies resampled to 1.5x 234 -> 216, to 2x 133 -> 122.
SIDE_STEP_TURN, SIDE_STEP_STEADY = 0.2, 0.1


def _keep_path(traced: list[tuple[int, int]], blocked: np.ndarray, boxes: list[Box], min_length: int) -> None:
    """A path traced back from its end: block its query rows for later segments and keep its box if long enough."""
    path = np.array(traced[::-1], dtype=np.int64)
    blocked[path[0, 0]:path[-1, 0] + 1] = True
    box = Box.of(path)
    if min(box.query_last - box.query_first, box.ref_last - box.ref_first) + 1 >= min_length:
        boxes.append(box)


def dp_alignment(sims: np.ndarray, threshold: float = 0.5, turn: float = SIDE_STEP_TURN,
                 steady: float = SIDE_STEP_STEADY, min_length: int = 2, max_segments: int = 5,
                 min_score: float = MIN_SCORE) -> list[Box]:
    """Local alignment of the frames whose similarity beats ``threshold`` (see the module docstring).

    A path's score is the sum of ``sims - threshold`` over its cells, less ``turn`` for each (1, 2) or
    (2, 1) step that follows a step of another kind (or the path's first cell) and ``steady`` for each that
    follows one of its own kind (a copy at twice or half the speed all along). Segments whose score reaches
    ``min_score`` and that span at least ``min_length`` frames on both axes are returned, best first; each query
    frame is in at most one.
    """
    sims = _check(sims)
    n_q, n_r = sims.shape
    gain = sims - threshold
    boxes: list[Box] = []
    if np.maximum(gain, 0).sum() < min_score:  # no path can score min_score: most candidate pairs, at once
        return boxes
    blocked = np.zeros(n_q, dtype=bool)
    while len(boxes) < max_segments and n_q and n_r:
        best, state, back = _local_alignment(np.where(blocked[:, None], -np.inf, gain), turn, steady)
        q, r = np.unravel_index(int(np.argmax(best)), best.shape)
        if not best[q, r] >= min_score:
            break
        _keep_path(_trace(q, r, int(state[q, r]), lambda row: back[row]), blocked, boxes, min_length)
    return boxes


# A step of each kind, the kind also being the state a path is in after it: (1, 1) (or the path's first cell),
# (1, 2) and (2, 1).
_STEPS = ((1, 1), (1, 2), (2, 1))


def _trace(q: int, r: int, state: int, backs: Callable[[int], np.ndarray]) -> list[tuple[int, int]]:
    """The path that ends at cell (q, r) in ``state``, traced back from it (end first); ``backs(row)``: that
    row's back pointers (int8 (R,), ``_step``)."""
    path = [(q, r)]
    while True:
        code = int(backs(q)[r]) >> 2 * state & 3  # this state's two bits
        before = code - 1 if state == 0 else code  # state 0 stores the state before plus 1 (0: the path starts)
        if before < 0:
            return path
        dq, dr = _STEPS[state]
        q, r, state = q - dq, r - dr, before
        path.append((q, r))


def _local_alignment(gain: np.ndarray, turn: float, steady: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The score of the best path ending at each cell (float64 (Q, R)), the state it ends in (int8 (Q, R))
    and its back pointers (int8 (Q, R); ``_step``). One row at a time, vectorised over columns."""
    n_q, n_r = gain.shape
    best = np.full((n_q, n_r), -np.inf)
    state = np.zeros((n_q, n_r), dtype=np.int8)
    back = np.zeros((n_q, n_r), dtype=np.int8)
    above = two_above = None
    for q in range(n_q):
        scores, back[q] = _step(gain[q], above, two_above, turn, steady)
        best[q], state[q] = scores.max(axis=0), scores.argmax(axis=0)
        above, two_above = scores, above
    return best, state, back


def _step(gain: np.ndarray, above: np.ndarray | None, two_above: np.ndarray | None, turn: float, steady: float
          ) -> tuple[np.ndarray, np.ndarray]:
    """One row of :func:`_local_alignment`: its scores by state (float64 (3, R): a path's best score at each
    cell arriving by each kind of step) and back pointers, from its ``gain`` (R,) and the scores of the rows
    one and two above (None at the top). A cell's back pointers are one int8, two bits a state: the state
    before, plus 1 for state 0, where 0 means the path starts at the cell (as a byte a cell, not three)."""
    n_r = len(gain)
    scores = np.full((3, n_r), -np.inf)
    back = np.zeros((3, n_r), dtype=np.int8)
    # (1, 1), or the path starts here (score 0 before the cell)
    options = np.full((4, n_r), -np.inf)
    options[0] = 0.0
    if above is not None:
        options[1:, 1:] = above[:, :-1]
    pick = np.argmax(options, axis=0)
    scores[0] = gain + options[pick, np.arange(n_r)]
    back[0] = pick
    # (1, 2) from the row above, (2, 1) from the row two above: dearer after a step of another kind
    for kind, source, shift in ((1, above, 2), (2, two_above, 1)):
        if source is None or n_r <= shift:
            continue
        costs = np.full((3, 1), turn)
        costs[kind] = steady
        options = source[:, :-shift] - costs
        pick = np.argmax(options, axis=0)
        scores[kind, shift:] = gain[shift:] + options[pick, np.arange(n_r - shift)]
        back[kind, shift:] = pick
    return scores, back[0] | back[1] << 2 | back[2] << 4


def dp_alignment_by_rows(gain_rows, n_q: int, n_r: int, turn: float = SIDE_STEP_TURN,
                         steady: float = SIDE_STEP_STEADY, min_length: int = 2, max_segments: int = 5,
                         min_score: float = MIN_SCORE, cells: int = 2**20) -> list[Box]:
    """:func:`dp_alignment` (at ``threshold`` 0) of a matrix too large to hold, the same boxes: ``gain_rows(a,
    b)`` gives its rows a..b-1 (float64 (b - a, n_r)), made again at each pass, ``cells`` at a time. Each pass
    keeps two rows of scores, and those above every ``block``-th row (``block`` ~ 4 sqrt(n_q)); the best path
    is then traced back a block at a time, each block's back pointers made again from its saved rows (int8
    (block, n_r)). Memory: ~2 sqrt(n_q) x n_r x 8 bytes (a 57,600-frame pair: 220 MB, not 25 GiB)."""
    step_rows = max(1, cells // max(n_r, 1))

    def rows(a: int, b: int, blocked: np.ndarray):
        for start in range(a, b, step_rows):
            gain = gain_rows(start, min(start + step_rows, b))
            gain[blocked[start:start + len(gain)]] = -np.inf
            yield from gain

    total = sum(np.maximum(gain_rows(a, min(a + step_rows, n_q)), 0).sum() for a in range(0, n_q, step_rows))
    boxes: list[Box] = []
    if total < min_score or not n_r:
        return boxes
    block = max(2, int(4 * np.sqrt(n_q)))
    blocked = np.zeros(n_q, dtype=bool)
    while len(boxes) < max_segments:
        saved: dict[int, tuple] = {}
        above = two_above = None
        best, q, r, state = -np.inf, 0, 0, 0
        for row, gain in enumerate(rows(0, n_q, blocked)):
            if row % block == 0:
                saved[row] = (above, two_above)
            # a row of an earlier segment: all -inf, and no path is traced through it
            scores = np.full((3, n_r), -np.inf) if blocked[row] else _step(gain, above, two_above, turn, steady)[0]
            top = scores.max(axis=0)
            if top.max() > best:  # the first cell of the highest score in row order, as np.argmax
                best, q, r = float(top.max()), row, int(np.argmax(top))
                state = int(scores[:, r].argmax())
            above, two_above = scores, above
        if not best >= min_score:
            break
        backs: dict[int, np.ndarray] = {}

        def back_of(row: int) -> np.ndarray:
            if row not in backs:  # the block's rows up to ``row`` (the trace only goes up), made again
                first = row // block * block
                above, two_above = saved[first]
                backs.clear()
                for i, gain in enumerate(rows(first, row + 1, blocked)):
                    scores, backs[first + i] = _step(gain, above, two_above, turn, steady)
                    above, two_above = scores, above
            return backs[row]

        _keep_path(_trace(q, r, state, back_of), blocked, boxes, min_length)
    return boxes


# A path's end is split off (``split_weak_ends``) when it has at least WEAK_END_FRAMES cells and their mean gain
# is below WEAK_END_RATIO x the core's; the core is the best-summing run of the path's gains less
# CORE_FRACTION x their 90th percentile. On benchmarks/video.py's seeds 0-35 (kept descriptors searched again):
# only seed 32 moved (0.770 -> 0.903, a path run on 10 s past its copy into a look-alike shot; fresh seeds 36-43:
# 36 0.584 -> 0.632); 0.25 in place of 0.15 also lowered seeds 3, 8, 11 (by 0.111, 0.011, 0.036), and splitting
# every path at its core lowered 14 seeds.
WEAK_END_RATIO, WEAK_END_FRAMES, CORE_FRACTION = 0.15, 4, 0.3


def split_weak_ends(box: Box, gains: np.ndarray) -> tuple[Box, list[Box]]:
    """``box`` less the ends of its path whose cells (``gains`` (L,), the path's gain) are much fainter than its
    core (see ``WEAK_END_RATIO``): (the box kept, the ends split off). A copy's path may run on into a look-alike
    shot at a small gain per cell; those cells are then no part of the copy's box, only a fainter box of their own."""
    lifted = gains - CORE_FRACTION * np.quantile(gains, 0.9)
    best, start, a, b, run = -np.inf, 0, 0, 0, 0.0
    for i, value in enumerate(lifted.tolist()):  # the best-summing run (Kadane)
        if run <= 0:
            run, start = 0.0, i
        run += value
        if run > best:
            best, a, b = run, start, i
    if b == a:  # a core of one cell is no segment (dp_alignment's least length is 2): the box stays whole
        return box, []
    core = gains[a:b + 1].mean()
    ends = [piece for piece in (slice(0, a), slice(b + 1, len(gains)))
            if len(gains[piece]) >= WEAK_END_FRAMES and gains[piece].mean() < WEAK_END_RATIO * core]
    if not ends:
        return box, []
    a = a if any(piece.start == 0 for piece in ends) else 0
    b = b if any(piece.stop == len(gains) for piece in ends) else len(gains) - 1
    return Box.of(box.path[a:b + 1]), [Box.of(box.path[piece]) for piece in ends]


# Another reference offset of a box's query frames (``other_offset``) is kept when its path scores at least
# OTHER_OFFSET_RATIO x the box's, away from the box's path by more than OTHER_OFFSET_BAND reference frames.
OTHER_OFFSET_RATIO, OTHER_OFFSET_BAND = 0.5, 2


def other_offset(rows, n_q: int, n_r: int, box: Box, path_gain, cells: int = 2**20) -> tuple[Box, float] | None:
    """The best path over ``box``'s query frames (``OTHER_OFFSET_BAND`` more on each side) that keeps more than
    ``OTHER_OFFSET_BAND`` reference frames away from ``box``'s path, with its score: where a reference's shots all
    look alike, the copy may lie at another offset than the best path's. ``rows(a, b)``: the pair's gain on
    query frames a..b-1 (float64 (b - a, ``n_r``)), asked ``cells`` at a time (``dp_alignment_by_rows``: a pair
    too large to hold is never made whole); ``path_gain(path)``: the gain at a path's cells."""
    q0, q1 = max(box.query_first - OTHER_OFFSET_BAND, 0), min(box.query_last + OTHER_OFFSET_BAND, n_q - 1)
    near = dict(box.path.tolist())  # query frame -> its reference frame on the box's path
    columns = np.arange(n_r)

    def masked(a: int, b: int) -> np.ndarray:
        gain = np.array(rows(q0 + a, q0 + b), dtype=np.float64)
        for i in range(b - a):
            if q0 + a + i in near:  # dp refuses infinities: a cell no path can afford
                gain[i, np.abs(columns - near[q0 + a + i]) <= OTHER_OFFSET_BAND] = -1e9
        return gain

    found = dp_alignment_by_rows(masked, q1 - q0 + 1, n_r, max_segments=1, cells=cells)
    if not found:
        return None
    path = found[0].path + [q0, 0]
    return Box.of(path), float(np.sum(path_gain(path)))
