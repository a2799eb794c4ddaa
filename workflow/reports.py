"""What people read: the search report (each query beside its k matches, marked), near-duplicate groups
as CSV or JSON with their scores and sizes, and the groups' page. The pages are self-contained (small JPEG
thumbnails embedded) and every id and path in them is escaped: they are user data."""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from ..atomic import atomic_write

if TYPE_CHECKING:  # the command line's parser imports this module: nothing heavy at its top
    from .metrics import Match

THUMBNAIL = 128  # px, the longer side; JPEG at quality 70: about 3-6 KB each
DEFAULT_REPORT_QUERIES = 200  # rows of a search report; a person reads no more (about 10 MB at k=10)

STYLE = """
body{font-family:system-ui,sans-serif;margin:16px;color:#222;background:#fafafa}
h1{font-size:20px;margin:0 0 8px}
.summary{display:flex;flex-wrap:wrap;gap:8px;margin:8px 0 12px}
.summary div{background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px 12px}
.summary b{display:block;font-size:18px}
.legend{margin:0 0 12px;font-size:13px;color:#555}
.legend span{margin-right:14px}
table{border-collapse:collapse;background:#fff}
th{position:sticky;top:0;background:#eee;font-size:13px;padding:6px;border-bottom:2px solid #bbb;z-index:1}
td{vertical-align:top;text-align:center;padding:4px;border-bottom:1px solid #ddd;font-size:12px;width:136px}
td.query{background:#f3f6fb;border-right:2px solid #bbb;position:sticky;left:0}
th:first-child{left:0;z-index:2}
.id{font-weight:600;word-break:break-all}
.score{font-family:ui-monospace,monospace}
.thumb{width:128px;height:128px;display:flex;align-items:center;justify-content:center;margin:2px auto;
 background:#f0f0f0;border:3px solid transparent;border-radius:4px}
.thumb img{max-width:128px;max-height:128px}
.thumb i{font-size:11px;color:#a33;padding:4px;overflow-wrap:anywhere}
.pass .thumb{border-color:#2a9d4a}
.below{opacity:.55}
.tag{display:inline-block;border-radius:3px;padding:1px 5px;margin:1px;font-size:11px;font-weight:600;color:#fff}
.tag.pass{background:#2a9d4a}.tag.true{background:#1f6fd1}.tag.false{background:#c0392b}
.tag.none{background:#777}.tag.keep{background:#2a9d4a}
.missed{font-size:11px}
.groups{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start}
.group{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px}
.group h2{font-size:14px;margin:0 0 6px}
.members{display:flex;flex-wrap:wrap;gap:6px}
.member{width:140px;text-align:center;font-size:12px}
.member.keep .thumb{border-color:#2a9d4a}
"""


def _page(title: str, body: list[str]) -> str:
    return '\n'.join([f'<!doctype html><html lang="en"><meta charset="utf-8"><title>{html.escape(title)}</title>',
                      f'<style>{STYLE}</style>', *body, '</html>'])


def _write(output: str | os.PathLike, text: str) -> None:
    with atomic_write(output) as tmp:
        tmp.write_text(text, encoding='utf-8')


class ImageFolders:
    """The image files a report may show: those read for this run, and those under the folders given.

    A descriptor file or a Milvus collection names image paths that anyone could have written: a
    crafted one would make the report embed (and so disclose) any image this user can read. Paths are
    compared after resolving symbolic links and ``..``, so neither leads out of a folder."""

    def __init__(self, folders: Iterable[str | os.PathLike] = (), read: Iterable[str | os.PathLike] = ()):
        from .descriptors import path_resolver
        self.folders = [os.path.realpath(folder) for folder in folders]
        self.read = {str(path) for path in read}
        self.real = path_resolver()  # realpath per shown path was O(depth^2) each down a deep chain

    def __call__(self, path: str) -> bool:
        if path in self.read:
            return True
        real = self.real(path)
        return any(real == folder or real.startswith(folder.rstrip(os.sep) + os.sep) for folder in self.folders)


NOT_ALLOWED = 'not shown: outside the folders given to this command (--report-images DIR shows it)'


