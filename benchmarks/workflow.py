"""The workflow at scale: ``towhee-isc embed`` on many images vs the operator's own batched
throughput, and ``towhee-isc dedup`` on many descriptors (time and peak memory).

    .venv/bin/python benchmarks/workflow.py [--images 1000] [--descriptors 100000]

Uses a synthetic checkpoint of the published architecture (EfficientNetV2-M, 512; speed does not
depend on the weights) and JPEG files made from scikit-image's photos. Each command runs as a real
subprocess; peak memory is its maximum resident set size.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from towhee_isc import Isc
from towhee_isc.progress import Progress
from towhee_isc.workflow.descriptors import write_descriptors
from towhee_isc.testing import make_synthetic_checkpoint, sample_photos

from child import run_child  # benchmarks/child.py


def make_images(folder: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(0)
    photos = sample_photos()
    paths = []
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = photo.size
        x, y = rng.integers(0, w // 4), rng.integers(0, h // 4)
        image = photo.crop((x, y, x + 3 * w // 4, y + 3 * h // 4)).resize((640, 480))
        paths.append(folder / f'R{i:06d}.jpg')
        image.save(paths[-1], quality=int(rng.integers(60, 95)))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--images', type=int, default=1000)
    parser.add_argument('--descriptors', type=int, default=100_000)
    parser.add_argument('--threshold', type=float, default=0.9)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix='isc-workflow-'))
    try:
        report = {}
        rng = np.random.default_rng(1)
        vectors = rng.standard_normal((args.descriptors, 256)).astype(np.float32)
        copies = rng.choice(args.descriptors, size=(args.descriptors // 100, 2), replace=False)
        vectors[copies[:, 1]] = vectors[copies[:, 0]] + 0.05 * rng.standard_normal((len(copies), 256)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        write_descriptors(work / 'many.h5', [f'I{i:07d}' for i in range(args.descriptors)], vectors)
        seconds, _, peak, out = run_child([sys.executable, '-m', 'towhee_isc', 'dedup', str(work / 'many.h5'),
                                        '--threshold', str(args.threshold), '-o', str(work / 'groups.csv')])
        report['dedup'] = {'descriptors': args.descriptors, 'planted_pairs': len(copies), 'seconds': seconds,
                           'peak_mib': peak, 'summary': out.strip().splitlines()[-2]}
        print(json.dumps(report['dedup']), flush=True)

        checkpoint = work / 'isc_synthetic.pth.tar'
        make_synthetic_checkpoint(checkpoint, 'tf_efficientnetv2_m_in21ft1k', 512, sample_photos()[:4])
        (work / 'images').mkdir()
        images = make_images(work / 'images', args.images)
        op = Isc(checkpoint_path=checkpoint, device='cpu')  # also fills the ONNX cache the command reuses
        start = time.perf_counter()
        with Progress(None, f'the operator alone on {len(images)} images (one call)', delay=0):
            op([str(p) for p in images])
        operator_rate = len(images) / (time.perf_counter() - start)
        seconds, _, peak, out = run_child([sys.executable, '-m', 'towhee_isc', 'embed', str(work / 'images'), '-o',
                                        str(work / 'embedded.h5'), '--checkpoint', str(checkpoint), '--device', 'cpu'])
        command_rate = float(out.split('(')[-1].split()[0])
        report['embed'] = {'images': len(images), 'operator_images_per_s': operator_rate,
                           'command_images_per_s': command_rate, 'command_wall_s': seconds,
                           'command_vs_operator': command_rate / operator_rate, 'peak_mib': peak}
        print(json.dumps(report['embed']), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # images, checkpoints: hundreds of MB


if __name__ == '__main__':
    main()
