"""Training throughput of the fine-tuning recipe (``towhee_isc.training``): images/s through the network
(every view counts), end to end (loading and augmenting included) and for the network step alone.

    python benchmarks/train.py --arch resnet18 --input-size 96 --batch-size 16 --steps 6 --device cpu
    python benchmarks/train.py --arch tf_efficientnetv2_m.in21k_ft_in1k --input-size 256 --batch-size 64 \\
        --steps 30 --device cuda --precision bf16 --workers 14

The images are made here (smooth random colour fields with shapes, 320 x 240 JPEGs), so it runs offline.
The network starts from random weights (throughput does not depend on them). The first 3 steps are
warm-up and not counted.

Quality (recall@1 and muAP on an offline copy set after a few CPU minutes of training, beside the
untrained network and a perceptual hash) is measured by ``benchmarks/train_quality.py``.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

WARM_UP = 3


def make_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        field = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        image = Image.fromarray(field).resize((320, 240), Image.BICUBIC)
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x, y = rng.integers(0, 280), rng.integers(0, 200)
            draw.ellipse((x, y, x + rng.integers(10, 80), y + rng.integers(10, 80)),
                         fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        path = folder / f'{i:05d}.jpg'
        image.save(path, quality=90)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--arch', default='resnet18')
    parser.add_argument('--input-size', type=int, default=96)
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--steps', type=int, default=6, help='counted steps (after 3 of warm-up)')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--precision', default='fp32')
    parser.add_argument('--workers', type=int, default=0)
    parser.add_argument('--ncrops', type=int, default=2)
    args = parser.parse_args()

    import torch
    from towhee_isc.training.config import TrainConfig
    from towhee_isc.training.run import fresh_net, train

    steps = args.steps + WARM_UP
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter('ignore')
        paths = make_images(Path(tmp), steps * args.batch_size)
        net = fresh_net(args.arch)
        seen: list[tuple[float, int, float]] = []
        started = [0.0]

        def on_step(step) -> None:
            if step.step == WARM_UP:
                if args.device.startswith('cuda'):
                    torch.cuda.synchronize()
                started[0] = time.perf_counter()
            elif step.step > WARM_UP:
                seen.append((step.seconds, step.images, step.loss))

        config = TrainConfig(output_dir=os.path.join(tmp, 'out'), epochs=1, batch_size=args.batch_size,
                             init_lr=0.1, device=args.device, precision=args.precision, workers=args.workers,
                             ncrops=args.ncrops, memory_size=4 * args.batch_size * args.ncrops, quiet=True)
        train(paths, net, args.input_size, config, on_step=on_step)
        wall = time.perf_counter() - started[0]
    images = sum(n for _, n, _ in seen)
    compute = sum(s for s, _, _ in seen)
    print(f'{args.arch} at {args.input_size} px, batch {args.batch_size} x {args.ncrops} views, {args.precision} on '
          f'{args.device}, {args.workers} loader workers, {len(seen)} steps counted')
    print(f'end to end: {images / wall:.1f} images/s   network step alone: {images / compute:.1f} images/s   '
          f'last loss {seen[-1][2]:.4f}')


if __name__ == '__main__':
    main()
