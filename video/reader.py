"""Reading frames: a video file -> RGB frames sampled at a fixed rate, each with the interval of
seconds it stands for (VSC's baseline samples 1 frame per second). Decoding is PyAV's (FFmpeg's
libraries come in its wheel): any container and codec FFmpeg reads. Frames are turned upright as
the stream's display matrix (a phone's rotation metadata) says.
"""
from __future__ import annotations

import math
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np

from ..defaults import cpu_count
from ..images import max_pixels, regular_file, ImageError
from .cli import MAX_DURATION_S  # argparse only: towhee_frames bounds a video as `video embed` does by default

# Camcorders write AVCHD (.mts, .m2ts), DVDs .vob, broadcast .mxf: a folder gives them all, and no output replaces one.
VIDEO_SUFFIXES = {'.mp4', '.m4v', '.mov', '.mkv', '.webm', '.avi', '.mpg', '.mpeg', '.ts', '.flv', '.wmv', '.3gp',
                  '.ogv', '.gif', '.mts', '.m2ts', '.m2t', '.vob', '.mxf', '.dv', '.asf', '.f4v', '.3g2', '.mk3d'}



def is_media_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a regular file that starts as a video container does, whatever its name: ISO
    media (MP4, MOV, 3GP, and HEIC/AVIF photos, which share their boxes), Matroska/WebM, RIFF (AVI), MPEG
    program or transport streams (camcorders' .MOD/.TOD, AVCHD), FLV, ASF/WMV, Ogg."""
    try:
        if not os.path.isfile(path):
            return False
        with open(path, 'rb') as f:
            head = f.read(200)
        size = os.path.getsize(path)
    except OSError:
        return False
    box = int.from_bytes(head[:4], 'big')  # an ISO media box's size: 0 (to the end), 1 (64-bit) or within the file
    return ((head[4:8] in (b'ftyp', b'moov', b'mdat', b'wide', b'free', b'skip') and (box in (0, 1) or 8 <= box <= size))
            or head.startswith((b'\x1a\x45\xdf\xa3', b'RIFF', b'\x00\x00\x01\xba', b'\x00\x00\x01\xb3', b'FLV',
                                b'\x30\x26\xb2\x75', b'OggS'))
            or head[0:1] == head[188:189] == b'\x47'  # transport stream packets (188 bytes)
            or head[4:5] == head[196:197] == b'\x47')  # ... with a 4-byte time code (.m2ts)


# Decoded frames held ahead of the operator, at most (one frame always passes): 96 frames of 81 MP, as
# the frame count alone allowed, were 23 GB; 4K frames (25 MB) still fill the operator's batches.
AHEAD_BYTES = 256 * 2**20
# Decoding costs ~1 ns a pixel of every frame, sampled or not, and codecs compress a frame that repeats
# the one before to tens of bytes: a 23 KB GIF of 1,000 one-pixel frames on a 9000x9000 canvas decoded to
# 81 GP (71 CPU-s), 1,000 copies of a 49-byte H.264 skip frame to 83 GP (99 CPU-s). A video may decode to
# FREE_PIXELS, plus PIXELS_PER_BYTE a byte of its file (an ordinary video is ~100 pixels a byte, 1080p at
# 5 Mbit/s; a still picture with sound ~5,000), plus PIXELS_PER_SAMPLED_SECOND (a 4K video's second at
# 30 frames) for each second that a frame of its own is sampled for, up to SAMPLED_PIXELS_PER_BYTE a byte:
# x264 stores a still 4K frame in ~320 bytes (~26,000 pixels a byte), and a silent 4K slide was refused
# after 87 s by the bytes alone; a crafted GIF of 70 bytes a second, one new 81-MP frame every 0.33 s,
# bought 29 GP with 8 KB by its length alone. One frame shown for hours counts once.
FREE_PIXELS = 4 * 10**9
PIXELS_PER_BYTE = 20_000
PIXELS_PER_SAMPLED_SECOND = 3840 * 2160 * 30
SAMPLED_PIXELS_PER_BYTE = 200_000


def decode_budget(file_bytes: int, sampled_seconds: float = 0.0) -> int:
    """The pixels a video file of ``file_bytes`` may decode to, all its frames counted, once frames of its
    own were sampled for ``sampled_seconds`` (samples of distinct frames, each standing for 1/fps s)."""
    sampled = min(int(PIXELS_PER_SAMPLED_SECOND * sampled_seconds), SAMPLED_PIXELS_PER_BYTE * file_bytes)
    return FREE_PIXELS + PIXELS_PER_BYTE * file_bytes + sampled


# What FFmpeg's decoding threads may hold in frames of their own, roughly (see _decode_threads).
DECODER_BYTES = 256 * 2**20
# FFmpeg's decoding threads for one video, at most, whatever size the container reports: that size is the
# first frame's, and a stream may grow after it (16x16 then 9000x9000: FFmpeg's own count, 16 threads on 16
# CPUs, held 3,339 MB against 858 MB with 2). `video embed` decodes up to 4 videos at once for a GPU.
MAX_DECODE_THREADS = 4


class VideoError(ValueError):
    """One video cannot be used (missing, not a video, damaged, empty, too long or too large)."""


def _av():
    try:
        import av
    except ImportError as e:
        raise ImportError(f'reading videos needs PyAV: pip install "towhee-isc[video]" ({e})') from e
    return av


@dataclass(frozen=True)
class VideoInfo:
    """What the container says before anything is decoded."""

    duration: float   # seconds (0 if the container does not say)
    width: int
    height: int


def _open(path: Path):
    av = _av()
    try:
        regular_file(path)
    except ImageError as e:
        raise VideoError(str(e).replace('an image file', 'a video file').replace('image file', 'video file')) from None
    if path.stat().st_size == 0:
        raise VideoError(f'{str(path)!r} is empty (0 bytes)')
    try:
        container = av.open(str(path), metadata_errors='ignore')
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as e:
        raise VideoError(f'{str(path)!r} is not a readable video ({_reason(e)})') from None
    if not container.streams.video:
        audio = bool(container.streams.audio)
        container.close()
        raise VideoError(f'{str(path)!r} has no video stream' + (' (audio only)' if audio else ''))
    return container


def _reason(e: Exception) -> str:
    return ' '.join(str(getattr(e, 'strerror', None) or e).split()) or type(e).__name__


def probe(path: str | os.PathLike) -> VideoInfo:
    """Duration and size from the container's headers; a file that is no video is an error."""
    with _open(Path(path)) as container:
        return _info(container)


def _info(container) -> VideoInfo:
    stream = container.streams.video[0]
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / 1_000_000  # AV_TIME_BASE
    else:
        duration = 0.0
    ctx = stream.codec_context
    return VideoInfo(duration, ctx.width or 0, ctx.height or 0)


def sample_frames(path: str | os.PathLike, fps: float = 1.0, max_duration: float | None = None,
                  max_side: int | None = None, keep_aspect: bool = False, cpus: int | None = None
                  ) -> Iterator[tuple[np.ndarray, float, float]]:
    """Yield ``(rgb, start, end)`` for each sample: sample k stands for seconds ``[k / fps, (k + 1) / fps]``
    (the last one ends with the video) and is the frame on screen at the middle of that interval,
    as an upright uint8 (H, W, 3) RGB array.

    ``max_side`` bounds the arrays: FFmpeg scales a frame with a longer side down (area-averaged)
    before any RGB array exists, each side to at most ``max_side`` (for the operator, which squashes
    frames to a square anyway), or by one factor with ``keep_aspect``. Without it, an 81-MP frame is a
    243 MB array, and 2 CPU-s to convert and resize, per sample: a 600 KB H.264 file of such frames
    differing by a pixel cost 49 CPU-s for 20 samples. Frames within the bound are exact.

    ``cpus``: the CPUs this decoding may use (default: all this process may use), for FFmpeg's decoding threads
    (``_decode_threads``): several videos decoded at once share the machine.

    Raises:
        VideoError: the file is missing or no video, longer than ``max_duration`` seconds (checked
            before decoding), over the pixel limit (``PIL.Image.MAX_IMAGE_PIXELS``), decoding to more
            pixels than ``decode_budget`` allows, damaged, or has no frame.
    """
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f'fps must be a positive number, got {fps!r}')
    shrink = _shrinker(max_side, keep_aspect)
    av = _av()
    path = Path(path)
    with _open(path) as container:
        info = _info(container)
        if max_duration is not None and info.duration > max_duration:
            raise VideoError(f'{str(path)!r} lasts {info.duration:.1f} s, over --max-duration {max_duration:g} s')
        limit = max_pixels()
        if limit is not None and info.width * info.height > limit:
            raise VideoError(f'{str(path)!r} is {info.width}x{info.height} = {info.width * info.height:,} pixels a '
                             f'frame, over the pixel limit of {limit:,} (PIL.Image.MAX_IMAGE_PIXELS)')
        stream = container.streams.video[0]
        stream.thread_type = 'AUTO'  # FFmpeg's own threads decode (it releases the GIL)
        convert = av.video.reformatter.VideoReformatter()  # one scaler for the video (see _rgb)
        stream.codec_context.thread_count = _decode_threads(info.width * info.height, cpus)
        origin, previous, k, last_time, gap = None, None, 0, 0.0, 0.0
        size = path.stat().st_size
        decoded, distinct = 0, 0  # pixels decoded; samples of distinct frames (each a new embedding)
        try:
            for frame in container.decode(stream):
                decoded += frame.width * frame.height
                if decoded > (budget := decode_budget(size, distinct / fps)):
                    raise VideoError(f'{str(path)!r} decodes to more than {budget:,} pixels ({PIXELS_PER_BYTE:,} a '
                                     f'byte of its {size:,} bytes, {PIXELS_PER_SAMPLED_SECOND:,} a second sampled '
                                     f'(4K at 30 frames a second) for {distinct / fps:g} s up to '
                                     f'{SAMPLED_PIXELS_PER_BYTE:,} a byte, and {FREE_PIXELS:,} more): its frames are '
                                     'far more compressed than a video\'s (a decompression bomb)')
                if frame.time is None:
                    continue
                origin = frame.time if origin is None else origin
                t = frame.time - origin
                if max_duration is not None and t > max_duration:
                    raise VideoError(f'{str(path)!r} lasts over --max-duration {max_duration:g} s')
                # The header's size is the first frame's: intra codecs (MJPEG) may change it at any frame.
                if limit is not None and frame.width * frame.height > limit:
                    raise VideoError(f'{str(path)!r}: its frame at {t:.1f} s is {frame.width}x{frame.height} = '
                                     f'{frame.width * frame.height:,} pixels, over the pixel limit of {limit:,} '
                                     '(PIL.Image.MAX_IMAGE_PIXELS)')
                rgb = None  # converted once, however many samples repeat it
                while previous is not None and (k + 0.5) / fps < t:  # `previous` was on screen at the middle
                    if rgb is None:
                        rgb, distinct = _rgb(previous, shrink, convert), distinct + 1
                    yield rgb, k / fps, (k + 1) / fps
                    k += 1
                gap = t - last_time if previous is not None else 0.0
                previous, last_time = frame, t
        except (av.FFmpegError, IndexError) as e:  # IndexError: PyAV's demuxer meeting a stream that was not
            # there at the start (a garbled MPEG-TS); it ended `video embed` with "IndexError: list index out of range"
            reason = _reason(e) if isinstance(e, av.FFmpegError) else 'a stream appeared in mid-file'
            raise VideoError(f'{str(path)!r} is damaged: decoding failed after {k} sample(s) ({reason})') from None
        if previous is None:
            raise VideoError(f'{str(path)!r} has no decodable frame')
        # The last frame lasts one frame period (the stream's rate), but never past the length the
        # container states; where it states none beyond the last frame, no longer than the gap before it
        # or one sample: an AVI declaring 1/10^6 frames a second and no length held its one frame for
        # 11.6 days (10^6 samples, each embedded), and an MP4 slideshow's average rate (4 frames in 1,800 s)
        # ran 450 s past its stated end. A video whose frames stop well before its stated length is cut short.
        rate = float(stream.average_rate or stream.guessed_rate or 0) or fps
        rest = info.duration - last_time
        end = last_time + min(1 / rate, rest if rest > 0 else max(gap, 1 / fps))
        if max_duration is not None and end > max_duration:
            if end > max_duration + 1 / fps:  # within a sample of the bound: a rounding of the length, cut there
                raise VideoError(f'{str(path)!r} lasts {end:.1f} s, over --max-duration {max_duration:g} s')
            end = max_duration
        if info.duration > 2 and end < 0.9 * info.duration - 1:
            raise VideoError(f'{str(path)!r} is truncated: frames stop at {end:.1f} s of {info.duration:.1f} s')
        rgb = _rgb(previous, shrink, convert)
        while k == 0 or k / fps < end - 1e-6:
            yield rgb, k / fps, min((k + 1) / fps, end)
            k += 1


