"""Throughput of the ISC descriptor: the reference way vs each backend and batch size, side by side.

    .venv/bin/python benchmarks/throughput.py [--device cpu|cuda] [--images DIR] [--json FILE]

Makes a synthetic checkpoint of the published architecture (EfficientNetV2-M, 512) in the official
format, as the tests do, and embeds real photos (scikit-image's, or yours with --images). Each row is
timed alternately with the reference-style path (PIL preprocessing + eager PyTorch, one image at a
time, as the winner's code runs): A B A B ..., medians, so the speed-up compares like with like.
The max abs difference is to the reference-style embeddings. Prints one table; writes it as JSON.

On 2 CPU cores it takes about 15 minutes (11 rows; --large adds 3 rows of 12 MP files); a progress line
on stderr counts the rows done and estimates the time left.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from towhee_isc import Isc
from towhee_isc.model import build_model, read_checkpoint
from towhee_isc.progress import Progress
from towhee_isc.testing import make_synthetic_checkpoint, sample_photos

ARCH, SIZE = 'tf_efficientnetv2_m_in21ft1k', 512
ROWS = Progress(None, '', quiet=True)  # the run's progress line, made in main() once the rows are known


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def gemm_peak(device: torch.device) -> float:
    """Measured fp32 matrix-multiply GFLOP/s: the practical ceiling of convolution-heavy work."""
    a, b = torch.randn(4096, 4096, device=device), torch.randn(4096, 4096, device=device)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    (a @ b), sync()
    return 2 * 4096 ** 3 / min(timed(lambda: ((a @ b), sync())) for _ in range(10)) / 1e9


def flops_per_image(model: torch.nn.Module, device: torch.device) -> float:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.zeros(1, 3, SIZE, SIZE, device=device))
    return counter.get_total_flops()


def load_images(folder: str | None, count: int) -> list[Image.Image]:
    if folder is None:
        photos = sample_photos()
        return [photos[i % len(photos)] for i in range(count)]
    files = sorted(p for p in Path(folder).rglob('*') if p.suffix.lower() in {'.jpg', '.jpeg', '.png', '.webp', '.bmp'})
    if not files:
        sys.exit(f'no images in {folder}')
    return [Image.open(f).convert('RGB') for f in files[:count]]


class ReferencePath:
    """The winner's way: torchvision preprocessing, eager PyTorch, one image at a time, fp32."""

    def __init__(self, checkpoint: Path, device: torch.device):
        self.device = device
        self.model = build_model(read_checkpoint(checkpoint)).to(device)
        self.preprocess = self.model.preprocess(SIZE)

    def __call__(self, images) -> np.ndarray:
        out = []
        with torch.no_grad():
            for image in images:
                if isinstance(image, (str, Path)):
                    image = Image.open(image).convert('RGB')
                x = self.preprocess(image).unsqueeze(0).to(self.device)
                out.append(self.model(x).cpu().numpy()[0])
        return np.stack(out)


def side_by_side(name: str, run, reference: ReferencePath, inputs, want: np.ndarray, rounds: int,
                 flops: float, peak: float) -> dict:
    """Time ``run`` and the reference alternately; report medians, speed-up and parity."""
    got = np.stack(run(inputs))  # warm-up, and the embeddings to compare
    ref_times, times = [], []
    for _ in range(rounds):
        ref_times.append(timed(lambda: reference(inputs)))
        times.append(timed(lambda: run(inputs)))
    rate = len(inputs) / statistics.median(times)
    row = {'path': name, 'images_per_s': rate, 'gflop_per_s': rate * flops / 1e9,
           'fraction_of_gemm_peak': rate * flops / 1e9 / peak,
           'speedup_vs_reference': statistics.median(ref_times) / statistics.median(times),
           'reference_images_per_s': len(inputs) / statistics.median(ref_times),
           'max_abs_diff': float(np.abs(got - want).max()),
           'min_cosine': float((got * want).sum(1).min())}
    print_row(row)
    ROWS.advance()
    return row


def print_row(row: dict) -> None:
    print(f"{row['path']:<44} {row['images_per_s']:>8.2f} {row['gflop_per_s']:>8.1f} "
          f"{row['fraction_of_gemm_peak']:>6.0%} {row['speedup_vs_reference']:>8.2f}x "
          f"{row['max_abs_diff']:>9.1e} {row['min_cosine']:>9.6f}", flush=True)