class Thumbnails:
    """Each image's thumbnail cell as HTML, made once however often it is shown. Where there is none,
    the cell says why: no path known, the file is gone, it cannot be read, or ``allowed`` (a test of
    the path, e.g. :class:`ImageFolders`; None: every path) refuses it."""

    def __init__(self, allowed: Callable[[str], bool] | None = None) -> None:
        self._made: dict[str | None, str] = {}
        self.allowed = allowed

    def __call__(self, path: str | None, missing: str = 'no image path stored') -> str:
        if not path:
            return f'<div class="thumb"><i>{html.escape(missing)}</i></div>'
        if path not in self._made:
            if '\0' in path:  # a crafted descriptor file's: no file can have such a name (os calls raise)
                shown = '<i>not shown: the stored path holds a NUL byte, which no file name can</i>'
            elif self.allowed is not None and not self.allowed(path):
                shown = f'<i>{NOT_ALLOWED}</i>'
            else:
                shown = self._image(path)
            self._made[path] = f'<div class="thumb" title="{html.escape(path)}">{shown}</div>'
        return self._made[path]

    @staticmethod
    def _image(path: str) -> str:
        from ..images import ImageError, to_pil_rgb
        if not os.path.lexists(path):
            return f'<i>image gone: {html.escape(path)}</i>'
        try:  # as people see it (EXIF orientation); a JPEG is decoded at a fraction of its size
            image = to_pil_rgb(path, draft=(2 * THUMBNAIL, 2 * THUMBNAIL), exif_transpose=True)
        except ImageError as e:
            return f'<i>{html.escape(str(e))}</i>'
        image.thumbnail((THUMBNAIL, THUMBNAIL))
        buffer = io.BytesIO()
        image.save(buffer, 'JPEG', quality=70)
        return f'<img alt="" src="data:image/jpeg;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _summary(items: list[tuple[str, str]]) -> str:
    return '<div class="summary">' + ''.join(f'<div>{html.escape(label)}<b>{html.escape(value)}</b></div>'
                                             for label, value in items) + '</div>'


def search_report(output: str | os.PathLike, query_ids: Sequence[str], candidates: Sequence[Match], k: int,
                  query_paths: dict[str, str], reference_paths: dict[str, str] | Callable[[list[str]], dict[str, str]],
                  threshold: float | None = None,
                  truth: dict[str, set[str]] | None = None, max_queries: int = DEFAULT_REPORT_QUERIES,
                  reference_missing: str = 'no image path stored',
                  allowed: Callable[[str], bool] | None = None) -> None:
    """A page with each query (sorted by id, the first ``max_queries``) beside its ``k`` best
    ``candidates`` (all of them, whatever their score), under a summary of every query.

    Matches at or above ``threshold`` (those the prediction CSV keeps; all without a threshold) are
    marked, and a query with none says so. With ``truth`` (query -> true references, as
    :func:`metrics.read_ground_truth` reads them), each match of a labelled query is marked true or
    false, the references it missed are listed, and the summary gives the CSV's μAP.
    ``reference_paths``: id -> image path, or a function giving them for a list of ids (asked only
    for the references shown); ``reference_missing``: what a cell says where a path is unknown;
    ``allowed``: which image files may be shown (:class:`ImageFolders`; None: all).
    """
    from .engines import meets
    from .metrics import evaluate
    by_query: dict[str, list[Match]] = {q: [] for q in query_ids}
    for m in candidates:
        by_query.setdefault(m.query_id, []).append(m)
    for found in by_query.values():
        found.sort(key=lambda m: -m.score)

    def passes(m: Match) -> bool:  # as the prediction CSV keeps them: within float32 rounding
        return threshold is None or bool(meets(m.score, threshold))

    kept = [m for m in candidates if passes(m)]
    queries = sorted(by_query)
    shown = queries[:max_queries]
    if callable(reference_paths):  # e.g. a Milvus collection's: ask only for the references on the page
        wanted = {m.reference_id for q in shown for m in by_query[q]}
        wanted.update(ref for q in shown for ref in (truth or {}).get(q, ()))
        reference_paths = reference_paths(sorted(wanted))
    thumbs = Thumbnails(allowed)
    stated = 'none (all kept)' if threshold is None else f'{threshold:g}'
    summary = [('queries', f'{len(queries):,}'), ('matches per query (k)', str(k)), ('threshold', stated),
               ('matches at or above the threshold', f'{len(kept):,}'),
               ('queries with a match', f'{len({m.query_id for m in kept}):,}')]
    legend = ['<span><b class="tag pass">&#8805; T</b> at or above the threshold: in the prediction CSV</span>',
              '<span class="below">faded: below the threshold</span>']
    if truth is not None:
        result = evaluate(kept, truth)
        true_kept = sum(m.reference_id in truth.get(m.query_id, ()) for m in kept)
        positives = sum(len(refs) for refs in truth.values())
        summary += [('μAP (ground truth)', f"{result['average_precision']:.4f}"),
                    ('recall at precision 0.9', f"{result['recall_at_p90']:.4f}"),
                    ('true matches kept', f'{true_kept:,} of {positives:,}')]
        legend += ['<span><b class="tag true">&#10003; true</b> a copy, says the ground truth</span>',
                   '<span><b class="tag false">&#10007; false</b> not a copy</span>']
    body = ['<h1>Copy detection: search report</h1>', _summary(summary),
            f'<p class="legend">{"".join(legend)}</p>']
    if len(shown) < len(queries):
        body.append(f'<p class="legend">Showing the first {len(shown):,} of {len(queries):,} queries, sorted by id '
                    '(--report-queries shows more).</p>')
    columns = max((len(by_query[q]) for q in shown), default=0)  # k, or fewer where there are fewer references
    header = ['query'] + [f'match {n}' for n in range(1, columns + 1)] + (['missed (ground truth)'] if truth is not None else [])
    body.append('<table><thead><tr>' + ''.join(f'<th>{h}</th>' for h in header) + '</tr></thead><tbody>')
    for query in shown:
        found = by_query[query]
        labelled = truth is not None and query in truth
        refs = truth.get(query, set()) if truth is not None else set()
        tags = '' if any(passes(m) for m in found) else '<span class="tag none">no match</span>'
        if truth is not None and not labelled:
            tags += '<span class="tag none">not in ground truth</span>'
        cells = [f'<td class="query">{thumbs(query_paths.get(query))}<div class="id">{html.escape(query)}</div>{tags}</td>']
        for m in found:
            marks = '<b class="tag pass">&#8805; T</b>' if passes(m) and threshold is not None else ''
            if labelled:
                marks += ('<b class="tag true">&#10003; true</b>' if m.reference_id in refs
                          else '<b class="tag false">&#10007; false</b>')
            cells.append(f'<td class="{"pass" if passes(m) else "below"}">'
                         f'{thumbs(reference_paths.get(m.reference_id), reference_missing)}'
                         f'<div class="id">{html.escape(m.reference_id)}</div>'
                         f'<div class="score">{m.score:.4f}</div>{marks}</td>')
        cells += ['<td></td>'] * (columns - len(found))
        if truth is not None:
            missed = _missed(refs, found, passes, reference_paths, thumbs, reference_missing) if labelled else ''
            cells.append(f'<td class="missed">{missed}</td>')
        body.append('<tr>' + ''.join(cells) + '</tr>')
    body.append('</tbody></table>')
    _write(output, _page('Copy detection: search report', body))


