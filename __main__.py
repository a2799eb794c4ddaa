"""``python -m towhee_isc IMAGE...``: print each image's ISC descriptor (summary, or full with --json).

``python -m towhee_isc COMMAND ...`` runs the ``towhee-isc`` commands (listed below).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .weights import DEFAULT_WEIGHTS, WEIGHTS
from .workflow.cli import COMMANDS, OneLineParser, checkpoint_file, command_list, one_line


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog='python -m towhee_isc', description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog='commands (python -m towhee_isc COMMAND --help for each; the same as '
                                  'towhee-isc COMMAND):\n' + command_list())
    parser.add_argument('images', nargs='+', help='image files')
    parser.add_argument('--checkpoint', metavar='FILE', type=checkpoint_file,
                        help='a local checkpoint instead of the published weights')
    parser.add_argument('--model-name', default=DEFAULT_WEIGHTS, choices=sorted(WEIGHTS),
                        help='published weights (downloaded once into torch hub\'s cache)')
    parser.add_argument('--timm-backbone', help='architecture of a checkpoint without metadata')
    parser.add_argument('--img-size', type=int, help='input size of a checkpoint without metadata')
    parser.add_argument('--device', help="'cpu', 'cuda' or 'cuda:N' (default: CUDA when available)")
    parser.add_argument('--json', action='store_true', help='print full vectors as JSON lines')
    args = parser.parse_args(argv)
    for path in args.images:  # a mistyped path is answered before torch loads (that took 30-40 s)
        if os.path.isdir(path):
            print(f'error: {path!r} is a folder: give image files (towhee-isc embed FOLDER -o OUT.h5 takes folders)',
                  file=sys.stderr)
            return 2
        if not os.path.isfile(path):
            problem = 'is not a regular file' if os.path.exists(path) else 'not found'
            print(f'error: image file {problem}: {path!r}', file=sys.stderr)
            return 2
    import numpy as np  # only now: --help and usage errors answer without numpy, torch or Towhee
    from .isc import Isc
    try:
        op = Isc(model_name=args.model_name, checkpoint_path=args.checkpoint, timm_backbone=args.timm_backbone,
                 img_size=args.img_size, device=args.device)
        vectors = op(args.images)
    except (ValueError, TypeError, OSError, ImportError) as e:
        print(f'error: {one_line(e)}', file=sys.stderr)
        return 2
    for path, vector in zip(args.images, vectors):
        if args.json:
            print(json.dumps({'path': path, 'embedding': vector.tolist()}))
        else:
            head = ' '.join(f'{v:+.4f}' for v in vector[:4])
            print(f'{path}\tdim={vector.size} norm={np.linalg.norm(vector):.4f} [{head} ...]')
    return 0


def is_command(first: str) -> bool:
    """A workflow command (or a mistyped one: a word that is no file), rather than an image path."""
    return first in COMMANDS or (first.isidentifier() and not os.path.exists(first))


if __name__ == '__main__':
    try:
        from .workflow.cli import main as command_main
        sys.exit(command_main() if sys.argv[1:2] and is_command(sys.argv[1]) else main())
    except KeyboardInterrupt:  # Ctrl-C while the libraries load: exit 130 without a traceback, as later
        sys.exit(130)