def towhee_rows(checkpoint: Path, paths: list[str], window: int, args, reference, want, flops, peak) -> list[dict]:
    """A Towhee pipeline calls an operator once per row. Windows of rows hand it lists of paths
    instead: it batches them and decodes the next image while the current one runs."""
    from towhee import ops, pipe

    def decode(path):
        with Image.open(path) as image:
            return image.convert('RGB')

    isc = ops.image_embedding.isc(checkpoint_path=str(checkpoint), device=args.device)
    per_row = pipe.input('path').map('path', 'img', decode).map('img', 'vec', isc).output('vec')
    windowed = (pipe.input('paths')
                .flat_map('paths', 'path', lambda paths: paths)
                .window('path', 'batch', window, window, lambda batch: batch)
                .map('batch', 'vecs', isc)
                .flat_map(('batch', 'vecs'), ('path', 'vec'), lambda batch, vecs: list(zip(batch, vecs)))
                .output('path', 'vec'))

    def run_per_row(items):
        return [per_row(p).get()[0] for p in items]

    def run_windowed(items):
        return [row[1] for row in iter(windowed(items).get, None)]

    return [side_by_side('towhee pipeline, one row at a time', run_per_row, reference, paths, want,
                         args.rounds, flops, peak),
            side_by_side(f'towhee pipeline, windows of {window} paths', run_windowed, reference, paths, want,
                         args.rounds, flops, peak)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--images', help='a folder of your photos (default: scikit-image photos)')
    parser.add_argument('--count', type=int, default=8, help='images per timed run')
    parser.add_argument('--rounds', type=int, default=3, help='alternating A/B rounds per row')
    parser.add_argument('--window', type=int, default=8, help='rows per window in the batched Towhee pipeline')
    parser.add_argument('--large', action='store_true', help='also time 12-megapixel JPEG files end to end')
    parser.add_argument('--json', default='throughput.json', help='where to write the table')
    args = parser.parse_args()
    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix='isc-bench-'))
    try:
        checkpoint = work / 'isc_synthetic.pth.tar'
        images = load_images(args.images, args.count)
        make_synthetic_checkpoint(checkpoint, ARCH, SIZE, sample_photos()[:4])

        reference = ReferencePath(checkpoint, device)
        flops, peak = flops_per_image(reference.model, device), gemm_peak(device)
        want = reference(images)
        meta = {'device': str(device), 'cpu_threads': torch.get_num_threads(), 'torch': torch.__version__,
                'python': platform.python_version(), 'machine': platform.machine(), 'images': len(images),
                'gflop_per_image': flops / 1e9, 'gemm_peak_gflop_per_s': peak}
        if device.type == 'cuda':
            meta['gpu'] = torch.cuda.get_device_name(device)
        print(json.dumps(meta))
        global ROWS  # every timed row advances it; the estimate is the rows left at the rate so far
        operator_rows = 8 if device.type == 'cpu' else 6
        ROWS = Progress(1 + operator_rows + 2 + (3 if args.large else 0), 'benchmark rows', unit='row', delay=0)
        print(f"{'path':<44} {'img/s':>8} {'GFLOP/s':>8} {'peak':>6} {'speed-up':>9} {'max|diff|':>9} {'min cos':>9}")
        rows = [side_by_side('reference-style: PIL + eager torch, 1 by 1', reference, reference, images, want,
                             args.rounds, flops, peak)]

        def operator_row(name, **kwargs):
            op = Isc(checkpoint_path=checkpoint, device=args.device, **kwargs)
            rows.append(side_by_side(name, op, reference, images, want, args.rounds, flops, peak))

        if device.type == 'cpu':
            operator_row('operator default (auto)')
            for batch in (1, 2, 4, 8):
                operator_row(f'onnxruntime, batch {batch}', backend='onnxruntime', batch_size=batch)
            for batch in (1, 4):
                operator_row(f'torch, batch {batch}', backend='torch', batch_size=batch)
            operator_row('torch bf16, batch 1 (inexact, opt-in)', precision='bf16', batch_size=1)
        else:
            for precision in ('fp32', 'bf16', 'fp16'):
                for batch in (8, 32):
                    operator_row(f'torch {precision}, batch {batch}', precision=precision, batch_size=batch)

        paths = []
        for i, image in enumerate(images):
            paths.append(str(work / f'{i}.jpg'))
            image.save(paths[-1], quality=92)
        rows += towhee_rows(checkpoint, paths, args.window, args, reference, reference(paths), flops, peak)

        if args.large:
            large = []
            for i, image in enumerate(images):
                large.append(str(work / f'large{i}.jpg'))
                image.resize((4000, 3000), Image.BICUBIC).save(large[-1], quality=92)
            want_large = reference(large)
            rows.append(side_by_side('12 MP JPEG files: reference-style', reference, reference, large, want_large,
                                     args.rounds, flops, peak))
            for name, kwargs in (('12 MP JPEG files: operator default', {}),
                                 ('12 MP JPEG files: operator, fast_decode', {'fast_decode': True})):
                op = Isc(checkpoint_path=checkpoint, device=args.device, **kwargs)
                rows.append(side_by_side(name, op, reference, large, want_large, args.rounds, flops, peak))
        ROWS.close()
        Path(args.json).write_text(json.dumps({'meta': meta, 'rows': rows}, indent=1))
        print(f'wrote {args.json}')
    finally:
        shutil.rmtree(work, ignore_errors=True)  # images, checkpoints: hundreds of MB


if __name__ == '__main__':
    main()
