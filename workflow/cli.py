"""``towhee-isc`` (also ``python -m towhee_isc``): embed, index, search, dedup, evaluate, nes.

Every command is a thin shell over the Python API (``workflow``, ``matching``, ``metrics``):
it parses arguments and prints; errors are one line and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

from ..atomic import check_writable
from ..defaults import ALPHA, BETA, DBA_K, DEFAULT_MILVUS_URI, INDEX_TYPES, ITERATIONS, K
from ..progress import set_quiet
from .reports import DEFAULT_REPORT_QUERIES  # reports.py imports nothing heavy at its top

if TYPE_CHECKING:
    from .embedding import Embedder

# Building the parser imports nothing heavy (``towhee-isc --help`` and usage errors answer at once):
# each command imports what it needs (numpy, faiss, Milvus, torch) when it runs.

COMMANDS = ('embed', 'index', 'search', 'dedup', 'evaluate', 'nes', 'serve', 'train', 'video')


def nes_settings(args: argparse.Namespace) -> dict:
    """The operator's post-processing arguments from --negatives and --nes-*; none without --negatives."""
    if args.negatives is None:
        return {}
    return dict(negatives=os.path.abspath(args.negatives), nes_k=args.nes_k, nes_beta=args.nes_beta,
                nes_iterations=args.nes_iterations, nes_dba_k=args.nes_dba_k, nes_alpha=args.nes_alpha)


def embedder(args: argparse.Namespace) -> Embedder:
    from .embedding import Embedder
    return Embedder(model_name=args.model_name, checkpoint_path=args.checkpoint, timm_backbone=args.timm_backbone,
                    img_size=args.img_size, device=args.device, batch_size=args.batch_size, strict=args.strict,
                    **nes_settings(args))


def same_postprocessing(args: argparse.Namespace, images: Embedder, *sources: dict[str, dict | None]) -> dict | None:
    """All inputs of one command (and ``--negatives``, if given) must be post-processed alike."""
    from .descriptors import check_same_postprocessing
    named = {f'--negatives {args.negatives}': images.postprocessing} if args.negatives else {}
    for source in sources:
        named.update(source)
    return check_same_postprocessing(named)


def cmd_embed(args) -> None:
    if args.ray_address:  # the same embed, its chunks spread over a Ray cluster's actors
        from .ray import embed_on_ray
        isc_kwargs = dict(model_name=args.model_name, checkpoint_path=args.checkpoint, timm_backbone=args.timm_backbone,
                          img_size=args.img_size, device=args.device, batch_size=args.batch_size, **nes_settings(args))
        written, skipped, rate = embed_on_ray(args.inputs, args.output, args.ray_address, isc_kwargs, args.actors,
                                              args.cpus_per_actor, args.gpus_per_actor, args.chunk_size, args.strict,
                                              args.quiet, own_process=True)
    elif (args.actors, args.cpus_per_actor, args.gpus_per_actor) != (None, 1, 0):
        raise ValueError('--actors, --cpus-per-actor and --gpus-per-actor need --ray-address')
    else:
        from .embedding import embed_collection
        written, skipped, rate = embed_collection(args.inputs, args.output, embedder(args), args.chunk_size, args.quiet)
    print(f'wrote {plural(written, "descriptor")} to {args.output} ({rate:.2f} images/s)')
    if skipped:
        print(f'skipped {len(skipped)} unreadable or non-image file(s):', file=sys.stderr)
        for path, reason in skipped.items():
            print(f'  {path}: {reason}', file=sys.stderr)


def cmd_index(args) -> None:
    from .embedding import inputs_postprocessing, load_descriptors
    from .milvus import MilvusIndex, new_database_removed_on_failure
    images = embedder(args)
    with new_database_removed_on_failure(args.milvus_uri):  # until it writes: a failed write marks it incomplete
        index = MilvusIndex(args.milvus_uri, args.collection, args.token)
        postprocessing = same_postprocessing(args, images, inputs_postprocessing(args.inputs, images), {
            f'collection {args.collection!r}': index.postprocessing()} if index.dim() else {})
        models = collection_models(index)
        ids, vectors, paths = load_descriptors(args.inputs, images, models)  # refuses another model's vectors
    kind = index.add(ids, vectors, index_type=args.index_type, postprocessing=postprocessing,
                     model=recorded_model(models), paths=paths, replace=args.replace)
    print(f'indexed {plural(len(ids), "descriptor")} into {args.collection!r} ({kind} index) at {args.milvus_uri} '
          f'({index.count()} in all)')


