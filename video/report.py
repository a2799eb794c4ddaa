"""``video search --report``: an HTML page (images embedded) showing each match: the query's and the
reference's frames side by side along the aligned path, and the pair's similarity matrix with the path
and the segment's box drawn on it. Frames are shown only of videos under the folders the user named
(``--report-videos``): a descriptor file's recorded paths could name any file this user can read."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from ..atomic import atomic_write
from .reader import VideoError, sample_frames
from .storage import VideoSet

THUMB = 96          # frame thumbnails' longer side, pixels
FRAMES_SHOWN = 6    # frame pairs shown per match, evenly along its path
MATCHES_SHOWN = 50  # the best matches only
NOT_ALLOWED = 'not shown: outside the folders given (--report-videos DIR shows them)'


def _png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format='PNG')
    return 'data:image/png;base64,' + base64.b64encode(buffer.getvalue()).decode()


def similarity_image(sims: np.ndarray, path: np.ndarray, box: tuple[int, int, int, int], cell: int = 4) -> Image.Image:
    """The matrix in grey (query frames down, reference frames across), the path in red, the box in yellow."""
    low, high = float(sims.min()), float(sims.max())
    grey = np.uint8(255 * (sims - low) / (high - low or 1.0))
    image = Image.fromarray(grey, 'L').convert('RGB').resize((sims.shape[1] * cell, sims.shape[0] * cell), Image.NEAREST)
    draw = ImageDraw.Draw(image)
    q0, r0, q1, r1 = box
    draw.rectangle((r0 * cell, q0 * cell, (r1 + 1) * cell - 1, (q1 + 1) * cell - 1), outline=(255, 220, 0))
    for q, r in path:
        draw.rectangle((r * cell + 1, q * cell + 1, (r + 1) * cell - 2, (q + 1) * cell - 2), fill=(220, 30, 30))
    return image


class _Thumbs:
    """The thumbnails of the frames a page shows, each video decoded once and only as far as its last frame
    shown (a 4-hour video was decoded whole and each of its 14,400 samples kept, about 290 MB); only of
    the paths ``allowed`` accepts. ``wanted``: video path -> the seconds shown (samples at 1 per second)."""

    def __init__(self, allowed: Callable[[str], bool], wanted: dict[str, set[int]]):
        self.cache: dict[str, dict[int, Image.Image] | None] = {}
        self.allowed, self.wanted = allowed, wanted
        self.refused = 0  # paths not shown because they lie outside the allowed folders

    def get(self, path: str | None, seconds: float) -> str:
        """The thumbnail of the frame on screen at ``seconds``."""
        if path is None:
            return ''
        if path not in self.cache and not self.allowed(path):
            self.cache[path] = None
            self.refused += 1
        if path not in self.cache:
            self.cache[path] = self._decode(path, self.wanted.get(path, set()))
        frames = self.cache[path]
        return _png(frames[int(seconds)]) if frames and int(seconds) in frames else ''

    @staticmethod
    def _decode(path: str, wanted: set[int]) -> dict[int, Image.Image] | None:
        frames: dict[int, Image.Image] = {}
        last, image = None, None
        try:
            for index, (rgb, _, _) in enumerate(sample_frames(path, max_side=2 * THUMB, keep_aspect=True)):
                if index > max(wanted, default=-1):
                    break
                if index in wanted:
                    if rgb is not last:  # a sample repeating the frame before shares its thumbnail
                        image, last = Image.fromarray(rgb), rgb
                        image.thumbnail((THUMB, THUMB))
                    frames[index] = image
        except (VideoError, OSError, ImportError):
            return None
        return frames


def html_report(output: str, found: list, queries: VideoSet, refs: VideoSet,
                allowed: Callable[[str], bool]) -> None:
    """Write the page for ``found`` ((candidate, similarity matrix or None, box, segment) per match); frames of
    the videos whose path ``allowed`` accepts (``workflow.reports.ImageFolders``)."""
    ranked = sorted(found, key=lambda item: -item[3].score)[:MATCHES_SHOWN]
    q_paths, r_paths = queries.paths or {}, refs.paths or {}
    q_videos, r_videos = {v.video_id: v for v in queries.videos}, {v.video_id: v for v in refs.videos}
    shown = [(segment, sims, box, box.path[np.linspace(0, len(box.path) - 1, min(FRAMES_SHOWN, len(box.path)))
                                           .round().astype(int)]) for _, sims, box, segment in ranked]
    wanted: dict[str, set[int]] = {}
    for segment, _, _, steps in shown:
        for q, r in steps.tolist():
            for path, times in ((q_paths.get(segment.query_id), q_videos[segment.query_id].timestamps[q]),
                                (r_paths.get(segment.ref_id), r_videos[segment.ref_id].timestamps[r])):
                if path is not None:
                    wanted.setdefault(path, set()).add(int(times.mean()))
    thumbs = _Thumbs(allowed, wanted)
    parts = ['<!doctype html><meta charset="utf-8"><title>video matches</title><style>body{font-family:sans-serif}'
             'td{vertical-align:top;padding:4px}img{image-rendering:pixelated}.pair img{margin:1px}</style>',
             f'<h1>{len(found)} matches (the best {len(ranked)} shown)</h1>']
    for n, (segment, sims, box, steps) in enumerate(shown, start=1):
        q_times, r_times = q_videos[segment.query_id].timestamps, r_videos[segment.ref_id].timestamps
        rows = ''.join(
            f'<tr><td>{q_times[q].mean():.1f} s</td>'
            f'<td><img src="{thumbs.get(q_paths.get(segment.query_id), q_times[q].mean())}"></td>'
            f'<td><img src="{thumbs.get(r_paths.get(segment.ref_id), r_times[r].mean())}"></td>'
            f'<td>{r_times[r].mean():.1f} s</td><td>{"" if sims is None else f"{sims[q, r]:.3f}"}</td></tr>'
            for q, r in steps.tolist())
        # None: a pair too large to hold (localization.LargePair), and to draw
        corners = (box.query_first, box.ref_first, box.query_last, box.ref_last)
        matrix = '<p>(the similarity matrix is too large to draw)</p>' if sims is None else \
            f'<img src="{_png(similarity_image(sims, box.path, corners))}" title="query frames down, reference frames across">'
        parts.append(
            f'<h2>{n}. {html.escape(segment.query_id)} {segment.query_start:.1f}-{segment.query_end:.1f} s = '
            f'{html.escape(segment.ref_id)} {segment.ref_start:.1f}-{segment.ref_end:.1f} s (score {segment.score:.3f})</h2>'
            f'<table><tr><td><table class="pair"><tr><th>query at</th><th>query</th><th>reference</th>'
            f'<th>reference at</th><th>similarity</th></tr>{rows}</table></td>'
            f'<td>{matrix}</td></tr></table>')
    if thumbs.refused:
        parts.insert(2, f'<p>Frames of {thumbs.refused} video(s) {html.escape(NOT_ALLOWED)}.</p>')
    with atomic_write(output) as tmp:
        Path(tmp).write_text('\n'.join(parts), encoding='utf-8')