def _decode_threads(pixels: int, cpus: int | None = None) -> int:
    """FFmpeg's decoding threads for frames of ``pixels`` (the reported size): each holds frames of its own,
    so 16 threads of 81-MP frames (122 MB each as YUV) would hold gigabytes. Never 0 (FFmpeg's choice: CPUs
    + 1, up to 16), never over ``MAX_DECODE_THREADS`` nor ``cpus`` (default: the CPUs this process may use), and fewer
    for big frames; at least 1."""
    fit = DECODER_BYTES // max(1, pixels * 3 // 2)
    return max(1, min(fit, MAX_DECODE_THREADS, cpus or cpu_count()))


def _shrinker(max_side: int | None, keep_aspect: bool) -> Callable[[int, int], tuple[int, int]] | None:
    """(width, height) -> the size a frame is scaled to, for ``sample_frames``'s ``max_side``."""
    if max_side is None:
        return None
    if max_side < 1:
        raise ValueError(f'max_side must be a positive number of pixels, got {max_side!r}')
    if keep_aspect:
        return lambda w, h: ((w, h) if max(w, h) <= max_side else
                             (max(1, round(w * max_side / max(w, h))), max(1, round(h * max_side / max(w, h)))))
    return lambda w, h: (min(w, max_side), min(h, max_side))