def collection_models(index) -> dict[str, dict | None]:
    """{'collection NAME': its recorded model} for ``load_descriptors`` to check inputs against ({} for a
    collection not made yet)."""
    return {f'collection {index.collection!r}': index.model()} if index.dim() else {}


def recorded_model(models: dict[str, dict | None]) -> dict | None:
    """The model to record with vectors added to a collection: the first known of ``models`` (the
    collection's, else the inputs' that ``load_descriptors`` added), so search and serve can refuse others."""
    return next((m for m in models.values() if m), None)


def cmd_search(args) -> None:
    from .descriptors import read_descriptors, read_model, read_postprocessing
    from .embedding import inputs_postprocessing, load_descriptors
    from .engines import choose_engine, meets
    from .matching import nth_neighbour_similarity, search
    from .metrics import read_ground_truth, write_matches
    from .milvus import MilvusIndex
    if args.ground_truth and not args.report:
        raise ValueError('--ground-truth marks the matches of the --report page: give --report too '
                         '(towhee-isc evaluate scores the prediction CSV)')
    truth = read_ground_truth(args.ground_truth) if args.ground_truth else None  # a bad file stops us before any work
    images, models = embedder(args), {}
    if not args.references:
        check_top_k(args.k)
    index = None if args.references else MilvusIndex(args.milvus_uri, args.collection, args.token, existing=True)
    if index is not None and index.dim():
        models[f'collection {args.collection!r}'] = index.model()
    same_postprocessing(args, images, inputs_postprocessing(args.queries, images, 'queries'),
                        inputs_postprocessing(args.references or [], images, 'references') if args.references else {},
                        {args.score_norm: read_postprocessing(args.score_norm)} if args.score_norm else {},
                        {f'collection {args.collection!r}': index.postprocessing()} if index and index.dim() else {})
    if args.score_norm:  # its similarities are subtracted from the scores: the same model's, or meaningless
        models[f'the --score-norm background {args.score_norm}'] = read_model(args.score_norm)
    read: set[str] = set()  # the images embedded now: the report may show them
    query_ids, queries, query_paths = load_descriptors(args.queries, images, models, read)
    offsets = None
    if args.score_norm:
        _, background = read_descriptors(args.score_norm, dim=queries.shape[1])
        offsets = args.factor * nth_neighbour_similarity(queries, background, args.nth,
                                                         choose_engine(len(queries), len(background), args.exact))
    if args.references:
        reference_ids, references, reference_paths = load_descriptors(args.references, images, models, read)
        engine = choose_engine(len(queries), len(references), args.exact)
        print(f'search engine: {engine.description}')
        candidates = search(query_ids, queries, reference_ids, references, args.k, None, offsets, engine)
        missing = 'no image path in the descriptor file'
    else:
        candidates = index.search(query_ids, queries, args.k, None, offsets, nprobe=args.nprobe, ef=args.ef)
    # All k candidates go to the report, which marks those at or above the threshold: the CSV's.
    matches = [m for m in candidates if args.threshold is None or meets(m.score, args.threshold)]
    write_matches(args.output, matches)
    print(f'wrote {plural(len(matches), "match", "matches")} for {plural(len(query_ids), "query", "queries")} to {args.output}')
    if args.report:
        from .reports import search_report
        if index is not None:  # the collection keeps each image's path, as descriptor files do
            reference_paths = index.paths
            missing = ('no image path stored' if index.stores_paths() else
                       'the collection keeps no image paths (indexed by an older towhee-isc)')
        search_report(args.report, query_ids, candidates, args.k, query_paths, reference_paths, args.threshold,
                      truth, args.report_queries, missing,
                      report_images(args, [*args.queries, *(args.references or [])], read))
        print(f'wrote {args.report}')