def _missed(refs: set[str], found: list[Match], passes, reference_paths: dict[str, str], thumbs: Thumbnails,
            missing: str) -> str:
    """The true references a query's kept matches lack, each with where it ranked, if it did."""
    kept = {m.reference_id for m in found if passes(m)}
    rank = {m.reference_id: (n, m) for n, m in enumerate(found, start=1)}
    parts = []
    for ref in sorted(refs - kept):
        where = (f'rank {rank[ref][0]}, {rank[ref][1].score:.4f}: below the threshold' if ref in rank
                 else f'not among the {len(found)} found')
        parts.append(f'{thumbs(reference_paths.get(ref), missing)}<div class="id">{html.escape(ref)}</div>'
                     f'<div>{html.escape(where)}</div>')
    return ''.join(parts) or ('&#8212;' if refs else 'no copy to find')


@dataclass
class GroupMember:
    """One image of a near-duplicate group: ``score`` is its cosine similarity to the kept image (None
    for the kept one); width, height and bytes are None where the file cannot be read."""
    image_id: str
    path: str | None
    keep: bool
    score: float | None
    width: int | None
    height: int | None
    bytes: int | None


def describe_groups(groups, ids: Sequence[str], vectors, paths: dict[str, str]) -> list[list[GroupMember]]:
    """Each :class:`matching.DuplicateGroup` as its members, in the group's order (``vectors`` float32
    N x D in the order of ``ids``)."""
    import numpy as np
    position = {image: i for i, image in enumerate(ids)}
    described = []
    for group in groups:
        kept = vectors[position[group.keep]]
        members = []
        for image in group.members:
            score = None if image == group.keep else float(np.dot(vectors[position[image]], kept))
            members.append(GroupMember(image, paths.get(image), image == group.keep, score, *_image_facts(paths.get(image))))
        described.append(members)
    return described


