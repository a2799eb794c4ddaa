"""``towhee-isc`` (also ``python -m towhee_isc``): embed, index, search, dedup, evaluate.

Every command is a thin shell over the Python API (``workflow``, ``matching``, ``metrics``):
it parses arguments and prints; errors are one line and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from .descriptors import read_descriptors
from .embedding import Embedder, embed_collection, load_descriptors
from .matching import (duplicate_groups, html_report, near_duplicate_pairs, nth_neighbour_similarity, search_exact,
                       write_groups)
from .metrics import evaluate, plot_precision_recall, read_ground_truth, read_matches, write_matches
from .milvus import DEFAULT_MILVUS_URI, MilvusIndex, milvus_duplicate_pairs

COMMANDS = ('embed', 'index', 'search', 'dedup', 'evaluate')


def embedder(args: argparse.Namespace) -> Embedder:
    return Embedder(model_name=args.model_name, checkpoint_path=args.checkpoint, device=args.device,
                    batch_size=args.batch_size, strict=args.strict)


def cmd_embed(args) -> None:
    if args.ray_address:  # the same embed, its chunks spread over a Ray cluster's actors
        from .ray import embed_on_ray
        isc_kwargs = dict(model_name=args.model_name, checkpoint_path=args.checkpoint, device=args.device,
                          batch_size=args.batch_size)
        written, skipped, rate = embed_on_ray(args.inputs, args.output, args.ray_address, isc_kwargs, args.actors,
                                              args.cpus_per_actor, args.gpus_per_actor, args.chunk_size, args.strict,
                                              args.quiet)
    elif (args.actors, args.cpus_per_actor, args.gpus_per_actor) != (None, 1, 0):
        raise ValueError('--actors, --cpus-per-actor and --gpus-per-actor need --ray-address')
    else:
        written, skipped, rate = embed_collection(args.inputs, args.output, embedder(args), args.chunk_size, args.quiet)
    print(f'wrote {written} descriptors to {args.output} ({rate:.2f} images/s)')
    if skipped:
        print(f'skipped {len(skipped)} unreadable or non-image file(s):', file=sys.stderr)
        for path in skipped:
            print(f'  {path}', file=sys.stderr)


def cmd_index(args) -> None:
    ids, vectors, _ = load_descriptors(args.inputs, embedder(args))
    index = MilvusIndex(args.milvus_uri, args.collection)
    index.add(ids, vectors)
    print(f'indexed {len(ids)} descriptors into {args.collection!r} at {args.milvus_uri} ({index.count()} in all)')


def cmd_search(args) -> None:
    images = embedder(args)
    query_ids, queries, query_paths = load_descriptors(args.queries, images)
    offsets = None
    if args.score_norm:
        _, background = read_descriptors(args.score_norm, dim=queries.shape[1])
        offsets = args.factor * nth_neighbour_similarity(queries, background, args.nth)
    if args.references:
        reference_ids, references, reference_paths = load_descriptors(args.references, images)
        matches = search_exact(query_ids, queries, reference_ids, references, args.k, args.threshold, offsets)
    else:
        index = MilvusIndex(args.milvus_uri, args.collection)
        matches = index.search(query_ids, queries, args.k, args.threshold, offsets)
        reference_paths = {}
    write_matches(args.output, matches)
    print(f'wrote {len(matches)} matches for {len(query_ids)} queries to {args.output}')
    if args.report:
        html_report(matches, query_paths, reference_paths, args.report)
        print(f'wrote {args.report}')


def cmd_dedup(args) -> None:
    ids, vectors, paths = load_descriptors(args.inputs, embedder(args))
    if args.milvus_uri:  # collections too large for this machine: let Milvus find the neighbours
        index = MilvusIndex(args.milvus_uri, args.collection)
        index.add(ids, vectors)
        pairs = milvus_duplicate_pairs(index, ids, vectors, args.threshold, args.k)
    else:
        pairs = near_duplicate_pairs(vectors, args.threshold)
    groups = duplicate_groups(ids, pairs, [paths.get(i) for i in ids])
    for n, group in enumerate(groups, start=1):
        print(f'group {n}: keep {group.keep}; copies: ' + ', '.join(m for m in group.members if m != group.keep))
    print(f'{len(groups)} group(s) of near-duplicates among {len(ids)} images (threshold {args.threshold})')
    if args.output:
        write_groups(args.output, groups, paths)
        print(f'wrote {args.output}')


def cmd_evaluate(args) -> None:
    matches, truth = read_matches(args.matches), read_ground_truth(args.ground_truth)
    result = evaluate(matches, truth)
    if args.plot:
        plot_precision_recall(matches, truth, args.plot)
    if args.json:
        print(json.dumps(result))
    else:
        threshold = 'never reached' if result['threshold_at_p90'] is None else f"{result['threshold_at_p90']:.4f}"
        print(f"micro average precision  {result['average_precision']:.4f}\n"
              f"recall at precision 0.9  {result['recall_at_p90']:.4f} (score threshold {threshold})\n"
              f"recall at rank 1 / 10    {result['recall_at_rank1']:.4f} / {result['recall_at_rank10']:.4f}")


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog='towhee-isc', description='Find image copies with the ISC21 descriptor.')
    commands = main.add_subparsers(dest='command', required=True)

    def with_model(p):
        group = p.add_argument_group('embedding images')
        group.add_argument('--checkpoint', help='a local checkpoint instead of the published weights')
        group.add_argument('--model-name', default='isc_ft_v107')
        group.add_argument('--device', help="'cpu', 'cuda', 'cuda:N' (default: CUDA when available)")
        group.add_argument('--batch-size', type=int)
        group.add_argument('--strict', action='store_true', help='an unreadable image is an error, not skipped')
        return p

    def with_milvus(p):
        p.add_argument('--milvus-uri', default=DEFAULT_MILVUS_URI,
                       help='a Milvus Lite file (default ./isc.db) or http://host:19530 for a server')
        p.add_argument('--collection', default='isc')
        return p

    p = with_model(commands.add_parser('embed', help='images -> descriptor file (resumable)'))
    p.add_argument('inputs', nargs='+', help='folders (recursive), globs, .txt file lists, image files')
    p.add_argument('-o', '--output', required=True, help='descriptor file (.h5)')
    p.add_argument('--chunk-size', type=int, default=64, help='images per saved chunk')
    p.add_argument('--quiet', action='store_true', help='no progress bar')
    group = p.add_argument_group('on a Ray cluster (pip install \'towhee-isc[ray]\')')
    group.add_argument('--ray-address', help="embed on the Ray cluster at 'auto' or HOST:PORT; images, checkpoint "
                                             'and output folder must be on storage every node shares')
    group.add_argument('--actors', type=int, help='embedding processes (default: as many as the cluster holds)')
    group.add_argument('--cpus-per-actor', type=float, default=1, help='CPUs each reserves, and its threads (default 1)')
    group.add_argument('--gpus-per-actor', type=float, default=0, help='GPUs each reserves (default 0)')
    p.set_defaults(run=cmd_embed)

    p = with_milvus(with_model(commands.add_parser('index', help='descriptors or images -> Milvus')))
    p.add_argument('inputs', nargs='+')
    p.set_defaults(run=cmd_index)

    p = with_milvus(with_model(commands.add_parser('search', help='queries -> prediction CSV')))
    p.add_argument('queries', nargs='+', help='descriptor files or images')
    p.add_argument('--references', nargs='+', help='search these (descriptor files or images) exactly, no database')
    p.add_argument('-k', type=int, default=10, help='matches per query')
    p.add_argument('--threshold', type=float, help='keep matches scoring at least this')
    p.add_argument('--score-norm', help='background descriptor file for score normalisation')
    p.add_argument('--factor', type=float, default=1.0, help='score -= factor x similarity to the nth background neighbour')
    p.add_argument('--nth', type=int, default=1)
    p.add_argument('-o', '--output', required=True, help='prediction CSV: query_id,reference_id,score')
    p.add_argument('--report', help='also write an HTML page with thumbnails')
    p.set_defaults(run=cmd_search)

    p = with_model(commands.add_parser('dedup', help='near-duplicate groups within one collection'))
    p.add_argument('inputs', nargs='+', help='descriptor files or images')
    p.add_argument('--threshold', type=float, default=0.8, help='similarity that makes two images copies')
    p.add_argument('-o', '--output', help='groups as CSV, or JSON if it ends in .json')
    p.add_argument('--milvus-uri', help='find neighbours through this Milvus (for collections beyond one machine)')
    p.add_argument('--collection', default='isc_dedup')
    p.add_argument('-k', type=int, default=100, help='with --milvus-uri: neighbours looked at per image')
    p.set_defaults(run=cmd_dedup)

    p = commands.add_parser('evaluate', help="the challenge's metrics for a prediction CSV")
    p.add_argument('matches')
    p.add_argument('ground_truth')
    p.add_argument('--plot', help='precision-recall curve (PNG)')
    p.add_argument('--json', action='store_true')
    p.set_defaults(run=cmd_evaluate)
    return main


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, TypeError, OSError, ImportError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
