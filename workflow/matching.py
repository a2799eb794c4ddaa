"""Finding copies: search between descriptor sets (engines in ``engines``), score normalisation, near-duplicate groups,
and an HTML page to look at the matches. (Milvus is in ``milvus``.)"""
from __future__ import annotations

import base64
import csv
import html
import io
import itertools
import json
import math
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..atomic import atomic_write
from .engines import Engine, Exact, Progress, choose_engine, meets
from .metrics import Match, safe_cell

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
                          paths: Sequence[str | None] | None = None, progress: Progress | None = None
                          ) -> list[DuplicateGroup]:
    """:func:`duplicate_groups` of the pairs at or above ``threshold``, joined a block of pairs at a time:
    memory stays bounded however large a group of near-duplicates is (25,000 copies of one image are
    312 million pairs). ``progress(done, total)`` is called as the search advances."""
    engine = engine or choose_engine(len(vectors), len(vectors))
    components = Components(len(ids))
    for i, j, _ in engine.pair_blocks(vectors, threshold, progress):
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


def write_groups(path: str | os.PathLike, groups: Sequence[DuplicateGroup], paths: dict[str, str]) -> None:
    """Groups as JSON (``[{keep, members}]``) if ``path`` ends in .json, else CSV
    ``group,image_id,path,keep`` (ids and paths a spreadsheet would take for formulas escaped:
    ``metrics.safe_cell``); through a temporary file."""
    with atomic_write(path) as tmp, open(tmp, 'w', newline='', encoding='utf-8') as f:
        if str(path).lower().endswith('.json'):
            json.dump([{'keep': g.keep, 'members': g.members} for g in groups], f, indent=1)
        else:
            writer = csv.writer(f)
            writer.writerow(['group', 'image_id', 'path', 'keep'])
            for n, g in enumerate(groups, start=1):
                writer.writerows([n, safe_cell(m), safe_cell(paths.get(m, '')), m == g.keep] for m in g.members)


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


def html_report(matches: Sequence[Match], query_paths: dict[str, str], reference_paths: dict[str, str],
                output: str | os.PathLike, per_query: int = 5) -> None:
    """A self-contained page (thumbnails embedded) with each query beside its best matches."""
    by_query: dict[str, list[Match]] = {}
    for m in sorted(matches, key=lambda m: -m.score):
        by_query.setdefault(m.query_id, []).append(m)
    parts = ['<!doctype html><meta charset="utf-8"><title>ISC matches</title>',
             '<style>body{font-family:sans-serif}td{vertical-align:top;text-align:center;padding:4px}'
             'img{max-width:160px;max-height:160px}</style><h1>Copy detection matches</h1><table>']
    for query, found in by_query.items():
        cells = [f'<td><b>{html.escape(query)}</b><br>{_thumbnail(query_paths.get(query))}</td>']
        cells += [f'<td>{html.escape(m.reference_id)}<br>{m.score:.3f}<br>{_thumbnail(reference_paths.get(m.reference_id))}</td>'
                  for m in found[:per_query]]
        parts.append('<tr>' + ''.join(cells) + '</tr>')
    parts.append('</table>')
    with atomic_write(output) as tmp:
        tmp.write_text('\n'.join(parts), encoding='utf-8')


def _thumbnail(path: str | None) -> str:
    if not path or not os.path.isfile(path):
        return '<i>no image</i>'
    from PIL import Image
    try:
        with Image.open(path) as image:
            image = image.convert('RGB')
            image.thumbnail((160, 160))
            buffer = io.BytesIO()
            image.save(buffer, 'JPEG', quality=80)
    except OSError:
        return '<i>unreadable</i>'
    return f'<img src="data:image/jpeg;base64,{base64.b64encode(buffer.getvalue()).decode()}">'
