"""``towhee-isc train IMAGES... -o OUTPUT_DIR``: the parser (light: nothing heavy is imported to build it)
and the command, a thin shell over ``training.run.train``."""
from __future__ import annotations

import argparse
import sys

from ..workflow.cli import finite_float  # the one finite-number parser of every command
from .config import PRECISIONS, TrainConfig

DEFAULTS = TrainConfig()


def _whole(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not a whole number') from None
        if value < low:
            raise argparse.ArgumentTypeError(f'must be at least {low}, got {value}')
        return value
    return parse


def _edit_probability(text: str) -> tuple[str, float]:
    """'NAME=P' (--hard-p) -> (NAME, P); names and ranges are checked with the other settings."""
    name, sep, value = text.partition('=')
    try:
        return name.strip(), finite_float(value)
    except (argparse.ArgumentTypeError, ValueError):
        pass
    raise argparse.ArgumentTypeError(f'{text!r} is not NAME=PROBABILITY (e.g. greyscale=0.5)')


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser('train', help="fine-tune the network on your images (the winner's self-supervised recipe)",
                              description='Fine-tune the ISC network on unlabelled images: every image gives ncrops '
                                          'augmented views that must stay close, while other images are pushed apart.')
    p.add_argument('inputs', nargs='+', help='folders (recursive), globs, .txt file lists, image files (with --pairs: '
                                             'images that are not copies, the negatives)')
    p.add_argument('-o', '--output-dir', required=True, help='checkpoint_epoch%%04d.pth.tar and train_log.jsonl go here')
    start = p.add_argument_group('the network to start from (default: the published isc_ft_v107)')
    from ..workflow.cli import checkpoint_file
    start.add_argument('--checkpoint', type=checkpoint_file, help='a checkpoint in the official format')
    start.add_argument('--model-name', default='isc_ft_v107', help='published weights (isc_ft_v107, isc_selfsup_v98)')
    start.add_argument('--timm-backbone', help='a timm architecture: with --checkpoint, its architecture; alone, a new '
                                               'network (timm pretrained weights if cached locally, else random)')
    start.add_argument('--img-size', type=_whole(32), help='input size recorded for inference (default: the '
                                                          "checkpoint's; 224 for a new network)")
    run = p.add_argument_group('training')
    run.add_argument('--epochs', type=_whole(1), default=DEFAULTS.epochs)
    run.add_argument('--batch-size', type=_whole(2), default=DEFAULTS.batch_size, help='images per step, all processes')
    run.add_argument('--lr', type=finite_float, default=DEFAULTS.init_lr, help='initial SGD learning rate, decayed linearly to 0')
    run.add_argument('--weight-decay', type=finite_float, default=DEFAULTS.weight_decay)
    run.add_argument('--memory-size', type=_whole(0), default=DEFAULTS.memory_size, help='cross-batch memory (embeddings)')
    run.add_argument('--ncrops', type=_whole(2), default=DEFAULTS.ncrops, help='views per image')
    run.add_argument('--hard-p-scale', type=finite_float, default=DEFAULTS.hard_p_scale,
                     help="times each hard-view edit's probability (1: the winner's; 0.5: gentler, for small networks)")
    run.add_argument('--hard-p', type=_edit_probability, action='append', metavar='EDIT=P',
                     help="one hard-view edit's probability, set outright (repeatable): overlay, rotate, colour, pixelize, "
                          'shuffle, jpeg, greyscale, blur, perspective, text, emoji, edge, erase')
    run.add_argument('--colour-jitter', type=finite_float, default=DEFAULTS.colour_jitter,
                     help="hard views' brightness/contrast/saturation jitter, hue a quarter of it (the winner's 0.8)")
    run.add_argument('--warmup', type=finite_float, default=DEFAULTS.warmup,
                     help='fraction of the steps over which the lr rises to --lr before decaying (default 0)')
    run.add_argument('--gem-p', type=finite_float, default=DEFAULTS.gem_p, help='GeM power while training')
    run.add_argument('--input-size', type=_whole(32), help='training crop size (default: --img-size)')
    run.add_argument('--seed', type=_whole(0), default=DEFAULTS.seed)
    run.add_argument('--workers', type=_whole(0), default=DEFAULTS.workers, help='image loading processes')
    run.add_argument('--pairs', metavar='CSV', help='second stage (exp/v107.py): known copies, columns query,reference; '
                                                    'each pair trained against --negatives of the images')
    run.add_argument('--negatives', type=_whole(0), default=DEFAULTS.negatives, help='non-copies per pair (--pairs)')
    run.add_argument('--resume', metavar='CHECKPOINT', help='continue a run from one of its checkpoints')
    run.add_argument('--device', help="'cpu', 'cuda', 'cuda:N' (default: CUDA when available)")
    run.add_argument('--precision', choices=PRECISIONS, default='fp32', help='autocast on GPUs')
    run.add_argument('--distributed', action='store_true', help='every local GPU (DistributedDataParallel); '
                                                                'under torchrun, every process it starts')
    run.add_argument('--quiet', action='store_true', help='no progress bar')
    p.set_defaults(run=run_command)
    return p


def run_command(args: argparse.Namespace) -> None:
    config = TrainConfig(output_dir=args.output_dir, epochs=args.epochs, batch_size=args.batch_size, init_lr=args.lr,
                         weight_decay=args.weight_decay, memory_size=args.memory_size, ncrops=args.ncrops,
                         hard_p_scale=args.hard_p_scale, hard_p=dict(args.hard_p or ()),
                         colour_jitter=args.colour_jitter, warmup=args.warmup,
                         gem_p=args.gem_p, input_size=args.input_size, seed=args.seed, workers=args.workers,
                         device=args.device, precision=args.precision, distributed=args.distributed,
                         resume=args.resume, quiet=args.quiet, pairs=args.pairs, negatives=args.negatives,
                         extra_args={'start': args.checkpoint or args.timm_backbone or args.model_name}).check()
    from ..workflow.descriptors import find_images  # after the settings are checked: a mistake is answered at once
    from .run import TrainingInterrupted, initial_net, train
    images = find_images(args.inputs)
    if config.pairs is not None:
        from .pairs import read_pairs
        read_pairs(config.pairs)  # a bad pairs file is reported before a network is loaded (or downloaded)
    net, img_size = initial_net(args.model_name, args.checkpoint, args.timm_backbone, args.img_size,
                                resuming=args.resume is not None)
    try:
        result = train(images, net, img_size, config)
    except TrainingInterrupted as e:
        print(f'interrupted; saved {e.checkpoint}: run the same command with --resume {e.checkpoint} to continue'
              if e.checkpoint else 'interrupted', file=sys.stderr)
        raise SystemExit(130) from None
    if result.skipped:
        print(f'skipped {len(result.skipped)} unreadable or non-image file(s):', file=sys.stderr)
        for path, reason in result.skipped.items():
            print(f'  {path}: {reason}', file=sys.stderr)
    if result.checkpoints:
        print(f'wrote {len(result.checkpoints)} checkpoint(s) to {args.output_dir}; the last: {result.last}')
