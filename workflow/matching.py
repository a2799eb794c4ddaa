"""Finding copies: exact search between descriptor sets, score normalisation, near-duplicate groups,
and an HTML page to look at the matches. (Milvus is in ``milvus``.)"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..atomic import atomic_write
from .metrics import Match

BLOCK = 256  # query rows per similarity block: BLOCK x N float32 at a time (100 MB for N = 100,000), never N x N


def similarity_blocks(queries: np.ndarray, references: np.ndarray, block: int = BLOCK
                      ) -> Iterator[tuple[int, np.ndarray]]:
    """(first query row, block of inner products) for ``block`` query rows at a time."""
    for start in range(0, len(queries), block):
        yield start, queries[start:start + block] @ references.T


def top_k(similarity: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and scores of each row's k largest values, best first."""
    k = min(k, similarity.shape[1])
    idx = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
    scores = np.take_along_axis(similarity, idx, axis=1)
    order = np.argsort(-scores, axis=1, kind='stable')
    return np.take_along_axis(idx, order, axis=1), np.take_along_axis(scores, order, axis=1)


def nth_neighbour_similarity(queries: np.ndarray, background: np.ndarray, nth: int) -> np.ndarray:
    """Each query's similarity to its n-th nearest background descriptor (1-based)."""
    if not 1 <= nth <= len(background):
        raise ValueError(f'--nth must be between 1 and the {len(background)} background descriptors, got {nth}')
    out = np.empty(len(queries), np.float32)
    for start, sim in similarity_blocks(queries, background):
        out[start:start + len(sim)] = -np.partition(-sim, nth - 1, axis=1)[:, nth - 1]
    return out


def search_exact(query_ids: Sequence[str], queries: np.ndarray, reference_ids: Sequence[str],
                 references: np.ndarray, k: int, threshold: float | None = None,
                 offsets: np.ndarray | None = None) -> list[Match]:
    """Each query's k best references by inner product (cosine for unit vectors), minus the query's
    offset (score normalisation), kept if at least ``threshold``."""
    _check_dims(queries, references)
    matches = []
    for start, sim in similarity_blocks(queries, references):
        idx, scores = top_k(sim, k)
        if offsets is not None:
            scores = scores - offsets[start:start + len(sim), None]
        for row in range(len(sim)):
            for j, score in zip(idx[row], scores[row]):
                if threshold is None or score >= threshold:
                    matches.append(Match(query_ids[start + row], reference_ids[j], float(score)))
    return matches


def _check_dims(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f'descriptor sizes differ: {a.shape[1]} vs {b.shape[1]}')


@dataclass
class DuplicateGroup:
    members: list[str]
    keep: str


def near_duplicate_pairs(vectors: np.ndarray, threshold: float, block: int = BLOCK) -> Iterator[tuple[int, int, float]]:
    """(i, j, similarity) for i < j above ``threshold``, block by block: memory O(block x N), not N x N."""
    for start, sim in similarity_blocks(vectors, vectors, block):
        rows, cols = np.nonzero(sim >= threshold)
        for r, c in zip(rows, cols):
            i = start + int(r)
            if i < c:
                yield i, int(c), float(sim[r, c])


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


def write_groups(path: str | os.PathLike, groups: Sequence[DuplicateGroup], paths: dict[str, str]) -> None:
    """Groups as JSON (``[{keep, members}]``) if ``path`` ends in .json, else CSV
    ``group,image_id,path,keep``; through a temporary file."""
    with atomic_write(path) as tmp, open(tmp, 'w', newline='', encoding='utf-8') as f:
        if str(path).lower().endswith('.json'):
            json.dump([{'keep': g.keep, 'members': g.members} for g in groups], f, indent=1)
        else:
            writer = csv.writer(f)
            writer.writerow(['group', 'image_id', 'path', 'keep'])
            for n, g in enumerate(groups, start=1):
                writer.writerows([n, m, paths.get(m, ''), m == g.keep] for m in g.members)


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
