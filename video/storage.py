"""Frame descriptors with timestamps, in VSC 2022's descriptor format (``vsc/storage.py``): one npz
with, per frame, ``video_ids`` (str; a video's frames contiguous), ``features`` (float32 N x D) and
``timestamps`` (float64 N x 2: the interval each frame stands for, in seconds). VSC's own
``descriptor_eval.py`` reads our files unchanged; we add ``model`` and ``postprocessing`` (JSON
strings: what made the vectors, so files of two models are never compared) and ``fps``.
"""
from __future__ import annotations

import functools
import json
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from ..atomic import atomic_write
from ..workflow.descriptors import warn_changed


class VideoDescriptorError(ValueError):
    """A video descriptor file that is missing, unreadable or not in VSC's format."""


@dataclass(frozen=True)
class VideoFeatures:
    """One video's frame descriptors: ``features`` float32 (n, D), ``timestamps`` float64 (n, 2)."""

    video_id: str
    features: np.ndarray
    timestamps: np.ndarray

    def __len__(self) -> int:
        return len(self.features)

    @property
    def duration(self) -> float:
        return float(self.timestamps[-1, 1] - self.timestamps[0, 0]) if len(self) else 0.0


@dataclass(frozen=True)
class VideoSet:
    """Videos read from one descriptor file, with how their vectors were made."""

    videos: list[VideoFeatures]
    model: dict | None = None
    postprocessing: dict | None = None
    paths: dict[str, str] | None = None  # video id -> the file it was embedded from, where recorded

    def frames(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All frames: (features float32 (N, D), video index int64 (N,), frame index within it (N,))."""
        features = np.concatenate([v.features for v in self.videos])
        lengths = [len(v) for v in self.videos]
        video = np.repeat(np.arange(len(self.videos)), lengths)
        frame = np.concatenate([np.arange(n) for n in lengths])
        return features, video, frame

    @property
    def ids(self) -> list[str]:
        return [v.video_id for v in self.videos]

    def unit_vectors(self) -> 'VideoSet':
        """The same videos with every frame's vector scaled to norm 1 (a zero vector stays zero): what search
        compares, and a collection holds. VSC's format does not say its vectors are unit vectors, and two files of
        one model may differ in scale; inner products of unit vectors are cosines whatever the files' scales.
        Returns this set itself where every vector is a unit vector (or zero) already (ours are: no copy)."""
        if self.holds_unit_vectors:
            return self
        videos = []
        for v in self.videos:
            norms = frame_norms(v.features)[:, None]
            unit = np.divide(v.features, norms, out=np.zeros(v.features.shape), where=norms > 0).astype(np.float32)
            videos.append(VideoFeatures(v.video_id, unit, v.timestamps))
        return VideoSet(videos, self.model, self.postprocessing, self.paths)

    @functools.cached_property
    def holds_unit_vectors(self) -> bool:
        """Whether every frame's vector has norm 1 (within ``UNIT_TOLERANCE``) or is zero (found once a set: a
        file's set is checked where it is read and again where it is searched)."""
        return all(((np.abs(norms - 1) <= UNIT_TOLERANCE) | (norms == 0)).all()
                   for norms in (frame_norms(v.features) for v in self.videos))


def frame_norms(features: np.ndarray) -> np.ndarray:
    """Each row's norm, float64 (N,): float32's squares of 1e-30 or 1e30 are out of its range."""
    return np.sqrt(np.einsum('ij,ij->i', features, features, dtype=np.float64))


def write_video_descriptors(path: str | os.PathLike, videos: Sequence[VideoFeatures], model: dict | None = None,
                            postprocessing: dict | None = None, fps: float | None = None,
                            paths: Sequence[str] | None = None) -> None:
    """Write videos to one npz in VSC's format, whole or not at all; ``paths``: each video's file."""
    write_frames(path, [v.video_id for v in videos], [v.timestamps for v in videos], lambda i: videos[i].features,
                 model, postprocessing, fps, paths)


def write_frames(path: str | os.PathLike, ids: Sequence[str], timestamps: Sequence[np.ndarray],
                 features: Callable[[int], np.ndarray], model: dict | None = None, postprocessing: dict | None = None,
                 fps: float | None = None, paths: Sequence[str] | None = None) -> None:
    """Write videos to one npz in VSC's format (what ``np.savez`` writes), whole or not at all, asking
    ``features(i)`` for video i's vectors (float32 (n_i, D), n_i = len(timestamps[i])) one at a time as it
    writes them: a collection's vectors are never all in memory at once (``video embed`` reads them
    from its parts; concatenating them held ~3 times the output)."""
    if not ids:
        raise ValueError('no video descriptors to write')
    if len(set(ids)) != len(ids):
        raise ValueError(f'two videos have the same id ({sorted(i for i in ids if ids.count(i) > 1)[0]!r}); '
                         'ids are file names without extension: rename one')
    lengths = [len(t) for t in timestamps]
    first = np.asarray(features(0))
    if first.ndim != 2:
        raise ValueError(f'features must be N x D arrays, got shape {first.shape}')
    total, dim = sum(lengths), first.shape[1]

    def vectors() -> Iterator[np.ndarray]:
        for i in range(len(ids)):
            block = first if i == 0 else np.asarray(features(i))
            if block.shape != (lengths[i], dim):
                raise ValueError(f'video {ids[i]!r} has {block.shape} features for {lengths[i]} timestamps '
                                 f'of {dim}-d vectors')
            yield block
    with atomic_write(path) as tmp, zipfile.ZipFile(tmp, 'w', zipfile.ZIP_STORED, allowZip64=True) as archive:
        id_type = np.dtype(f'<U{max(1, max(len(i) for i in ids))}')
        _write_member(archive, 'video_ids', id_type, (total,),
                      (np.full(n, i, id_type) for i, n in zip(ids, lengths)))
        _write_member(archive, 'features', np.dtype('<f4'), (total, dim), vectors())
        _write_member(archive, 'timestamps', np.dtype('<f8'), (total, 2), timestamps)
        small = dict(model=np.array(json.dumps(model)), postprocessing=np.array(json.dumps(postprocessing)))
        if fps is not None:
            small['fps'] = np.array(float(fps))
        if paths is not None:
            small['video_paths'] = np.array([str(p) for p in paths])
        for name, array in small.items():
            _write_member(archive, name, array.dtype, array.shape, [array])


def _write_member(archive: zipfile.ZipFile, name: str, dtype: np.dtype, shape: tuple[int, ...],
                  pieces: Iterable[np.ndarray]) -> None:
    """One ``.npy`` member of ``shape``, its rows given in ``pieces``, each written as it comes."""
    with archive.open(f'{name}.npy', 'w', force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, {'descr': np.lib.format.dtype_to_descr(dtype),
                                                 'fortran_order': False, 'shape': tuple(shape)})
        rows = 0
        for piece in pieces:
            piece = np.ascontiguousarray(piece, dtype)  # a copy only where the type differs
            if piece.shape[1:] != tuple(shape[1:]):
                raise ValueError(f'{name}: a piece of shape {piece.shape} in an array of shape {shape}')
            rows += len(piece) if piece.ndim else 1
            f.write(piece.reshape(-1).view(np.uint8))
        if rows != (shape[0] if shape else 1):
            raise ValueError(f'{name}: {rows} rows written for a shape of {shape}')


def read_video_descriptors(path: str | os.PathLike, dim: int | None = None) -> VideoSet:
    """A VSC descriptor npz (ours, VSC's baseline's, anyone's) -> videos in file order. ``dim``: the
    vector size required (to compare with another file). Files without our ``model`` record are
    taken on trust."""
    path = str(path)
    if os.path.isdir(path):
        raise VideoDescriptorError(f'{path!r} is a folder, not a video descriptor file')
    if not os.path.isfile(path):
        raise VideoDescriptorError(f'video descriptor file not found: {path!r}')
    try:
        _check_archive(path)
        with np.load(path, allow_pickle=False) as data:
            missing = {'video_ids', 'features', 'timestamps'} - set(data.files)
            if missing:
                raise VideoDescriptorError(f'{path!r} is not a VSC video descriptor file: it lacks '
                                           f'{", ".join(sorted(missing))}')
            ids, features, timestamps = data['video_ids'], data['features'], data['timestamps']
            model = _json(data, 'model', path)
            postprocessing = _json(data, 'postprocessing', path)
            files = [str(p) for p in data['video_paths']] if 'video_paths' in data.files else None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        if isinstance(e, VideoDescriptorError):
            raise
        raise VideoDescriptorError(f'{path!r} is not a readable npz file: {e}') from None
    if features.ndim != 2 or not len(features) or features.shape[1] == 0:
        raise VideoDescriptorError(f'{path!r}: features must be a non-empty N x D array, got shape {features.shape}')
    if not np.issubdtype(features.dtype, np.floating):
        raise VideoDescriptorError(f'{path!r}: features must be finite floats')
    with np.errstate(over='ignore', under='ignore'):
        as_float32 = features.astype(np.float32, copy=False)  # what VSC's descriptors are, and search reads
    # one pass over float32 files (ours, VSC's); a wider type's frames may also vanish in float32
    if not np.isfinite(as_float32).all() or as_float32 is not features and (
            (as_float32 == 0).all(axis=1) & (features != 0).any(axis=1)).any():
        if not np.isfinite(features).all():
            raise VideoDescriptorError(f'{path!r}: features must be finite floats')
        raise VideoDescriptorError(f'{path!r}: features must fit float32, as VSC descriptors are: values over '
                                   '3.4e38, or a frame whose values are all under 1e-45, are not descriptors')
    features = as_float32
    if features.shape[1] > MAX_DIM:
        raise VideoDescriptorError(f'{path!r} holds {features.shape[1]:,}-d vectors: no descriptor model makes over '
                                   f'{MAX_DIM:,} dimensions (ISC and VSC descriptors have 256 to 512)')
    if dim is not None and features.shape[1] != dim:
        raise VideoDescriptorError(f'{path!r} holds {features.shape[1]}-d vectors, the other file {dim}-d: '
                                   'they cannot be compared')
    if timestamps.ndim == 1:  # VSC allows one time per frame: a zero-length interval
        timestamps = np.stack([timestamps, timestamps], axis=1)
    if ids.shape != (len(features),) or timestamps.shape != (len(features), 2):
        raise VideoDescriptorError(f'{path!r}: {len(features)} features need as many video_ids and N x 2 timestamps, '
                                   f'got {ids.shape} and {timestamps.shape}')
    if not np.issubdtype(timestamps.dtype, np.number) or not (
            np.isfinite(timestamps).all() and (timestamps >= 0).all() and (timestamps <= MAX_TIMESTAMP_S).all()):
        raise VideoDescriptorError(f'{path!r}: timestamps must be seconds from 0 to {MAX_TIMESTAMP_S:g} '
                                   '(NaN, negative or larger ones would end up in the match CSV)')
    starts = np.r_[0, np.flatnonzero(ids[1:] != ids[:-1]) + 1, len(ids)]
    # alignment reads a video's frames in order: a copy found backwards ends before it starts
    first = np.zeros(len(ids), dtype=bool)
    first[starts[:-1]] = True
    backwards = np.flatnonzero((timestamps[:, 1] < timestamps[:, 0]) |
                               (np.r_[False, timestamps[1:, 0] < timestamps[:-1, 0]] & ~first))
    if len(backwards):
        at = int(backwards[0])
        video = int(np.searchsorted(starts, at, side='right')) - 1
        raise VideoDescriptorError(f'{path!r}: video {str(ids[at])!r}\'s timestamps run backwards at frame '
                                   f'{at - starts[video]} (each frame ends at or after its start, and starts at or '
                                   'after the frame before)')
    videos = [VideoFeatures(str(ids[a]), features[a:b], timestamps[a:b].astype(np.float64))
              for a, b in zip(starts[:-1], starts[1:])]
    seen = [v.video_id for v in videos]
    if len(set(seen)) != len(seen):
        raise VideoDescriptorError(f'{path!r}: the frames of one video are not contiguous')
    paths = dict(zip(seen, files)) if files is not None and len(files) == len(seen) else None
    return VideoSet(videos, model, postprocessing, paths)


# A vector's norm this close to 1 is taken as a unit vector's (the operator's are within float32 rounding).
UNIT_TOLERANCE = 1e-4
# Descriptor sizes beyond this are no model's (ISC's are 256-d, VSC's baselines' 512-d): a crafted file's. Search
# works in D x D (whitening: ``localization.search_space``), so a 321 KB file of 40,000-d frames asked for 12 GiB.
# The files' model record (weights hash, input size) names no size to check D against: files are compared with
# each other (``dim``), and a collection with its own.
MAX_DIM = 4096
# Frame times beyond this (~32 years) are no video's: a crafted file's, kept out of the match CSV.
MAX_TIMESTAMP_S = 1e9
# What a descriptor npz may unpack to, at most, for each byte of the file: float vectors barely compress
# (~1.1x with np.savez_compressed; np.savez stores them as they are), only a bomb of zeros packs 1000:1.
# The slack lets small compressed files (a few frames, long repeated ids) through.
MAX_EXPANSION, EXPANSION_SLACK_BYTES = 32, 64 * 2**20
# The dtype kinds the arrays are read as (VSC's files and ours), checked from their .npy headers before
# anything is read: a structured array of ids was read, and its tuples became ids.
MEMBER_KINDS = {'video_ids': 'US', 'video_paths': 'US', 'features': 'f', 'timestamps': 'fiu', 'model': 'US',
                'postprocessing': 'US', 'fps': 'fiu'}
# A zip may list one stored member any number of times (~60 bytes an entry of its directory), and every
# entry was built and opened: 200,000 entries (a 10.6 MB npz) took 21 CPU-s. Ours have 7 members (in under
# 1 KB of directory); anyone's a few more: the directory's size is read from the zip's end record before
# it is parsed, and the members are counted (each name once) before any is opened.
MAX_MEMBERS, MAX_DIRECTORY_BYTES = 64, 64 * 2**10


def _check_archive(path: str) -> None:
    """Refuse a file that is no zip (``np.load`` reads pickles and ``.npy`` files too), and an npz that would
    unpack to more than the memory available now, or to far more than a file of its size honestly holds:
    deflate packs a gigabyte of zeros into a megabyte, and reading them would get the process (or a
    neighbour) killed. Every member counts, by the larger of its zip size (what reading
    it unpacks: zipfile stops there) and its ``.npy`` header's shape (what numpy allocates); a member
    that is no ``.npy`` (numpy would hand its raw bytes over, unchecked), holds Python objects or is not of
    the kind read (MEMBER_KINDS) is refused, and so is a zip of many members or one member listed twice
    (MAX_MEMBERS)."""
    from ..workflow.descriptors import available_memory
    if not zipfile.is_zipfile(path):
        with open(path, 'rb') as f:
            begins_as_zip = f.read(4) == b'PK\x03\x04'
        raise VideoDescriptorError(f'{path!r} is not a VSC video descriptor file: ' + (
            'it begins as a zip but has no zip directory at its end (cut short?)' if begins_as_zip
            else 'it is no npz (a zip of .npy arrays)'))
    with open(path, 'rb') as f:
        end = zipfile._EndRecData(f)  # zipfile's own reading of the end record: what ZipFile would parse
    if end and end[zipfile._ECD_SIZE] > MAX_DIRECTORY_BYTES:
        raise VideoDescriptorError(f'{path!r} is not a VSC video descriptor file: its zip directory is of '
                                   f'{end[zipfile._ECD_SIZE]:,} bytes, over the {MAX_DIRECTORY_BYTES:,} of {MAX_MEMBERS} arrays')
    need = 0
    with zipfile.ZipFile(path) as archive:
        names = [member.filename for member in archive.infolist()]
        if len(names) > MAX_MEMBERS or len(set(names)) != len(names):
            raise VideoDescriptorError(f'{path!r} is not a VSC video descriptor file: its zip lists {len(names):,} '
                                       f'members, {len(set(names)):,} of them different (at most {MAX_MEMBERS} arrays, '
                                       'each once)')
        for member in archive.infolist():
            if not member.filename.endswith('.npy'):
                raise VideoDescriptorError(f'{path!r} is not a VSC video descriptor file: its member '
                                           f'{member.filename!r} is no .npy array')
            with archive.open(member) as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(f)
            name = member.filename[:-len('.npy')]
            if dtype.hasobject or dtype.kind not in MEMBER_KINDS.get(name, dtype.kind):
                raise VideoDescriptorError(f'{path!r} is not a VSC video descriptor file: its {name!r} array is of '
                                           f'type {dtype}')
            need += max(math.prod(shape) * dtype.itemsize, member.file_size)
    free = available_memory()
    if free is not None and need > free:
        raise VideoDescriptorError(f'{path!r} declares {need / 2**30:.1f} GiB of arrays, more than the '
                                   f'{free / 2**30:.1f} GiB of memory available')
    size = os.path.getsize(path)
    if need > MAX_EXPANSION * size + EXPANSION_SLACK_BYTES:
        raise VideoDescriptorError(f'{path!r} declares {need / 2**20:,.0f} MiB of arrays in a {size / 2**20:,.1f} MiB '
                                   f'file: descriptors do not compress {need / size:,.0f}:1 (a compression bomb?)')


def _json(data, key: str, path: str):
    if key not in data.files:
        return None
    try:
        return json.loads(str(data[key]))
    except ValueError:
        raise VideoDescriptorError(f'{path!r}: its {key!r} record is not JSON') from None


def check_same_source(sets: dict[str, VideoSet]) -> None:
    """Refuse to compare vectors of different models or post-processing (None: not recorded, trusted)."""
    from ..workflow.descriptors import check_same_postprocessing
    from ..workflow.embedding import check_same_model
    check_same_model({name: s.model for name, s in sets.items()})
    check_same_postprocessing({name: s.postprocessing for name, s in sets.items() if s.postprocessing is not None
                               or s.model is not None})


class Parts:
    """The per-video pieces of an interrupted ``video embed``: ``<output>.parts/<n>.npz`` for the
    n-th video (its frames, or why it was skipped, and the ``file_stamp`` of the file it was made from),
    and a manifest of the videos and the model. A rerun with the same plan takes the saved videos
    whose files are unchanged as done; another plan is refused."""

    def __init__(self, output: str | os.PathLike, plan: dict):
        output = Path(output)
        self.folder = output.with_name(output.name + '.parts')
        self.plan = plan
        if self.folder.exists():
            try:
                saved = json.loads((self.folder / 'manifest.json').read_text())
            except (OSError, ValueError):
                saved = None
            if saved != plan:
                raise ValueError(f'{str(self.folder)!r} holds an interrupted run over other videos or with another '
                                 'model or settings: rerun with the same inputs and options, or delete that folder')

    def done(self, stamps: Sequence[tuple[int, ...]]) -> set[int]:
        """The videos saved by an interrupted run whose files are unchanged since (``stamps``: each
        video's ``file_stamp`` now); a damaged part, or one of a changed video, is removed (embedded again)."""
        found, changed = set(), 0
        for p in self.folder.glob('*.npz') if self.folder.exists() else []:
            try:
                with np.load(p) as data:
                    ok = {'features', 'timestamps', 'skipped'} <= set(data.files)
                    stamp = tuple(data['stamp'].tolist()) if 'stamp' in data.files else None
            except Exception:  # noqa: BLE001 (a damaged part is embedded again)
                ok = False
            n = int(p.stem) if p.stem.isdigit() else -1
            if ok and 0 <= n < len(stamps) and stamp == tuple(stamps[n]):
                found.add(n)
            else:
                changed += ok and 0 <= n < len(stamps)
                p.unlink()
        warn_changed(changed)
        return found

    def save(self, n: int, features: np.ndarray, timestamps: np.ndarray, skipped: str = '',
             stamp: Sequence[int] = ()) -> None:
        """Save video n; ``stamp``: its ``file_stamp`` taken before it was decoded."""
        if not self.folder.exists():
            self.folder.mkdir(parents=True)
            with atomic_write(self.folder / 'manifest.json') as tmp:
                tmp.write_text(json.dumps(self.plan))
        with atomic_write(self.folder / f'{n}.npz') as tmp, open(tmp, 'wb') as f:
            np.savez(f, features=np.asarray(features, np.float32), timestamps=np.asarray(timestamps, np.float64),
                     skipped=np.array(skipped), stamp=np.asarray(stamp, np.int64))

    def load(self, n: int) -> tuple[np.ndarray, np.ndarray, str]:
        with np.load(self.folder / f'{n}.npz') as data:
            return data['features'], data['timestamps'], str(data['skipped'])

    def load_times(self, n: int) -> tuple[np.ndarray, str]:
        """Video n's timestamps and why it was skipped ('' if not), without reading its features."""
        with np.load(self.folder / f'{n}.npz') as data:
            return data['timestamps'], str(data['skipped'])

    def features(self, n: int) -> np.ndarray:
        with np.load(self.folder / f'{n}.npz') as data:
            return data['features']

    def remove(self) -> None:
        import shutil
        shutil.rmtree(self.folder, ignore_errors=True)


def all_videos(sets: Iterable[VideoSet]) -> list[VideoFeatures]:
    return [v for s in sets for v in s.videos]
