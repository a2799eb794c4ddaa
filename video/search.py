"""``video search`` and ``video dedup`` as functions: descriptor files in, copied segments out.
Frame search (``candidates``), alignment of each candidate pair (``localization``), ranking."""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .candidates import frame_candidates, noise_offsets
from .localization import QUERY_SAMPLE, best_first, localize, search_space
from .metrics import Segment, write_segments
from .storage import VideoSet, check_same_source, read_video_descriptors

if TYPE_CHECKING:
    from ..workflow.milvus import MilvusIndex

# Without --score-norm, ``dp`` compares whitened descriptors (``localization.search_space``), where
# unrelated frames fall near 0: 0.1 there, so that a cell counts when it beats its frames' background
# (``alignment.above_background``); on benchmarks/video.py's seeds 0-11, 0.0-0.15 gave the same mean segment AP
# (0.949-0.950), 0.2 0.932, 0.3 0.826. Centred only (--no-whiten), 0.5 (seeds 0-5: 1.000, 0.956, 0.932,
# 0.873, 0.959, 0.878; 0.45 and 0.55 each lost one seed below 0.85). ``tn`` keeps the plain cosine and 0.6
# (before centring, 0.6 ranked dp's copies best: 0.5 gave 0.89, 0.67, 0.43 on seeds 0-2 against 1.0, 0.95, 0.55).
DEFAULT_THRESHOLD, DEFAULT_CENTRED_THRESHOLD, DEFAULT_NORMALISED_THRESHOLD = 0.6, 0.5, 0.1
DEFAULT_WHITENED_THRESHOLD = 0.1


def search_videos(queries: VideoSet, refs: VideoSet | None, align: str = 'dp', threshold: float | None = None,
                  k: int = 10, candidates: int = 10, noise: VideoSet | None = None, factor: float = 1.0,
                  exact: bool = False, keep_matrices: bool = False, collection: MilvusIndex | None = None,
                  nprobe: int | None = None, ef: int | None = None, whiten: bool = True, fainter: bool = True,
                  min_score: float | None = None) -> tuple[list[Segment], str, list, VideoSet]:
    """Copied segments between query and reference videos, best first. ``dp`` without ``noise`` compares
    the frames less their mean and, with ``whiten`` (and as many frames as dimensions), whitened
    (``localization.search_space``), and with ``refs`` finds the candidate pairs' nearest frames there too.

    The references are ``refs``, or (``refs`` None) the videos of a Milvus ``collection`` filled by
    ``video index``: it finds the candidate frames (``nprobe``/``ef``: its search width) and gives
    back the candidate videos' frames. Returns (segments, how frames were searched, with
    ``keep_matrices`` the (candidate, similarity matrix, box, segment) of each for a report, and the
    reference videos: ``refs``, or those read from the collection). ``fainter``: also ``dp``'s fainter
    readings of a pair, listed last (``localization.fainter_readings``). ``min_score``: only segments whose
    alignment scored above it (``video dedup``: 0, where a segment's cells are on average above the threshold;
    ``tn`` also keeps paths whose mean similarity passes its own 0.2, which a search lists last)."""
    from ..workflow.engines import choose_engine
    # inner products of unit vectors are cosines, whatever scale each file's vectors have (``unit_vectors``;
    # ``search_files`` and ``dedup`` scale each file's set as they read it, so that no second copy is held)
    same = refs is queries  # `video dedup`: every video against every other
    queries = queries.unit_vectors()
    refs = queries if same else None if refs is None else refs.unit_vectors()
    noise = None if noise is None else noise.unit_vectors()
    q_frames, _, _ = queries.frames()
    offsets = None
    if noise is not None:
        n_frames, _, _ = noise.frames()
        offsets = noise_offsets(q_frames, n_frames, choose_engine(len(q_frames), len(n_frames), exact), factor)
    centre_frames = align == 'dp' and offsets is None  # score normalisation already removes what is common
    space = None
    if collection is not None:
        from .collection import collection_candidates
        # the collection holds unit vectors (``index_videos``): its k-NN is by their cosine, and the space is
        # learned on the candidates' frames read back from it
        pairs, refs = collection_candidates(queries, collection, k, candidates, offsets, nprobe, ef)
        # Filled by an earlier towhee-isc from files whose vectors were not unit vectors, it was stored as given and
        # Milvus ranked raw inner products. Seen only where such a video is a candidate (a video of a smaller norm
        # than the rest never is): README says so.
        if not refs.holds_unit_vectors:
            raise ValueError(f'collection {collection.collection!r} holds vectors not scaled to norm 1 (an earlier '
                             'towhee-isc stored those of descriptor files as given): its frame search is not by '
                             'cosine. Index all its reference files again with towhee-isc video index, or into a '
                             'new --collection')
        description = f'Milvus collection {collection.collection!r} at {collection.uri}'
        if centre_frames:
            space = search_space(queries, [refs.videos[i] for i in sorted({c.ref for c in pairs})], whiten)
    else:
        # candidates are searched in the space their frames are aligned in (see ``frame_candidates``' note)
        space = search_space(queries, refs.videos, whiten) if centre_frames else None
        engine = choose_engine(len(q_frames), sum(len(v) for v in refs.videos), exact)
        pairs = frame_candidates(queries, refs, engine, k, candidates, offsets, space=space)
        description = engine.description
    if threshold is None:
        threshold = DEFAULT_NORMALISED_THRESHOLD if offsets is not None else DEFAULT_THRESHOLD if space is None \
            else DEFAULT_WHITENED_THRESHOLD if space.whitened else DEFAULT_CENTRED_THRESHOLD
    found, last, kept = [], [], []
    sample = None  # query frames spread evenly over all queries: what a reference frame is compared with
    if space is not None:
        sample = space(q_frames[np.unique(np.linspace(0, len(q_frames) - 1, QUERY_SAMPLE).astype(int))])
    for item in localize(queries, refs, pairs, align, threshold, offsets, space, sample, other_offsets=fainter):
        if min_score is not None and item[3].score <= min_score:
            continue
        (last if item[2].ranked_last else found).append(item[3])
        if keep_matrices:
            kept.append(item)
    return best_first(found, last if fainter else ()), description, kept, refs