def kept_first(group: Sequence[GroupMember]) -> list[GroupMember]:
    """The kept image, then the others from the most to the least similar to it."""
    return sorted(group, key=lambda m: (not m.keep, -(m.score or 0.0), m.image_id))


def _image_facts(path: str | None) -> tuple[int | None, int | None, int | None]:
    """(width, height, bytes) of an image file from its header; None for what cannot be known."""
    from ..images import ImageError, image_size
    if not path or not os.path.isfile(path):
        return None, None, None
    try:
        width, height = image_size(path, f'image file {path!r}')
    except ImageError:
        width = height = None
    return width, height, os.path.getsize(path)


def write_groups(path: str | os.PathLike, groups: Sequence[Sequence[GroupMember]]) -> None:
    """Groups (from :func:`describe_groups`) as JSON (``[{keep, members}]``) if ``path`` ends in .json,
    else CSV ``group,image_id,path,keep,score_to_kept,width,height,bytes`` (the kept image first, the
    others by decreasing score; empty where unknown; ids and paths a spreadsheet would take for formulas
    escaped: ``metrics.safe_cell``); through a temporary file."""
    from .metrics import safe_cell
    with atomic_write(path) as tmp, open(tmp, 'w', newline='', encoding='utf-8') as f:
        if str(path).lower().endswith('.json'):
            json.dump([{'keep': next(m.image_id for m in g if m.keep), 'members': [m.image_id for m in g]}
                       for g in groups], f, indent=1)
        else:
            writer = csv.writer(f)
            writer.writerow(['group', 'image_id', 'path', 'keep', 'score_to_kept', 'width', 'height', 'bytes'])
            for n, group in enumerate(groups, start=1):
                writer.writerows([n, safe_cell(m.image_id), safe_cell(m.path or ''), m.keep, '' if m.score is None else f'{m.score:.6f}',
                                  *('' if v is None else v for v in (m.width, m.height, m.bytes))] for m in kept_first(group))


def groups_report(output: str | os.PathLike, groups: Sequence[Sequence[GroupMember]], images: int,
                  threshold: float, allowed: Callable[[str], bool] | None = None) -> None:
    """A page with every group (from :func:`describe_groups`) as a row of thumbnails, largest groups
    first: the kept image marked, each other one with its score to the kept one, resolution and size.
    ``allowed``: which image files may be shown (:class:`ImageFolders`; None: all)."""
    thumbs = Thumbnails(allowed)
    ordered = sorted(groups, key=len, reverse=True)  # stable: groups of one size keep their order
    body = ['<h1>Near-duplicate groups</h1>',
            _summary([('images', f'{images:,}'), ('groups', f'{len(groups):,}'),
                      ('images in groups', f'{sum(map(len, groups)):,}'),
                      ('copies that could go', f'{sum(len(g) - 1 for g in groups):,}'),
                      ('threshold', f'{threshold:g}')]),
            '<p class="legend"><span><b class="tag keep">keep</b> the suggested copy to keep: the largest resolution, '
            'then the largest file</span><span>score: cosine similarity to the kept image</span></p>']
    if not groups:
        body.append('<p>No near-duplicates at this threshold.</p>')
    body.append('<div class="groups">')
    for n, group in enumerate(ordered, start=1):
        cards = []
        for m in kept_first(group):
            size = '' if m.width is None else f'{m.width}&#215;{m.height}'
            size += '' if m.bytes is None else f' &#183; {_file_size(m.bytes)}'
            label = ('<b class="tag keep">keep</b>' if m.keep
                     else f'<div class="score">score {m.score:.4f}</div>')
            cards.append(f'<div class="member{" keep" if m.keep else ""}">{thumbs(m.path)}'
                         f'<div class="id">{html.escape(m.image_id)}</div>{label}<div>{size}</div></div>')
        body.append(f'<div class="group"><h2>Group {n}: {len(group)} images</h2>'
                    f'<div class="members">{"".join(cards)}</div></div>')
    body.append('</div>')
    _write(output, _page('Near-duplicate groups', body))


def _file_size(size: int) -> str:
    for unit in ('B', 'KB', 'MB'):
        if size < 1024 or unit == 'MB':
            return f'{size:.0f} {unit}' if unit == 'B' else f'{size:.1f} {unit}'
        size /= 1024
    return f'{size:.1f} GB'