def check_top_k(k: int, itself: int = 0) -> None:
    """Refuse, before any work, a -k that Milvus cannot answer (a server's topk limit; Lite would try to
    allocate it); ``itself``: matches asked for besides the k (dedup's image finds itself)."""
    from .milvus import MAX_TOP_K
    if k + itself > MAX_TOP_K:
        raise ValueError(f'-k {k} is more than the {MAX_TOP_K - itself} neighbours Milvus can return per image here')


def report_images(args, inputs: Sequence[str], read: set[str]):
    """What a report may show: the images read now, and those under the folders given (as inputs or
    ``--report-images``), never whatever a descriptor file or collection names."""
    from .reports import ImageFolders
    return ImageFolders([*(str(i) for i in inputs if os.path.isdir(i)), *args.report_images], read)


def cmd_dedup(args) -> None:
    from .embedding import inputs_postprocessing, load_descriptors
    from .engines import choose_engine
    from .matching import duplicate_groups, near_duplicate_groups
    from .milvus import MilvusIndex, milvus_duplicate_pairs
    images = embedder(args)
    if args.milvus_uri:
        check_top_k(args.k, itself=1)  # each image finds itself too
    postprocessing = same_postprocessing(args, images, inputs_postprocessing(args.inputs, images))
    read: set[str] = set()
    index = MilvusIndex(args.milvus_uri, args.collection, args.token) if args.milvus_uri else None
    models = collection_models(index) if index is not None else {}
    ids, vectors, paths = load_descriptors(args.inputs, images, models, read=read)  # refuses another model's vectors
    if index is not None:  # collections too large for this machine: let Milvus find the neighbours
        # As index adds (often to the reference collection itself): the model recorded, and an id held for
        # another image refused rather than that reference silently replaced.
        index.add(ids, vectors, index_type=args.index_type, postprocessing=postprocessing, paths=paths,
                  model=recorded_model(models), replace=False,
                  if_taken='rename those files, replace those references first (towhee-isc index ... --replace), '
                           'or dedup into another --collection')
        if index.count() > len(ids):  # others' neighbours can crowd ours out of the k looked at
            print(f'warning: collection {args.collection!r} also holds images not given here', file=sys.stderr)
        pairs = milvus_duplicate_pairs(index, ids, vectors, args.threshold, args.k, args.nprobe, args.ef)
        groups = duplicate_groups(ids, pairs, [paths.get(i) for i in ids])
    else:
        engine = choose_engine(len(vectors), len(vectors), args.exact)
        print(f'search engine: {engine.description}', flush=True)
        groups = near_duplicate_groups(ids, vectors, args.threshold, engine, [paths.get(i) for i in ids])
    for n, group in enumerate(groups, start=1):
        print(f'group {n}: keep {group.keep}; copies: ' + ', '.join(m for m in group.members if m != group.keep))
    print(f'{len(groups)} group(s) of near-duplicates among {len(ids)} images (threshold {args.threshold})')
    if args.output or args.report:
        from .reports import describe_groups, groups_report, write_groups
        described = describe_groups(groups, ids, vectors, paths)
        if args.output:
            write_groups(args.output, described)
            print(f'wrote {args.output}')
        if args.report:
            groups_report(args.report, described, len(ids), args.threshold, report_images(args, args.inputs, read))
            print(f'wrote {args.report}')


def cmd_evaluate(args) -> None:
    from .metrics import evaluate, plot_precision_recall, read_ground_truth, read_matches
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


def cmd_nes(args) -> None:
    from ..postprocess import NegativeEmbeddings
    from .descriptors import (describe_postprocessing, read_descriptors, read_image_paths, read_model,
                              read_postprocessing, write_descriptors)
    ids, vectors = read_descriptors(args.descriptors)
    done = read_postprocessing(args.descriptors)
    if done is not None:
        raise ValueError(f'{args.descriptors} is already {describe_postprocessing(done)}; post-process raw descriptors')
    from .embedding import check_same_model
    negatives = NegativeEmbeddings(args.negatives, args.dba_k, args.alpha)
    check_same_model({args.descriptors: read_model(args.descriptors), f'the negatives {args.negatives}': negatives.model})
    out = negatives.subtract(vectors, args.k, args.beta, args.iterations)
    write_descriptors(args.output, ids, out, read_image_paths(args.descriptors), model=read_model(args.descriptors),
                      postprocessing=negatives.record(args.k, args.beta, args.iterations))
    print(f'wrote {plural(len(ids), "post-processed descriptor")} to {args.output} '
          f'({len(negatives.negatives)} negatives, k={args.k}, beta={args.beta}, iterations={args.iterations})')