def search_files(queries: str, references: str | None, output: str, align: str = 'dp', threshold: float | None = None,
                 k: int = 10, candidates: int = 10, score_norm: str | None = None, factor: float = 1.0,
                 exact: bool = False, report: str | None = None, collection: MilvusIndex | None = None,
                 nprobe: int | None = None, ef: int | None = None,
                 report_videos: Sequence[str] = (), whiten: bool = True) -> tuple[list[Segment], str, float]:
    """``video search``: read, check the files (or the collection) come from one model, search, write
    the CSV (and report). The references are the file ``references`` or the Milvus ``collection``.
    The report shows frames only of videos under the folders ``report_videos``."""
    started = time.perf_counter()
    q = read_video_descriptors(queries).unit_vectors()
    dim = q.videos[0].features.shape[1]
    sets = {queries: q}
    r = None
    if collection is not None:
        if collection.dim() is None:
            raise ValueError(f'unknown collection {collection.collection!r} at {collection.uri!r}: '
                             'fill it with towhee-isc video index REFERENCES.npz first')
        sets[f'collection {collection.collection!r}'] = VideoSet([], collection.model(), collection.postprocessing())
    else:
        r = read_video_descriptors(references, dim=dim).unit_vectors()
        sets[references] = r
    noise = None
    if score_norm:
        noise = read_video_descriptors(score_norm, dim=dim).unit_vectors()
        sets[score_norm] = noise
        if r is not None and set(noise.ids) & set(r.ids):
            raise ValueError(f'--score-norm {score_norm} shares videos with the references: normalise with an '
                             'independent set (VSC rules)')
    check_same_source(sets)
    segments, engine, kept, r = search_videos(q, r, align, threshold, k, candidates, noise, factor, exact,
                                              bool(report), collection, nprobe, ef, whiten)
    write_segments(output, segments)
    if report:
        from ..workflow.reports import ImageFolders
        from .report import html_report
        html_report(report, kept, q, r, ImageFolders(report_videos))
    return segments, engine, time.perf_counter() - started


def dedup(args) -> list[dict]:
    """``video dedup``: groups of videos (descriptor files, or videos embedded now) that share segments,
    with the seconds each shares and which to keep (the longest; then the highest resolution)."""
    import tempfile
    files = [i for i in args.inputs if str(i).lower().endswith('.npz')]
    videos = [i for i in args.inputs if not str(i).lower().endswith('.npz')]
    sets = {f: read_video_descriptors(f).unit_vectors() for f in files}
    paths: dict[str, Path] = {}
    if videos:
        from ..workflow.cli import embedder
        from .embed import embed_videos
        from .reader import find_videos
        with tempfile.TemporaryDirectory() as folder:
            made = str(Path(folder) / 'videos.npz')
            _, skipped, _, _ = embed_videos(videos, made, embedder(args), args.fps, args.max_duration,
                                          quiet=args.quiet)  # as video embed: hours for a film, shown
            from .cli import report_skipped
            report_skipped(skipped)
            sets['the videos embedded now'] = read_video_descriptors(made)
        paths = {p.stem: p for p in find_videos(videos)}
    check_same_source(sets)
    everything = VideoSet([v for s in sets.values() for v in s.videos])
    ids = everything.ids
    if len(set(ids)) != len(ids):
        raise ValueError('the inputs repeat a video id: every video needs its own id')
    # Without the fainter readings: another offset of a copy is no second of it that two videos share.
    segments, _, _, _ = search_videos(everything, everything, args.align, args.threshold, args.k + 1,
                                   args.candidates + 1, exact=args.exact, whiten=args.whiten, fainter=False,
                                   min_score=0.0)
    segments = [s for s in segments if s.query_id != s.ref_id]
    return duplicate_groups(everything, segments, paths)


def duplicate_groups(videos: VideoSet, segments: list[Segment], paths: dict[str, Path]) -> list[dict]:
    """Connected videos (any shared segment, either direction), largest group first."""
    parent = {v: v for v in videos.ids}

    def root(v):
        while parent[v] != v:
            parent[v] = parent[parent[v]]
            v = parent[v]
        return v

    for s in segments:
        parent[root(s.query_id)] = root(s.ref_id)
    members: dict[str, list[str]] = {}
    for v in videos.ids:
        members.setdefault(root(v), []).append(v)
    duration = {v.video_id: v.duration for v in videos.videos}
    pixels = {v: _pixels(p) for v, p in paths.items()}
    groups = []
    for group in (m for m in members.values() if len(m) > 1):
        keep = max(group, key=lambda v: (duration[v], pixels.get(v, 0), v))
        shared = {}
        for s in segments:
            if s.query_id in group:
                for video, start, end in ((s.query_id, s.query_start, s.query_end), (s.ref_id, s.ref_start, s.ref_end)):
                    a, b = shared.get(video, (start, end))
                    shared[video] = (min(a, start), max(b, end))
        groups.append({'keep': keep, 'members': sorted(group),
                       'shared': [{'video': v, 'start': a, 'end': b} for v, (a, b) in sorted(shared.items())]})
    return sorted(groups, key=lambda g: (-len(g['members']), g['keep']))


def _pixels(path: Path) -> int:
    from .reader import VideoError, probe
    try:
        info = probe(path)
    except VideoError:
        return 0
    return info.width * info.height
