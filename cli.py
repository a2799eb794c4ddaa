"""``towhee-isc`` (also ``python -m towhee_isc``): embed, index, search, dedup, evaluate.

Every command is a thin shell over the Python API (``embed_collection``, ``MilvusIndex``,
``search_exact``, ``duplicate_groups``, ``evaluate``); errors are one line and exit code 2.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .descriptors import embed_resumable, find_images, image_id, read_descriptors, read_image_paths
from .matching import (DEFAULT_MILVUS_URI, MilvusIndex, duplicate_groups, html_report, milvus_duplicate_pairs,
                       near_duplicate_pairs, nth_neighbour_similarity, search_exact)
from .metrics import evaluate, plot_precision_recall, read_ground_truth, read_matches, write_matches

COMMANDS = ('embed', 'index', 'search', 'dedup', 'evaluate')
DESCRIPTOR_SUFFIXES = ('.h5', '.hdf5')


class Embedder:
    """The operator, made on first use, with the command's options; skips unreadable images.
    Photos are turned upright by their EXIF orientation, as people see them."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self._op = None

    @property
    def op(self):
        if self._op is None:
            from .isc import Isc
            self._op = Isc(model_name=self.args.model_name, checkpoint_path=self.args.checkpoint,
                           device=self.args.device, batch_size=self.args.batch_size, exif_transpose=True)
        return self._op

    def __call__(self, paths: list[Path]) -> tuple[list[np.ndarray], list[int]]:
        """Vectors of the readable images, and the indices of the others (an error with --strict)."""
        try:
            return self.op(paths), []
        except ValueError:
            if self.args.strict:
                raise
        vectors, failed = [], []
        for i, path in enumerate(paths):  # find which ones failed
            try:
                vectors.append(self.op(path))
            except ValueError:
                failed.append(i)
        return vectors, failed


def embed_collection(inputs: Sequence[str], output: str, embedder: Embedder, chunk_size: int = 64,
                     quiet: bool = False) -> tuple[int, list[Path], float]:
    """Embed images into a descriptor file, resumably. Returns (rows written, skipped files, images/s)."""
    images = find_images(inputs)
    started, embedded, reached = time.perf_counter(), 0, 0
    bar = None
    if not quiet:
        from tqdm import tqdm
        bar = tqdm(total=len(images), unit='img', file=sys.stderr, smoothing=0.1)

    def progress(done: int, resumed: bool) -> None:
        """``done`` images are finished; the last chunk was saved by an earlier run if ``resumed``."""
        nonlocal embedded, reached
        step, reached = done - reached, done
        if not resumed:
            embedded += step
        if bar:
            bar.update(step)

    skipped = embed_resumable(images, output, embedder, chunk_size, progress)
    if bar:
        bar.close()
    seconds = time.perf_counter() - started
    return len(images) - len(skipped), [images[i] for i in skipped], embedded / seconds if seconds else 0.0


def load_descriptors(inputs: Sequence[str], embedder: Embedder) -> tuple[list[str], np.ndarray, dict[str, str]]:
    """Descriptor files as they are, or images embedded now: (ids, vectors, id -> image path)."""
    if all(str(i).lower().endswith(DESCRIPTOR_SUFFIXES) for i in inputs):
        ids, vectors, paths = [], [], {}
        for path in inputs:
            file_ids, file_vectors = read_descriptors(path)
            ids += file_ids
            vectors.append(file_vectors)
            paths.update(zip(file_ids, read_image_paths(path) or []))
        if len(set(ids)) != len(ids):
            raise ValueError('the descriptor files repeat image ids')
        return ids, np.concatenate(vectors), paths
    images = find_images(inputs)
    vectors, failed = embedder(images)
    if failed:
        print(f'skipped {len(failed)} unreadable file(s): ' + ', '.join(str(images[i]) for i in failed), file=sys.stderr)
    kept = [p for i, p in enumerate(images) if i not in set(failed)]
    ids = [image_id(p) for p in kept]
    return ids, np.stack(vectors), dict(zip(ids, map(str, kept)))


def cmd_embed(args) -> None:
    written, skipped, rate = embed_collection(args.inputs, args.output, Embedder(args), args.chunk_size, args.quiet)
    print(f'wrote {written} descriptors to {args.output} ({rate:.2f} images/s)')
    if skipped:
        print(f'skipped {len(skipped)} unreadable or non-image file(s):', file=sys.stderr)
        for path in skipped:
            print(f'  {path}', file=sys.stderr)


def cmd_index(args) -> None:
    ids, vectors, _ = load_descriptors(args.inputs, Embedder(args))
    index = MilvusIndex(args.milvus_uri, args.collection)
    index.add(ids, vectors)
    print(f'indexed {len(ids)} descriptors into {args.collection!r} at {args.milvus_uri} ({index.count()} in all)')


def cmd_search(args) -> None:
    embedder = Embedder(args)
    query_ids, queries, query_paths = load_descriptors(args.queries, embedder)
    offsets = None
    if args.score_norm:
        _, background = read_descriptors(args.score_norm, dim=queries.shape[1])
        offsets = args.factor * nth_neighbour_similarity(queries, background, args.nth)
    if args.references:
        reference_ids, references, reference_paths = load_descriptors(args.references, embedder)
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
    ids, vectors, paths = load_descriptors(args.inputs, Embedder(args))
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
        rows = [{'group': n, 'image_id': m, 'path': paths.get(m, ''), 'keep': m == g.keep}
                for n, g in enumerate(groups, start=1) for m in g.members]
        tmp = args.output + '.tmp'
        with open(tmp, 'w', newline='', encoding='utf-8') as f:
            if args.output.lower().endswith('.json'):
                json.dump([{'keep': g.keep, 'members': g.members} for g in groups], f, indent=1)
            else:
                writer = csv.DictWriter(f, fieldnames=['group', 'image_id', 'path', 'keep'])
                writer.writeheader()
                writer.writerows(rows)
        os.replace(tmp, args.output)
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