def cmd_serve(args) -> None:
    if not args.ray_address:  # a local Ray on 127.0.0.1 only; read when ray is imported, so set it first
        os.environ['RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER'] = '0'
    try:
        from .serve import ServiceSettings, run_service
    except ImportError as e:
        raise ImportError(f'towhee-isc serve needs Ray Serve: pip install "towhee-isc[serve]" ({e})') from e
    # The Embedder's settings, as the other commands give them (EXIF orientation, post-processing included).
    isc = {'model_name': args.model_name, 'checkpoint_path': args.checkpoint, 'timm_backbone': args.timm_backbone,
           'img_size': args.img_size, 'device': args.device,
           'batch_size': args.batch_size, **nes_settings(args)}
    settings = ServiceSettings(isc=isc, references=args.references, milvus_uri=args.milvus_uri,
                               collection=None if args.references else args.collection, token=args.token,
                               threshold=args.threshold, max_batch_size=args.max_batch_size,
                               max_body_bytes=args.max_body_mb * 2**20, upload_timeout_s=args.upload_timeout)
    gpus = 1 if args.device and args.device.startswith('cuda') else 0
    run_service(settings, args.host, args.port, args.replicas, args.ray_address, gpus)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``error: ...``, exit 2) like every other error."""

    def error(self, message: str):
        self.exit(2, f'error: {self.prog}: {message} (see {self.prog} --help)\n')


def parser() -> argparse.ArgumentParser:
    main = OneLineParser(prog='towhee-isc', description='Find image copies with the ISC21 descriptor.')
    commands = main.add_subparsers(dest='command', required=True)

    def with_model(p):
        group = p.add_argument_group('embedding images')
        group.add_argument('--checkpoint', type=checkpoint_file, help='a local checkpoint instead of the published weights')
        group.add_argument('--model-name', default='isc_ft_v107')
        group.add_argument('--timm-backbone', help='architecture of a checkpoint without metadata')
        group.add_argument('--img-size', type=positive_int, help='input size of a checkpoint without metadata')
        group.add_argument('--device', help="'cpu', 'cuda', 'cuda:N' (default: CUDA when available)")
        group.add_argument('--batch-size', type=positive_int)
        group.add_argument('--strict', action='store_true', help='an unreadable image is an error, not skipped')
        group = p.add_argument_group('post-processing (negative embedding subtraction, as the winner submitted)')
        group.add_argument('--negatives', metavar='FILE', help='post-process every vector made from images with '
                           'these negatives (a descriptor file); descriptor files must be post-processed alike')
        group.add_argument('--nes-k', type=positive_int, default=K, help=f'nearest negatives subtracted ({K})')
        group.add_argument('--nes-beta', type=finite_float, default=BETA, help=f'weight of the subtraction ({BETA})')
        group.add_argument('--nes-iterations', type=positive_int, default=ITERATIONS, help=f'repeats ({ITERATIONS})')
        group.add_argument('--nes-dba-k', type=positive_int, default=DBA_K,
                           help=f'neighbours in the augmentation of the negatives ({DBA_K})')
        group.add_argument('--nes-alpha', type=finite_float, default=ALPHA,
                           help=f'similarity exponent of the augmentation ({ALPHA})')
        return p

    def with_milvus(p):
        p.add_argument('--milvus-uri', default=DEFAULT_MILVUS_URI,
                       help='a Milvus Lite file (default ./isc.db) or http://host:19530 for a server')
        p.add_argument('--collection', default='isc')
        add_token(p)
        return p

    def with_index_type(p):
        p.add_argument('--index-type', choices=INDEX_TYPES, type=str.upper,
                       help="a new collection's index: FLAT (exact, the default), IVF_FLAT or HNSW (approximate, "
                            'for large collections); an existing collection keeps its own')
        return p

    def with_report_images(p):
        p.add_argument('--report-images', action='append', default=[], metavar='DIR',
                       help='with --report: also show the images under DIR (repeatable). By default a report shows '
                            'only the images read now and those under the folders given, never whatever paths a '
                            'descriptor file or collection names')
        return p

    def with_search_width(p):
        p.add_argument('--nprobe', type=positive_int, help='IVF_FLAT: cells searched (default nlist/8, at least 16)')
        p.add_argument('--ef', type=positive_int, help='HNSW: candidates explored (default 256, at least k)')
        return p

    p = with_model(commands.add_parser('embed', help='images -> descriptor file (resumable)'))
    p.add_argument('inputs', nargs='+', help='folders (recursive), globs, .txt file lists, image files')
    p.add_argument('-o', '--output', required=True, help='descriptor file (.h5)')
    p.add_argument('--chunk-size', type=positive_int, default=64, help='images per saved chunk')
    group = p.add_argument_group('on a Ray cluster (pip install \'towhee-isc[ray]\')')
    group.add_argument('--ray-address', help="embed on the Ray cluster at 'auto' or HOST:PORT; images, checkpoint "
                                             'and output folder must be on storage every node shares')
    group.add_argument('--actors', type=positive_int, help='embedding processes (default: as many as the cluster holds)')
    group.add_argument('--cpus-per-actor', type=finite_float, default=1, help='CPUs each reserves, and its threads (default 1)')
    group.add_argument('--gpus-per-actor', type=finite_float, default=0, help='GPUs each reserves (default 0)')
    p.set_defaults(run=cmd_embed)

    p = with_index_type(with_milvus(with_model(commands.add_parser('index', help='descriptors or images -> Milvus'))))
    p.add_argument('inputs', nargs='+')
    p.add_argument('--replace', action='store_true',
                   help='replace references whose ids are indexed already for another image (refused otherwise)')
    p.set_defaults(run=cmd_index)

    p = with_search_width(with_milvus(with_model(commands.add_parser('search', help='queries -> prediction CSV'))))
    p.add_argument('queries', nargs='+', help='descriptor files or images')
    p.add_argument('--references', nargs='+', help='search these (descriptor files or images) exactly, no database')
    p.add_argument('-k', type=positive_int, default=10, help='matches per query')
    p.add_argument('--threshold', type=finite_float, help='keep matches scoring at least this')
    p.add_argument('--score-norm', help='background descriptor file for score normalisation')
    p.add_argument('--factor', type=score_factor, default=1.0,
                   help='score -= factor x similarity to the nth background neighbour')
    p.add_argument('--nth', type=positive_int, default=1)
    p.add_argument('-o', '--output', required=True, help='prediction CSV: query_id,reference_id,score')
    p.add_argument('--report', help='also write an HTML page: each query beside its k matches, with thumbnails')
    with_report_images(p)
    p.add_argument('--report-queries', type=positive_int, default=DEFAULT_REPORT_QUERIES, metavar='N',
                   help=f'queries shown in the report, the first by id ({DEFAULT_REPORT_QUERIES}); its summary counts all')
    p.add_argument('--ground-truth', metavar='CSV', help='with --report: mark each match true or false and list '
                   "each query's missed references (query_id,reference_id, as evaluate reads it)")
    p.add_argument('--exact', action='store_true', help='with --references: exact search even for large sets')
    p.set_defaults(run=cmd_search)

    p = with_search_width(with_index_type(with_model(commands.add_parser('dedup', help='near-duplicate groups within one collection'))))
    p.add_argument('inputs', nargs='+', help='descriptor files or images')
    p.add_argument('--threshold', type=cosine, default=0.8, help='similarity that makes two images copies')
    p.add_argument('-o', '--output', help='groups as CSV (with scores, resolutions and file sizes), or JSON if '
                   'it ends in .json')
    p.add_argument('--report', help='also write an HTML page: every group as a row of thumbnails, the kept one marked')
    with_report_images(p)
    p.add_argument('--milvus-uri', help='find neighbours through this Milvus (for collections beyond one machine)')
    p.add_argument('--collection', default='isc_dedup')
    add_token(p)
    p.add_argument('-k', type=positive_int, default=100, help='with --milvus-uri: neighbours looked at per image')
    p.add_argument('--exact', action='store_true', help='exact search even for large collections (slow beyond ~100,000)')
    p.set_defaults(run=cmd_dedup)

    p = with_milvus(with_model(commands.add_parser('serve', help='an HTTP copy-detection service (Ray Serve)')))
    p.add_argument('--references', help='a descriptor file to search exactly instead of a Milvus collection')
    p.add_argument('--host', default='127.0.0.1', help='address to listen on (default 127.0.0.1: this machine only)')
    p.add_argument('--port', type=positive_int, default=8000)
    p.add_argument('--replicas', type=positive_int, default=1, help='replicas, each holding one operator')
    p.add_argument('--max-batch-size', type=positive_int, default=8, help='concurrent uploads embedded together')
    p.add_argument('--threshold', type=finite_float, default=0.8, help="score that makes a match (requests' default)")
    p.add_argument('--max-body-mb', type=positive_int, default=32, help='largest upload accepted, in MB')
    p.add_argument('--upload-timeout', type=positive_float, default=30.0, metavar='SECONDS',
                   help='an upload whose body has not arrived whole by then gets a 408 (default 30)')
    p.add_argument('--ray-address', help='a Ray cluster to deploy on (default: a local Ray on 127.0.0.1)')
    p.set_defaults(run=cmd_serve)

    p = commands.add_parser('evaluate', help="the challenge's metrics for a prediction CSV")
    p.add_argument('matches')
    p.add_argument('ground_truth')
    p.add_argument('--plot', help='precision-recall curve (PNG)')
    p.add_argument('--json', action='store_true')
    p.set_defaults(run=cmd_evaluate)

    p = commands.add_parser('nes', help="the winner's post-processing of a descriptor file (negative embedding subtraction)")
    p.add_argument('descriptors', help='raw descriptor file (.h5)')
    p.add_argument('--negatives', required=True, metavar='FILE', help='descriptor file of images with no copies of the references')
    p.add_argument('-o', '--output', required=True, help='post-processed descriptor file (.h5): the same ids, in order')
    p.add_argument('--k', type=positive_int, default=K, help=f'nearest augmented negatives subtracted (default {K})')
    p.add_argument('--beta', type=finite_float, default=BETA, help=f'weight of the subtraction (default {BETA})')
    p.add_argument('--iterations', type=positive_int, default=ITERATIONS, help=f'repeats (default {ITERATIONS}, at most 20)')
    p.add_argument('--dba-k', type=positive_int, default=DBA_K, help=f'neighbours in the augmentation (default {DBA_K})')
    p.add_argument('--alpha', type=finite_float, default=ALPHA, help=f'similarity exponent of the augmentation (default {ALPHA})')
    p.set_defaults(run=cmd_nes)

    from ..training.cli import add_parser as add_train_parser  # light: nothing heavy until it runs
    add_train_parser(commands)
    from ..video.cli import add_parser as add_video_parser  # light: the video commands import their work when run
    add_video_parser(commands, with_model)
    for p in commands.choices.values():  # every command, whichever room defines it
        if '--quiet' not in p._option_string_actions:
            p.add_argument('--quiet', action='store_true',
                           help='no progress lines on stderr (they are drawn only on a terminal anyway)')
    return main


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """``1 descriptor``, ``2 descriptors``; ``nouns`` where it is not ``noun`` + s (``1 query``, ``2 queries``)."""
    return f'{n} {noun}' if n == 1 else f'{n} {nouns or noun + "s"}'


def command_list() -> str:
    """One line per command with its help, as ``python -m towhee_isc --help`` lists them."""
    commands = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    width = max(map(len, commands.choices))
    return '\n'.join(f'  {a.dest:<{width}}  {a.help}' for a in commands._choices_actions)


def checkpoint_file(text: str) -> str:
    """--checkpoint: an existing file, answered at once (the model's own check comes after torch's import)."""
    from ..weights import checkpoint_file_problem
    problem = checkpoint_file_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a whole number') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be at least 1, got {value}')
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f'must be above 0, got {text!r}')
    return value


TOKEN_VARIABLE = 'TOWHEE_ISC_MILVUS_TOKEN'


def add_token(p: argparse.ArgumentParser) -> None:
    """``--token``, by default from the environment: a command line is readable by every user of the
    machine (``ps``), a process's environment only by its owner."""
    p.add_argument('--token', default=os.environ.get(TOKEN_VARIABLE),
                   help=f"a Milvus server's 'user:password' or API key, where it requires one (default: "
                        f"${TOKEN_VARIABLE}; prefer it on a shared machine, where others see command lines)")


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f'must be a finite number, got {text!r}')
    return value


