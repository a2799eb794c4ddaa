"""``video embed``: videos -> frame descriptors in VSC's npz, resumably, one video at a time.

Worker threads decode and sample frames (``reader.in_background``; for a GPU, several videos at once).
The operator takes them as one stream (``Isc.embed_stream``) in its batches across videos' ends,
resizing the next batch while the network runs one, so neither decoding nor a video's end leaves the
network waiting. Each video is saved as a part (``storage.Parts``) once its last frame has its vector,
so an interrupted run redoes at most the videos of the batches in flight.
"""
from __future__ import annotations

import sys
import time
from collections import defaultdict, deque
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..progress import shown
from ..atomic import sole_writer
from ..defaults import cpu_count
from ..images import ImageError
from ..workflow.descriptors import file_stamp
from .reader import AHEAD_BYTES, VideoError, find_videos, in_background, sample_frames
from .storage import Parts, write_frames


def _vectors(op, frames: list[np.ndarray], path) -> list[np.ndarray]:
    """The operator's vectors of one video's frames; a frame it cannot use is that video's error."""
    try:
        return op(frames)
    except ImageError as e:
        raise VideoError(f'{str(path)!r}: {e}') from None


def _frame_bytes(item: tuple) -> int:
    rgb = item[1]
    return rgb.nbytes if rgb is not None else 0


def frame_side(op) -> int | None:
    """The longest side a frame is decoded at for ``op`` (``sample_frames``'s ``max_side``): 4x its input
    side, so the operator's own resize still averages several pixels into one, and an 81-MP frame costs
    no more than a 4-MP one."""
    size = getattr(op, 'img_size', None)
    return 4 * size if isinstance(size, int) else None


def _frames_of(videos: Sequence[Path], todo: Sequence[int], fps: float, max_duration: float | None,
               max_side: int | None, cpus: int | None = None
               ) -> Iterator[tuple[int, np.ndarray | None, tuple[float, float] | None, str]]:
    """(video number, frame, interval, '') for each sample, then (number, None, None, '') at each
    video's end, or (number, None, None, reason) when a video cannot be read. ``cpus``: ``sample_frames``'."""
    for n in todo:
        try:
            for rgb, start, end in sample_frames(videos[n], fps, max_duration, max_side, cpus=cpus):
                yield n, rgb, (start, end), ''
        except VideoError as e:
            yield n, None, None, str(e)
            continue
        yield n, None, None, ''