def _rgb(frame, shrink: Callable[[int, int], tuple[int, int]] | None, convert) -> np.ndarray:
    """An upright RGB array of a decoded frame (its display matrix says how it is turned), scaled by
    FFmpeg to ``shrink(width, height)``. ``convert``: a ``VideoReformatter`` kept for the video, which
    keeps FFmpeg's scaler between frames: ``frame.to_ndarray(format='rgb24')`` makes one each call, 5 times
    the time (0.35 against 0.07 ms a 160 x 120 frame; the same pixels). One thread: videos are decoded side
    by side, and a pool of a thread per CPU for each frame cost 4 times the CPU time (0.04 against 0.01 ms)."""
    size = shrink(frame.width, frame.height) if shrink else (frame.width, frame.height)
    scale = {} if size == (frame.width, frame.height) else dict(width=size[0], height=size[1], interpolation='AREA')
    rgb = convert.reformat(frame, format='rgb24', threads=1, **scale).to_ndarray()
    rotation = int(round(getattr(frame, 'rotation', 0) or 0)) % 360
    return np.ascontiguousarray(np.rot90(rgb, k=rotation // 90)) if rotation % 90 == 0 and rotation else rgb


T = TypeVar('T')


def in_background(items: Iterable[T], depth: int = 64, size: Callable[[T], int] | None = None,
                  max_bytes: int | None = None) -> Iterator[T]:
    """Iterate ``items`` in a worker thread, started at once (so several can decode ahead of their
    consumer), ``depth`` ahead of the consumer (decoding overlaps embedding), and no more than
    ``max_bytes`` ahead (as ``size`` counts an item; one item always passes), so memory does not grow
    with the frames' size; an exception in the worker is raised here. The worker stops when the
    iterator is closed or dropped. ``max_bytes`` defaults to ``AHEAD_BYTES``."""
    return _Ahead(items, depth, size, AHEAD_BYTES if max_bytes is None else max_bytes)


class _Ahead(Iterator[T]):
    _done = object()

    def __init__(self, items: Iterable[T], depth: int, size: Callable[[T], int] | None, max_bytes: int):
        self.box: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.room = threading.Condition()
        self.held = 0  # bytes queued
        threading.Thread(target=self._work, args=(items, size, max_bytes), name='video-decode', daemon=True).start()

    def _work(self, items: Iterable[T], size: Callable[[T], int] | None, max_bytes: int) -> None:
        try:
            for item in items:
                cost = size(item) if size else 0
                with self.room:
                    self.room.wait_for(lambda: self.stop.is_set() or not self.held or self.held + cost <= max_bytes)
                    self.held += cost
                while not self.stop.is_set():
                    try:
                        self.box.put((item, None, cost), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.stop.is_set():
                    return
            self.box.put((self._done, None, 0))
        except BaseException as e:  # noqa: BLE001 (handed to the consumer)
            self.box.put((self._done, e, 0))

    def __next__(self) -> T:
        if self.stop.is_set():
            raise StopIteration
        item, error, cost = self.box.get()
        with self.room:
            self.held -= cost
            self.room.notify()
        if item is self._done:
            self.close()
            if error is not None:
                raise error
            raise StopIteration
        return item

    def close(self) -> None:
        with self.room:
            self.stop.set()
            self.room.notify()

    def __del__(self) -> None:
        self.close()


def find_videos(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Video files from files, folders (recursive, by suffix) and globs, in order, each once.
    A named file is taken whatever its suffix (it is checked when read)."""
    # As images are found: a pipe or a link loop in a folder is skipped and listed; a `**` pattern too deep
    # for Python's glob is a clear error (it was a RecursionError), the folder named instead walked.
    from ..workflow.descriptors import files_under, matched_files
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += files_under(path, VIDEO_SUFFIXES)
        elif any(c in str(item) for c in '*?[') and not path.exists():
            found += [p for p in matched_files(str(item)) if p.suffix.lower() in VIDEO_SUFFIXES]
        else:
            found.append(path)
    seen, unique = set(), []
    for p in found:
        key = os.path.abspath(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    if not unique:
        raise ValueError(f'no videos found in {[str(i) for i in inputs]} (looked for {", ".join(sorted(VIDEO_SUFFIXES))})')
    return unique


def towhee_frames(path: str | os.PathLike, fps: float = 1.0, max_side: int | None = 2048,
                  max_duration: float | None = MAX_DURATION_S,
                  keep_aspect: bool = False) -> Iterator[tuple[object, float, float]]:
    """Sampled frames as ``towhee.types.VideoFrame`` (mode 'RGB', uint8 (H, W, 3), timestamp in ms) with
    their start and end seconds: the rows a Towhee ``flat_map`` makes of one video (see README, "Videos").

    Bounded as ``video embed`` bounds them: each side at most ``max_side`` pixels (default 2,048, 4x the
    published model's 512 px input, what ``video embed`` decodes at for it; ``keep_aspect`` scales by one
    factor instead, for operators that do not squash frames), ``max_duration`` seconds (default
    ``--max-duration``'s, 4 hours; None: unbounded). A generator: Towhee 1.1.3's ``flat_map`` takes each
    row as it comes (its queues hold up to 1,000 rows), so frames are not all held at once; a list of a
    crafted 2,320-byte GIF's full-size frames was 1,159 MB. Raises ``VideoError`` as ``sample_frames`` does.
    """
    from towhee.types import VideoFrame
    for rgb, start, end in sample_frames(path, fps, max_duration, max_side, keep_aspect):
        yield VideoFrame(rgb, 'RGB', timestamp=round(start * 1000)), start, end