def score_factor(text: str) -> float:
    """``--factor``, 0 to 10 (the winner used 1): a huge one overflows the scores to -inf."""
    value = finite_float(text)
    if not 0 <= value <= 10:
        raise argparse.ArgumentTypeError(f'must be from 0 to 10, got {text!r}')
    return value


def cosine(text: str) -> float:
    """A cosine similarity, -1 to 1: '--threshold 80' (a percentage) would otherwise find nothing, silently."""
    value = finite_float(text)
    if not -1 <= value <= 1:
        hint = f' (a percentage? {value:g}% is {value / 100:g})' if 10 <= value <= 100 else ''
        raise argparse.ArgumentTypeError(f'must be a cosine similarity from -1 to 1, got {text!r}{hint}')
    return value


# Files each command writes, checked before any work so a long run does not fail at its end.
OUTPUTS = {'output': 'output', 'report': '--report', 'plot': '--plot'}
# Arguments naming what commands read: an output must never be one of them, nor a file they list or match.
INPUTS = ('inputs', 'videos', 'queries', 'references', 'score_norm', 'negatives', 'descriptors', 'matches',
          'ground_truth', 'checkpoint', 'report_images')


def check_outputs(args: argparse.Namespace) -> None:
    """Each output can be written and replaces nothing the user keeps: it is none of the files the run reads
    (``search q.h5 -o q.h5`` would replace the queries with CSV; ``search list.txt -o scan.jfif`` a photo the
    list names), compared as files (a link, ``./``, another spelling: the same file), and no existing image
    or video (by content, whatever its name: a camcorder's .MOD, an iPhone's .HEIC) or file with an image's
    or video's suffix, nor a file of another kind than this output's (see output_kind: ``dedup -o refs.h5``,
    a camera's RAW): ``embed -o photos/*.jpg``, expanded by the shell, or ``dedup photos -o photos/a.jpg``
    would replace a photo that is no input, or one a folder gives (a folder gives only files with those
    suffixes)."""
    from ..images import is_image_file
    from ..video.reader import VIDEO_SUFFIXES, is_media_file
    from .descriptors import IMAGE_SUFFIXES
    named = [str(p) for name in INPUTS for p in _listed(getattr(args, name, None))]
    for name, what in OUTPUTS.items():
        target = getattr(args, name, None)
        if not target:
            continue
        check_writable(target, what)
        if not os.path.isfile(target):  # nothing there to replace (check_writable refused folders and devices)
            continue
        suffix = os.path.splitext(str(target))[1].lower()
        if is_media_file(target) or name != 'plot' and (suffix in IMAGE_SUFFIXES | VIDEO_SUFFIXES
                                                          or is_image_file(target)):
            raise ValueError(f'{what} {str(target)!r} is an existing image or video: writing it would destroy it; '
                             'give another file name')
        written = os.stat(target)
        for path, how in _files_read(named):
            try:
                same = os.path.samestat(written, os.stat(path))
            except (OSError, ValueError):  # missing (the run reports it) or not a file name
                continue
            if same:
                raise ValueError(f'{what} {str(target)!r} is also an input ({path}{how}): writing it would destroy '
                                 'it; give another file name')
        kind = output_kind(args, name)
        if not is_of_kind(target, kind):
            raise ValueError(f'{what} {str(target)!r} is an existing file that is not {kind}, the kind this command '
                             'writes there: writing it would destroy it; give another file name')