def _decoded(videos: Sequence[Path], todo: Sequence[int], fps: float, max_duration: float | None,
             max_side: int | None, decoders: int) -> Iterator[tuple[int, np.ndarray | None, tuple[float, float] | None, str]]:
    """What ``_frames_of`` gives, in its order, from up to ``decoders`` videos decoded at once, each in its
    own thread (FFmpeg releases the GIL), ``AHEAD_BYTES`` ahead in all. One thread decodes 140-340
    frames/s of benchmarks/video.py's videos, what an H200 embeds: alone it would hold the GPU back.

    The decoders share the CPUs for FFmpeg's threads: each asking for all of them cost 30 % more CPU time
    on the benchmark's small frames (2 cores: 0.48 against 0.34 CPU-s for 615 samples, and no faster)."""
    upcoming = iter(todo)
    cpus = max(1, cpu_count() // decoders)
    streams: deque[Iterator] = deque()

    def start_next() -> None:
        n = next(upcoming, None)
        if n is not None:
            streams.append(in_background(_frames_of(videos, [n], fps, max_duration, max_side, cpus), size=_frame_bytes,
                                         max_bytes=AHEAD_BYTES // decoders))
    try:
        for _ in range(decoders):
            start_next()
        while streams:
            yield from streams[0]
            streams.popleft()
            start_next()
    finally:
        for stream in streams:
            stream.close()


def _decoders(op) -> int:
    """Videos decoded at once: up to 4 for a GPU, 2 where the network runs on the CPU. One thread left the
    operator waiting at each video's start: on 2 cores (resnet18 at 96 px, 22 videos) `video embed` ran
    191-225 frames/s with one, 220-259 with two, the operator alone 281-313 on the same frames."""
    device = getattr(op, 'device', None)
    return max(1, min(4, cpu_count() // 2)) if getattr(device, 'type', 'cpu') == 'cuda' else min(2, cpu_count())


def video_ids(videos: Sequence[Path]) -> list[str]:
    """File names without extension (VSC's ids); two videos with one id are refused."""
    seen: dict[str, Path] = {}
    for path in videos:
        other = seen.setdefault(path.stem, path)
        if other != path:
            raise ValueError(f'two videos have the same id {path.stem!r}: {other} and {path}; '
                             'ids are file names without extension, so rename one')
    return list(seen)


def embed_video(path: str | Path, op, fps: float = 1.0, max_duration: float | None = None,
                cpus: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One video's frame vectors (float32 (n, D)) and intervals (float64 (n, 2)), embedded as
    :func:`embed_videos` embeds them (on a GPU a frame's batch can differ: the same to float rounding);
    decoding runs in a worker thread, FFmpeg's decoding threads up to ``cpus`` (default: all this process may use). A
    video that cannot be used raises ``VideoError``."""
    intervals, repeats = [], []  # repeats[i]: sample i is sample i - 1's frame again (its vector is reused)

    def frames() -> Iterator[np.ndarray]:
        last = None
        samples = sample_frames(path, fps, max_duration, frame_side(op), cpus=cpus)
        for rgb, start, end in in_background(samples, size=lambda item: item[0].nbytes, max_bytes=AHEAD_BYTES):
            intervals.append((start, end))
            repeats.append(rgb is last)
            if rgb is not last:
                last = rgb
                yield rgb
    try:
        unique = iter(list(op.embed_stream(frames(), max_batch_bytes=AHEAD_BYTES)))
    except ImageError as e:
        raise VideoError(f'{str(path)!r}: {e}') from None
    vectors: list[np.ndarray] = []
    for again in repeats:
        vectors.append(vectors[-1] if again else next(unique))
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
    # Taken before any video is decoded: a file changed after this is found changed by the next resume.
    stamps = [file_stamp(v) for v in videos]
    done = parts.done(stamps)
    todo = [n for n in range(len(videos)) if n not in done]
    bar = None
    if shown(quiet):  # only where someone watches: a terminal, or TOWHEE_ISC_PROGRESS=1
        from tqdm import tqdm
        bar = tqdm(total=len(videos), initial=len(done), unit='video', file=sys.stderr, smoothing=0.1)
    started, embedded = time.perf_counter(), 0
    vectors: dict[int, list[np.ndarray]] = defaultdict(list)
    intervals: dict[int, list[tuple[float, float]]] = defaultdict(list)
    failures: dict[int, str] = {}  # why a video cannot be used, once known: its later frames are dropped
    # What was handed to the operator, in order: (n, interval, frame) per frame until its vector comes
    # back, (n, interval, None) for a sample repeating the frame before (its vector is reused: a 9000 x
    # 9000 frame held for 100 s was converted and resized 100 times, 193 CPU-s), (n, None, None) at video
    # n's end. Appended by the operator's worker thread as it takes frames.
    handed: deque[tuple[int, tuple[float, float] | None, np.ndarray | None]] = deque()

    def frames() -> Iterator[np.ndarray]:
        last = None  # a sample that is the frame before again (a still, a long frame) is not embedded again
        for n, rgb, interval, failure in _decoded(videos, todo, fps, max_duration, frame_side(op), _decoders(op)):
            if failure:
                failures.setdefault(n, failure)
            if rgb is None:
                handed.append((n, None, None))
                last = None
            elif n not in failures:
                handed.append((n, interval, None if rgb is last else rgb))
                if rgb is not last:
                    last = rgb
                    yield rgb

    def save(n: int) -> None:
        failure = failures.pop(n, '')
        features, frame_intervals = vectors.pop(n, []), intervals.pop(n, [])
        if failure and embedder.strict:
            raise VideoError(failure)
        if not failure and not features:
            failure = f'{str(videos[n])!r}: no frames'
        parts.save(n, np.stack(features) if not failure else np.zeros((0, 0), np.float32),
                   np.array(frame_intervals) if not failure else np.zeros((0, 2)), failure, stamps[n])
        if bar:
            bar.update(1)
            bar.set_postfix(frames=embedded)

    def keep(n: int, interval: tuple[float, float], vector: np.ndarray) -> None:
        nonlocal embedded
        if n not in failures:
            vectors[n].append(vector)
            intervals[n].append(interval)
            embedded += 1

    def settle() -> None:
        """Give repeated samples their frame's vector, and save each video whose end was handed on and
        whose frames all have their vectors."""
        while handed and handed[0][2] is None:
            n, interval, _ = handed.popleft()
            if interval is None:
                save(n)
            elif n not in failures and vectors[n]:
                keep(n, interval, vectors[n][-1])

    try:
        if ray_address is not None:
            from .ray import embed_on_ray

            def count(n, features, frame_intervals, failure):
                nonlocal embedded
                if failure:
                    failures[n] = failure
                else:
                    embedded += len(features)
                    vectors[n], intervals[n] = list(features), list(frame_intervals)
                save(n)
            embed_on_ray([(n, videos[n]) for n in todo], ray_address, embedder.isc_kwargs, fps, max_duration,
                         cpus_per_task, count)
            todo = []
        source = frames()
        while True:
            try:
                for vector in op.embed_stream(source, max_batch_bytes=AHEAD_BYTES):
                    settle()
                    n, interval, _ = handed.popleft()
                    keep(n, interval, vector)
                break
            except ImageError:
                # A frame of the batch taken last: what is still handed on is that batch (the vectors
                # before it all came back). Each of its videos' frames run alone name the one at fault;
                # then the stream goes on from the next frame.
                settle()
                while handed:
                    n = handed[0][0]
                    run = []
                    while handed and handed[0][0] == n and handed[0][2] is not None:
                        run.append(handed.popleft())
                    try:
                        for (_, interval, _), vector in zip(run, _vectors(op, [rgb for _, _, rgb in run], videos[n])):
                            keep(n, interval, vector)
                    except VideoError as e:
                        failures.setdefault(n, str(e))
                    settle()
        settle()
    except BaseException as e:
        if not isinstance(e, VideoError):  # interrupted: keep the videos whose vectors all came back
            settle()
        raise
    finally:
        if bar:
            bar.close()
    seconds_embedding = time.perf_counter() - started
    kept, times, kept_paths, skipped = [], [], [], {}  # the features stay in the parts until written
    for n, path in enumerate(videos):
        timestamps, failure = parts.load_times(n)
        if failure:
            skipped[path] = failure
        else:
            kept.append(n)
            times.append(timestamps)
            kept_paths.append(str(path))
    if not kept:
        parts.remove()
        first = next(iter(skipped.items()))
        raise ValueError(f'none of the {len(videos)} videos could be read (the first, {first[0]}: {first[1]}); '
                         'nothing was written')
    write_frames(output, [ids[n] for n in kept], times, lambda i: parts.features(kept[i]), model, postprocessing,
                 fps, kept_paths)
    parts.remove()
    frames = sum(len(t) for t in times)
    return len(kept), skipped, embedded / seconds_embedding if seconds_embedding else 0.0, frames
