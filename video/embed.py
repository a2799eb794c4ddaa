"""``video embed``: videos -> frame descriptors in VSC's npz, resumably, one video at a time.

A worker thread decodes and samples frames (``reader.in_background``) while the operator embeds the
previous batch, so decoding is not the bottleneck; each finished video is saved at once as a part
(``storage.Parts``), so an interrupted run redoes at most one video.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..progress import shown
from ..atomic import sole_writer
from ..images import ImageError
from .reader import AHEAD_BYTES, VideoError, find_videos, in_background, sample_frames
from .storage import Parts, VideoFeatures, write_video_descriptors

# Frames of one video handed to the operator in one call. It runs them in its own batches
# (``batch_size``: 1 on the CPU) and, within one call, preprocesses the next batch in a thread while the
# network runs the current one, as when it is given all the frames at once; called batch by batch it
# cannot overlap them. (benchmarks/video.py's seeds 0-7's references on a loaded machine, per CPU-second:
# a median of 85 % of the operator's rate batch by batch, 89 % in calls of up to 32 frames; README Videos.)
CHUNK = 32


def _chunk(op) -> int:
    """Frames per operator call: whole batches of the operator's, at least ``CHUNK`` frames."""
    batch = op.batch_size or 8
    return max(1, -(-CHUNK // batch)) * batch


def _full(pending: list[np.ndarray], chunk: int) -> bool:
    """Whether the frames waiting for the operator make a call: ``chunk`` frames, or fewer large ones
    (``AHEAD_BYTES``: memory does not grow with the frames' size). The same rule in both embedding
    functions, so a frame's batch, and its vector, is the same in both."""
    return len(pending) >= chunk or sum(rgb.nbytes for rgb in pending) >= AHEAD_BYTES


def _embedded(op, frames: list[np.ndarray], path) -> list[np.ndarray]:
    """The operator's vectors of one video's frames; a frame it cannot use is that video's error."""
    try:
        return op(frames)
    except ImageError as e:
        raise VideoError(f'{str(path)!r}: {e}') from None


def _frame_bytes(item: tuple) -> int:
    rgb = item[1]
    return rgb.nbytes if rgb is not None else 0


def _frames_of(videos: Sequence[Path], todo: Sequence[int], fps: float, max_duration: float | None
               ) -> Iterator[tuple[int, np.ndarray | None, tuple[float, float] | None, str]]:
    """(video number, frame, interval, '') for each sample, then (number, None, None, '') at each
    video's end, or (number, None, None, reason) when a video cannot be read."""
    for n in todo:
        try:
            for rgb, start, end in sample_frames(videos[n], fps, max_duration):
                yield n, rgb, (start, end), ''
        except VideoError as e:
            yield n, None, None, str(e)
            continue
        yield n, None, None, ''


def video_ids(videos: Sequence[Path]) -> list[str]:
    """File names without extension (VSC's ids); two videos with one id are refused."""
    seen: dict[str, Path] = {}
    for path in videos:
        other = seen.setdefault(path.stem, path)
        if other != path:
            raise ValueError(f'two videos have the same id {path.stem!r}: {other} and {path}; '
                             'ids are file names without extension, so rename one')
    return list(seen)


def embed_video(path: str | Path, op, fps: float = 1.0, max_duration: float | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """One video's frame vectors (float32 (n, D)) and intervals (float64 (n, 2)), embedded in batches of
    the operator's batch size as :func:`embed_videos` embeds them (so the vectors are the same); decoding
    runs in a worker thread. A video that cannot be used raises ``VideoError``."""
    chunk = _chunk(op)
    vectors, intervals, pending = [], [], []
    for rgb, start, end in in_background(sample_frames(path, fps, max_duration), size=lambda item: item[0].nbytes,
                                           max_bytes=AHEAD_BYTES):
        pending.append(rgb)
        intervals.append((start, end))
        if _full(pending, chunk):
            vectors.extend(_embedded(op, pending, path))
            pending = []
    if pending:
        vectors.extend(_embedded(op, pending, path))
    if not vectors:
        raise VideoError(f'{path}: no frames')
    return np.stack(vectors).astype(np.float32), np.array(intervals, dtype=np.float64)


def embed_videos(inputs: Sequence[str], output: str, embedder, fps: float = 1.0, max_duration: float | None = None,
                 quiet: bool = False, ray_address: str | None = None,
                 cpus_per_task: float = 1) -> tuple[int, dict[Path, str], float, int]:
    """Embed the frames of videos into one VSC descriptor file.

    Args:
        inputs: video files, folders, globs.
        embedder: a ``workflow.embedding.Embedder`` (the operator and its settings).
        ray_address: embed on this Ray cluster instead, one task per video, each reserving
            ``cpus_per_task`` CPUs (its threads); videos, checkpoint and output folder must be at the
            same paths on every node.

    Returns (videos written, {skipped video: reason}, frames embedded per second, frames written).
    With ``embedder.strict`` an unreadable video is an error (raised at once); otherwise it is skipped.
    A second embed into the same ``output`` while this one runs fails at once (``atomic.Busy``): the two
    would share, then remove, its parts folder.
    """
    with sole_writer(output, 'towhee-isc video embed'):
        return _embed_videos(inputs, output, embedder, fps, max_duration, quiet, ray_address, cpus_per_task)


def _embed_videos(inputs: Sequence[str], output: str, embedder, fps: float, max_duration: float | None,
                  quiet: bool, ray_address: str | None, cpus_per_task: float) -> tuple[int, dict[Path, str], float, int]:
    videos = find_videos(inputs)
    ids = video_ids(videos)
    op = embedder.op  # a settings error stops here, before any output
    model, postprocessing = op.fingerprint, embedder.postprocessing
    parts = Parts(output, {'videos': [str(v) for v in videos], 'fps': fps, 'max_duration': max_duration,
                           'model': model, 'postprocessing': postprocessing})
    done = parts.done()
    todo = [n for n in range(len(videos)) if n not in done]
    chunk = _chunk(op)
    bar = None
    if shown(quiet):  # only where someone watches: a terminal, or TOWHEE_ISC_PROGRESS=1
        from tqdm import tqdm
        bar = tqdm(total=len(videos), initial=len(done), unit='video', file=sys.stderr, smoothing=0.1)
    started, embedded, seconds_embedding = time.perf_counter(), 0, 0.0
    pending: list[np.ndarray] = []
    vectors: list[np.ndarray] = []
    intervals: list[tuple[float, float]] = []

    def flush(n: int) -> str:
        """Embed the frames waiting (of video ``n``): '' or why that video cannot be used."""
        nonlocal embedded
        try:
            if pending:
                vectors.extend(_embedded(op, list(pending), videos[n]))
                embedded += len(pending)
            return ''
        except VideoError as e:
            return str(e)
        finally:
            pending.clear()

    def save(n: int, features: np.ndarray | None, frame_intervals: np.ndarray | None, failure: str) -> None:
        if failure and embedder.strict:
            raise VideoError(failure)
        parts.save(n, features if not failure else np.zeros((0, 0), np.float32),
                   frame_intervals if not failure else np.zeros((0, 2)), failure)
        if bar:
            bar.update(1)
            bar.set_postfix(frames=embedded)

    try:
        if ray_address is not None:
            from .ray import embed_on_ray

            def count(n, features, frame_intervals, failure):
                nonlocal embedded
                embedded += 0 if failure else len(features)
                save(n, features, frame_intervals, failure)
            embed_on_ray([(n, videos[n]) for n in todo], ray_address, embedder.isc_kwargs, fps, max_duration,
                         cpus_per_task, count)
            todo = []
        failed = ''  # why the video being read cannot be used, once its frames showed it: the rest are dropped
        for n, rgb, interval, failure in in_background(_frames_of(videos, todo, fps, max_duration), size=_frame_bytes,
                                                        max_bytes=AHEAD_BYTES):
            if rgb is not None:
                if not failed:
                    pending.append(rgb)
                    intervals.append(interval)
                    if _full(pending, chunk):
                        failed = flush(n)
                        if bar:
                            bar.set_postfix(frames=embedded, refresh=False)
                continue
            if not (failed or failure):
                failed = flush(n)
            pending.clear()
            failure = failed or failure
            save(n, np.stack(vectors) if vectors else np.zeros((0, 0), np.float32), np.array(intervals), failure)
            vectors.clear(), intervals.clear()
            failed = ''
    finally:
        if bar:
            bar.close()
    seconds_embedding = time.perf_counter() - started
    kept, kept_paths, skipped = [], [], {}
    for n, path in enumerate(videos):
        features, timestamps, failure = parts.load(n)
        if failure:
            skipped[path] = failure
        else:
            kept.append(VideoFeatures(ids[n], features, timestamps))
            kept_paths.append(str(path))
    if not kept:
        parts.remove()
        first = next(iter(skipped.items()))
        raise ValueError(f'none of the {len(videos)} videos could be read (the first, {first[0]}: {first[1]}); '
                         'nothing was written')
    write_video_descriptors(output, kept, model, postprocessing, fps, kept_paths)
    parts.remove()
    frames = sum(len(v) for v in kept)
    return len(kept), skipped, embedded / seconds_embedding if seconds_embedding else 0.0, frames