# The kind of file each output is: text (CSV, JSON, HTML) unless named here. An existing output is replaced only
# if it is empty or of that kind: anything else is something the user keeps, whatever its name (descriptors of
# another run given as dedup's CSV, a spreadsheet, a camera's RAW); no list of other kinds is ever complete.
_OUTPUT_KINDS = {('embed', 'output'): 'HDF5', ('nes', 'output'): 'HDF5', ('video embed', 'output'): 'npz',
                 ('evaluate', 'plot'): 'PNG'}


def output_kind(args: argparse.Namespace, name: str) -> str:
    """'text', 'HDF5', 'npz' or 'PNG': what this command writes to its output argument ``name`` (see OUTPUTS)."""
    command = ' '.join(c for c in (args.command, getattr(args, 'video_command', None)) if c)
    return _OUTPUT_KINDS.get((command, name), 'text')


def is_of_kind(path: str | os.PathLike, kind: str) -> bool:
    """Whether the file at ``path`` is empty or of ``kind`` (see output_kind): HDF5 or PNG by signature, an npz
    as a zip of .npy files only, text as UTF-8 without NUL bytes in its first 4 KiB."""
    with open(path, 'rb') as f:
        head = f.read(4096)
    if not head:
        return True
    if kind == 'HDF5':
        return head.startswith(b'\x89HDF\r\n\x1a\n')
    if kind == 'PNG':
        return head.startswith(b'\x89PNG\r\n\x1a\n')
    if kind == 'npz':  # a user's zip of arrays and notes, or a .docx, is no npz of ours
        import zipfile
        try:
            with zipfile.ZipFile(path) as archive:
                return all(name.endswith('.npy') for name in archive.namelist())
        except (zipfile.BadZipFile, OSError, ValueError):
            return False
    if b'\0' in head:
        return False
    try:
        head.decode('utf-8')
    except UnicodeDecodeError as e:
        return e.start >= len(head) - 3 and e.reason == 'unexpected end of data'  # a character cut at 4 KiB
    return True


