"""Reference videos' frames in a Milvus collection (Lite file or server): ``video index`` writes each
frame as a row (id ``<video id>#<frame number>``, its vector, and the fields ``video``, ``frame``,
``start``, ``end``); ``video search --collection`` asks it for each query frame's nearest reference
frames and reads the frames of the candidate videos back for alignment, so the references need not be
on the searching machine.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np

from .candidates import Candidate, vote
from .storage import VideoFeatures, VideoSet

if TYPE_CHECKING:
    from ..workflow.milvus import MilvusIndex

FIELDS = ('video', 'frame', 'start', 'end')


def frame_id(video_id: str, frame: int) -> str:
    return f'{video_id}#{frame}'


def video_of(frame: str) -> str:
    """The video id of a frame's row id (a video id may itself hold '#')."""
    return frame.rsplit('#', 1)[0]


def index_videos(refs: VideoSet, index: MilvusIndex, index_type: str | None = None, replace: bool = False
                 ) -> tuple[int, int, str]:
    """Write every frame of ``refs`` (a descriptor file, read) into ``index``. A video the collection holds
    already must be the same video (as many frames, each the same vector), or it is refused: two cameras' GOPR0001 would
    otherwise make one chimera of both (frames 0..m-1 of one, the rest of the other). With ``replace``, such a
    video is replaced whole: its old frames beyond the new length are deleted. Returns (videos, frames, the
    collection's index type)."""
    ids, fields = [], []
    for v in refs.videos:
        for n, (start, end) in enumerate(v.timestamps.tolist()):
            ids.append(frame_id(v.video_id, n))
            fields.append({'video': v.video_id, 'frame': n, 'start': start, 'end': end})
    vectors = np.concatenate([v.features for v in refs.unit_vectors().videos])  # Milvus ranks by inner product
    stale: list[str] = []
    if index.dim() is not None:
        index.create(vectors.shape[1], index_type)  # an existing one: refuses another vector size or index type
        index.check_same_source(refs.postprocessing, refs.model)  # before comparing vectors of another model
        held = {v.video_id: v for v in read_videos(index, refs.ids).videos}
        if not replace:
            check_same_videos(refs, held, index.collection)
        new_length = {v.video_id: len(v) for v in refs.videos}
        stale = [frame_id(v.video_id, n) for v in held.values() for n in range(new_length[v.video_id], len(v))]
    kind = index.add(ids, vectors, index_type=index_type, postprocessing=refs.postprocessing, model=refs.model,
                     fields=fields, remove=stale)
    return len(refs.videos), len(ids), kind


def check_same_videos(refs: VideoSet, held: dict[str, VideoFeatures], collection: str) -> None:
    """Refuse videos whose id ``held`` (the collection's frames of that id) holds for another video: another
    number of frames, or a frame whose vector is not the same (cosine below ``SAME_IMAGE``)."""
    from ..workflow.milvus import SAME_IMAGE
    other = []
    for v in refs.videos:
        there = held.get(v.video_id)
        if there is not None and (len(there) != len(v) or (cosines(there.features, v.features) < SAME_IMAGE).any()):
            other.append(f'{v.video_id} ({len(there)} frames there, {len(v)} here)')
    if other:
        raise ValueError(f'{len(other)} video id(s) are in collection {collection!r} already for another video '
                         f'({", ".join(other[:5])}{", ..." if len(other) > 5 else ""}): nothing was written; rename '
                         'those files, or give --replace to replace those videos whole')


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row by row cosine of two (n, D) arrays: video descriptor files need not hold unit vectors, and a dot
    product of vectors of norm 10 passes SAME_IMAGE at a cosine of 0.01."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    same_zero = (a == b).all(axis=1).astype(np.float64)  # a zero vector is the same only as itself
    return np.where(norms > 0, np.einsum('ij,ij->i', a, b) / np.where(norms > 0, norms, 1), same_zero)


def collection_candidates(queries: VideoSet, index: MilvusIndex, k: int = 10, per_query: int = 10,
                          offsets: np.ndarray | None = None, nprobe: int | None = None, ef: int | None = None
                          ) -> tuple[list[Candidate], VideoSet]:
    """As ``candidates.frame_candidates``, with the collection finding each query frame's ``k`` nearest
    reference frames. Returns the candidates and the candidate reference videos (read from the
    collection; ``Candidate.ref`` indexes them)."""
    q_features, q_video, _ = queries.frames()
    matches = index.search([str(n) for n in range(len(q_features))], q_features, k, None, offsets,
                           nprobe=nprobe, ef=ef)
    names: dict[str, int] = {}
    pair_r = np.array([names.setdefault(video_of(m.reference_id), len(names)) for m in matches], dtype=np.int64)
    pair_q = q_video[np.array([int(m.query_id) for m in matches], dtype=np.int64)]
    pairs = vote(pair_q, pair_r, np.array([m.score for m in matches]), per_query)
    used = {c.ref for c in pairs}
    videos = read_videos(index, [name for name, n in names.items() if n in used])
    position = {v.video_id: i for i, v in enumerate(videos.videos)}
    number = {n: position[name] for name, n in names.items() if name in position}
    return [Candidate(c.query, number[c.ref], c.score) for c in pairs if c.ref in number], videos


def read_videos(index: MilvusIndex, video_ids: list[str], batch: int = 100) -> VideoSet:
    """The frames of ``video_ids`` as the collection holds them, in that order."""
    frames: dict[str, list[dict]] = {v: [] for v in video_ids}
    for start in range(0, len(video_ids), batch):
        some = video_ids[start:start + batch]
        listed = ', '.join(json.dumps(v, ensure_ascii=False) for v in some)
        for row in index.rows(f'video in [{listed}]', ['vector', *FIELDS], 'video', 'frame', len(some)):
            frames[row['video']].append(row)
    videos = []
    for video_id, rows in frames.items():
        if not rows:  # gone from the collection since it was searched
            continue
        rows.sort(key=lambda r: r['frame'])
        videos.append(VideoFeatures(video_id, np.array([r['vector'] for r in rows], dtype=np.float32),
                                    np.array([[r['start'], r['end']] for r in rows], dtype=np.float64)))
    return VideoSet(videos, index.model(), index.postprocessing())
