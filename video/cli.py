"""``towhee-isc video embed|search|dedup|evaluate``: the video commands' arguments, and the wiring
from arguments to the ``video`` room's functions. Importing this module is light (argparse only):
everything heavy is imported when a command runs."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

# Sampling costs one embedding a second of video, whatever the file's size: a crafted 833-byte file whose
# last frame sits 116 days after its first would be embedded for weeks (and its vectors fill the memory).
# Feature films fit in this bound; --max-duration raises it.
MAX_DURATION_S = 4 * 3600.0


def add_parser(commands, with_model: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]) -> None:
    """Add ``video`` and its subcommands to the top-level subparsers; ``with_model`` adds the model flags."""
    from ..defaults import INDEX_TYPES
    from ..workflow.cli import OneLineParser, finite_float, positive_int
    video = commands.add_parser('video', help='video copy detection (VSC 2022 formats and metrics)')
    sub = video.add_subparsers(dest='video_command', required=True, parser_class=OneLineParser)

    p = with_model(sub.add_parser('embed', help="videos -> frame descriptors (VSC's npz), resumable"))
    p.add_argument('videos', nargs='+', help='video files, folders (recursive), globs')
    p.add_argument('-o', '--output', required=True, help="descriptor file (.npz, VSC's format)")
    p.add_argument('--fps', type=positive_float, default=1.0, help='frames sampled per second (default 1, as VSC)')
    add_max_duration(p)
    p.add_argument('--quiet', action='store_true', help='no progress bar')
    group = p.add_argument_group("on a Ray cluster (pip install 'towhee-isc[ray]')")
    group.add_argument('--ray-address', help="one task per video on the Ray cluster at 'auto' or HOST:PORT; videos, "
                                             'checkpoint and output folder must be on storage every node shares')
    group.add_argument('--cpus-per-task', type=positive_float, default=1, help='CPUs each task reserves, and its '
                                                                              'threads (default 1)')
    p.set_defaults(run=run)

    p = with_milvus(sub.add_parser('index', help="reference videos' frame descriptors -> a Milvus collection "
                                                 '(for video search --collection)'))
    p.add_argument('references', help='reference descriptor file (.npz, from video embed)')
    p.add_argument('--index-type', choices=INDEX_TYPES, type=str.upper,
                   help="a new collection's index: FLAT (exact, the default), IVF_FLAT or HNSW (approximate)")
    p.add_argument('--replace', action='store_true',
                   help='replace videos whose ids the collection holds already for another video, whole '
                        '(refused otherwise)')
    p.set_defaults(run=run)

    p = with_milvus(sub.add_parser('search', help='query videos x reference videos -> copied segments (VSC match CSV)'),
                    collection_default=None)
    p.add_argument('queries', help='query descriptor file (.npz)')
    p.add_argument('--references', help='reference descriptor file (.npz); or --collection')
    p.add_argument('--nprobe', type=positive_int, help='--collection IVF_FLAT: cells searched')
    p.add_argument('--ef', type=positive_int, help='--collection HNSW: candidates explored')
    p.add_argument('-o', '--output', required=True, help='match CSV: query_id,ref_id,query_start,query_end,'
                                                        'ref_start,ref_end,score (seconds), best first')
    add_search_options(p, finite_float, positive_int)
    p.add_argument('--report', help='also write an HTML page showing each match')
    p.add_argument('--report-videos', action='append', default=[], metavar='DIR',
                   help="with --report: show the frames of the videos under DIR (repeatable). Only these: a "
                        "descriptor file's recorded paths are anyone's writing, never a licence to show a file")
    p.set_defaults(run=run)

    p = sub.add_parser('dedup', help='groups of videos that share segments, and which to keep')
    p.add_argument('inputs', nargs='+', help='descriptor files (.npz) or, with the model flags, videos')
    p.add_argument('-o', '--output', help='groups as JSON')
    add_search_options(p, finite_float, positive_int)
    with_model(p)
    p.add_argument('--fps', type=positive_float, default=1.0, help='for videos: frames sampled per second')
    add_max_duration(p)
    p.add_argument('--quiet', action='store_true', help="no progress bar while videos are embedded (it is drawn only "
                                                        'on a terminal anyway)')
    p.set_defaults(run=run)

    p = sub.add_parser('evaluate', help="VSC 2022's matching-track metrics for a match CSV")
    p.add_argument('matches', help='predicted match CSV')
    p.add_argument('ground_truth', help='ground-truth match CSV (the same columns; score not needed)')
    p.add_argument('--descriptors', nargs=2, metavar=('QUERIES', 'REFERENCES'),
                   help="also the descriptor track's micro-AP of these descriptor files (.npz)")
    p.add_argument('--json', action='store_true')
    p.set_defaults(run=run)


def add_max_duration(p: argparse.ArgumentParser) -> None:
    """The one bound on how long a video may be, for every command that embeds videos."""
    p.add_argument('--max-duration', type=positive_float, metavar='SECONDS', default=MAX_DURATION_S,
                   help='skip (or with --strict refuse) longer videos, before decoding them where the file says its '
                        f'length (default {MAX_DURATION_S:g}: 4 hours)')


def with_milvus(p: argparse.ArgumentParser, collection_default: str | None = 'isc_video') -> argparse.ArgumentParser:
    from ..defaults import DEFAULT_MILVUS_URI
    from ..workflow.cli import add_token
    p.add_argument('--collection', default=collection_default,
                   help='Milvus collection of reference frames' + (f' (default {collection_default})' if
                                                                    collection_default else ' (filled by video index)'))
    p.add_argument('--milvus-uri', default=DEFAULT_MILVUS_URI,
                   help='a Milvus Lite file (default ./isc.db) or http://host:19530 for a server')
    add_token(p)
    return p


def add_search_options(p: argparse.ArgumentParser, finite_float, positive_int) -> None:
    p.add_argument('--align', choices=('dp', 'tn'), default='dp',
                   help="dp: local alignment allowing speed changes (default); tn: VCSL's Temporal Network "
                        "with VSC's baseline settings")
    p.add_argument('--threshold', type=finite_float, default=None,
                   help='frame similarity that counts as a copy (default: dp 0.1, on descriptors whitened on the frames '
                        'searched; 0.5 with --no-whiten; tn 0.6; 0.1 with --score-norm)')
    p.add_argument('--no-whiten', dest='whiten', action='store_false',
                   help='dp: compare the descriptors less their mean frame only, not whitened on the frames searched')
    p.add_argument('-k', type=positive_int, default=10, help='nearest reference frames per query frame (10)')
    p.add_argument('--candidates', type=positive_int, default=10, help='reference videos aligned per query video (10)')
    p.add_argument('--score-norm', metavar='NOISE', help='descriptor file of unrelated videos: each query frame\'s '
                   'similarity to its nearest noise frame is subtracted (as VSC\'s baseline)')
    p.add_argument('--factor', type=finite_float, default=1.0, help='weight of the --score-norm subtraction (1.0)')
    p.add_argument('--exact', action='store_true', help='exact frame search even for large sets')


def positive_float(text: str) -> float:
    import math
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f'must be a positive number, got {text!r}')
    return value


def run(args: argparse.Namespace) -> None:
    {'embed': cmd_embed, 'index': cmd_index, 'search': cmd_search, 'dedup': cmd_dedup,
     'evaluate': cmd_evaluate}[args.video_command](args)


def cmd_embed(args) -> None:
    from ..workflow.cli import embedder
    from .embed import embed_videos
    if args.ray_address is None and args.cpus_per_task != 1:
        raise ValueError('--cpus-per-task needs --ray-address')
    written, skipped, rate, frames = embed_videos(args.videos, args.output, embedder(args), args.fps,
                                                  args.max_duration, args.quiet, args.ray_address, args.cpus_per_task)
    print(f'wrote {frames} frame descriptors of {written} video(s) to {args.output} ({rate:.2f} frames/s)')
    report_skipped(skipped)


def report_skipped(skipped: dict) -> None:
    if skipped:
        print(f'skipped {len(skipped)} unreadable video(s):', file=sys.stderr)
        for path, reason in skipped.items():
            print(f'  {path}: {reason}', file=sys.stderr)


def cmd_index(args) -> None:
    from ..workflow.milvus import MilvusIndex
    from .collection import index_videos
    from .storage import read_video_descriptors
    refs = read_video_descriptors(args.references)  # before the collection: a bad file leaves no new database
    index = MilvusIndex(args.milvus_uri, args.collection, args.token)
    videos, frames, kind = index_videos(refs, index, args.index_type, args.replace)
    print(f'indexed {frames} frames of {videos} video(s) into {args.collection!r} ({kind} index) at '
          f'{args.milvus_uri} ({index.count()} frames in all)')


def cmd_search(args) -> None:
    from .search import search_files
    if (args.references is None) == (args.collection is None):
        raise ValueError('give the references as --references FILE.npz or --collection NAME (filled by '
                         'towhee-isc video index), one of the two')
    if args.references is None and args.exact:
        raise ValueError('--exact is for --references: a collection searches with its own index')
    collection = None
    if args.collection is not None:
        from ..workflow.milvus import MilvusIndex
        collection = MilvusIndex(args.milvus_uri, args.collection, args.token, existing=True)
    segments, engine, seconds = search_files(args.queries, args.references, args.output, args.align, args.threshold,
                                             args.k, args.candidates, args.score_norm, args.factor, args.exact,
                                             args.report, collection, args.nprobe, args.ef, args.report_videos,
                                             args.whiten)
    from ..workflow.cli import plural
    print(f'frame search engine: {engine}')
    print(f'wrote {plural(len(segments), "match", "matches")} to {args.output} ({seconds:.2f} s)')
    if args.report:
        print(f'wrote {args.report}')


def cmd_dedup(args) -> None:
    from .search import dedup
    groups = dedup(args)
    for n, group in enumerate(groups, start=1):
        shared = ', '.join(f"{s['video']} {s['start']:.1f}-{s['end']:.1f} s" for s in group['shared'])
        print(f"group {n}: keep {group['keep']}; copies: {', '.join(m for m in group['members'] if m != group['keep'])}"
              f' (shared: {shared})')
    print(f'{len(groups)} group(s) of videos sharing segments')
    if args.output:
        from ..atomic import atomic_write
        with atomic_write(args.output) as tmp:
            tmp.write_text(json.dumps(groups, indent=1))
        print(f'wrote {args.output}')


def cmd_evaluate(args) -> None:
    from .metrics import evaluate_files
    result = evaluate_files(args.matches, args.ground_truth, args.descriptors)
    if args.json:
        print(json.dumps(result))
        return
    print(f"segment AP (VSC matching track)   {result['segment_ap']:.4f}\n"
          f"pairwise micro AP                 {result['pairwise_micro_ap']:.4f}")
    if 'descriptor_micro_ap' in result:
        print(f"descriptor track micro AP         {result['descriptor_micro_ap']:.4f}")
