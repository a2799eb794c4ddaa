"""A checkpoint fine-tuned by `towhee-isc train` for benchmarks/video.py, trained only on photos the
benchmark's videos are not made of (they use every scikit-image photo).

    nice -n 19 .venv/bin/python benchmarks/finetuned_checkpoint.py -o DIR [--photos FILE ...]
    nice -n 19 .venv/bin/python benchmarks/video.py --checkpoint DIR/train/checkpoint_epoch0003.pth.tar ...

Writes DIR/images/ (each photo's 3 x 3 tiles, ``--photo-crops`` random crops of the photos at 3-50 % of
their area and ``--photo-leaves`` dead leaves textured with them, as benchmarks/train_quality.py makes
them), DIR/start.pth.tar (``make_synthetic_checkpoint``: ``--arch`` at ``--img-size`` px, random
weights, as the benchmark's default, its BatchNorm set on these photos), then runs the real
`python -m towhee_isc train` from it into DIR/train/ and prints the command, its CPU time and the last
checkpoint. A photo within 12 bits of a scikit-image photo's perceptual hash is refused.

The default photos are matplotlib's Grace Hopper and, where they are on the disk, the Google Cloud SDK's
Jetty demo picture (sky and a pier) and the Rust embedded book's photo of a circuit board; scikit-learn's
china.jpg and flower.jpg are in its wheel (``sklearn/datasets/images/``) and can be added with --photos.
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from train_quality import extra_photo, photo_crops, photo_leaves, tiles  # noqa: E402

from towhee_isc.testing import make_synthetic_checkpoint  # noqa: E402
from towhee_isc.video.synthetic import PHOTOS, photos  # noqa: E402

FOUND_HERE = ('/usr/lib/google-cloud-sdk/platform/google_appengine/google/appengine/tools/java/jetty12/jetty-home/'
              'modules/demo.d/root/images/jetty-pic.png',
              '/root/.rustup/toolchains/stable-x86_64-unknown-linux-gnu/share/doc/rust/html/embedded-book/assets/f3.jpg')


def default_photos() -> list[str]:
    import matplotlib
    return [str(Path(matplotlib.get_data_path()) / 'sample_data' / 'grace_hopper.jpg')] + \
        [p for p in FOUND_HERE if Path(p).is_file()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('-o', '--output', required=True, help='folder for images/, start.pth.tar and train/')
    parser.add_argument('--photos', nargs='+', help='training photos (default: see the module docstring)')
    parser.add_argument('--photo-crops', type=int, default=500)
    parser.add_argument('--photo-leaves', type=int, default=500)
    parser.add_argument('--benchmark-photos', action='store_true',
                        help="train on the benchmark's own photos instead: fitting to the test, only to see how far "
                             'training could go at best')
    parser.add_argument('--arch', default='resnet18')
    parser.add_argument('--img-size', type=int, default=96, help='the checkpoint\'s input size (inference)')
    parser.add_argument('--seed', type=int, default=0)
    args, train_flags = parser.parse_known_args()
    out = Path(args.output)
    if (out / 'images').exists():
        raise SystemExit(f'error: {out / "images"} exists: choose a new --output')
    held = photos(PHOTOS + ('horse',))  # everything benchmarks/video.py renders from
    if args.benchmark_photos:
        names, train = list(PHOTOS + ('horse',)), held
    else:
        names = args.photos or default_photos()
        train = [extra_photo(p, held) for p in names]
    rng = np.random.default_rng(args.seed)
    images = [t for photo in train for t in tiles(photo, 3)] + photo_crops(rng, train, args.photo_crops) + \
        [photo_leaves(rng, train) for _ in range(args.photo_leaves)]
    (out / 'images').mkdir(parents=True)
    for i, image in enumerate(images):
        image.save(out / 'images' / f'{i:05d}.png')
    make_synthetic_checkpoint(out / 'start.pth.tar', args.arch, args.img_size, train, seed=args.seed)
    command = [sys.executable, '-m', 'towhee_isc', 'train', str(out / 'images'), '-o', str(out / 'train'),
               '--checkpoint', str(out / 'start.pth.tar'), '--device', 'cpu', '--seed', str(args.seed), '--quiet',
               *train_flags]
    print('photos:', ', '.join(names), f'; {len(images)} training images', flush=True)
    print(' '.join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f'trained in {time.perf_counter() - started:.0f} s of wall time, '
          f'{usage.ru_utime + usage.ru_stime:.0f} s of CPU time', flush=True)
    print(sorted((out / 'train').glob('checkpoint_epoch*.pth.tar'))[-1])


if __name__ == '__main__':
    main()