def _files_read(named: Sequence[str]) -> Iterator[tuple[str, str]]:
    """(path, how it is reached) for every file the run reads: those named, those a ``.txt`` list names
    and those a glob matches, as ``descriptors.find_images`` expands them."""
    import glob
    from .descriptors import _listed_paths, matched_files
    for item in named:
        yield item, ''
        if item.lower().endswith('.txt') and os.path.isfile(item):
            try:
                yield from ((str(p), f', listed in {item}') for p in _listed_paths(Path(item)))
            except (OSError, ValueError):  # not a list of paths: the run says so
                pass
        elif not os.path.exists(item) and glob.has_magic(item):
            yield from ((str(p), f', matched by {item!r}') for p in matched_files(item))


def _listed(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Any failure is one line on stderr and exit code 2 (argparse's own usage
    errors too); set TOWHEE_ISC_DEBUG=1 to see the traceback of an unexpected one."""
    args = parser().parse_args(argv)
    warnings.showwarning = one_line_warning
    set_quiet(args.quiet)
    try:
        check_outputs(args)
        args.run(args)
    except KeyboardInterrupt:
        resumable = args.command == 'embed' or getattr(args, 'video_command', None) == 'embed'
        print('interrupted' + ('; run the same command again to continue' if resumable else ''),
              file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, ImportError) as e:
        print(f'error: {one_line(e)}', file=sys.stderr)
        return 2
    except Exception as e:  # a library's own exception: still one line, never a traceback
        if os.environ.get('TOWHEE_ISC_DEBUG'):
            raise
        print(f'error: {type(e).__name__}: {one_line(e)} (set TOWHEE_ISC_DEBUG=1 for the traceback)', file=sys.stderr)
        return 2
    finally:
        set_quiet(False)  # --quiet is this command's; the process may run more (tests, the Python API)
    return 0


def one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as the command's own lines (``warning: ...``), not Python's file:line and source."""
    print(f'warning: {one_line(message)}', file=sys.stderr if file is None else file)


# The Python API's argument names in messages, as a command-line user writes them.
FLAGS = {'checkpoint_path=': '--checkpoint FILE'}


def one_line(error: BaseException | Warning | str) -> str:
    """A message on one line, naming command-line flags rather than the Python arguments they set."""
    text = ' '.join(str(error).split())
    for argument, flag in FLAGS.items():
        text = text.replace(argument, flag)
    return text or type(error).__name__


if __name__ == '__main__':
    sys.exit(main())
