"""``towhee-isc serve`` under load: throughput with 8 concurrent clients vs the operator's own on the same cores.

    .venv/bin/python benchmarks/serve.py [--requests 64] [--clients 8] [--max-batch-size 8]
                                         [--arch tf_efficientnetv2_m_in21ft1k --size 512] [--json FILE]

Makes a synthetic checkpoint of the published architecture (or ``--arch/--size``) as the tests do.
First the operator alone embeds the uploads (JPEG bytes of real photos) as one list in this process
(its fastest way: the next image is decoded while the network runs): images/s. Then ``towhee-isc serve --references`` starts as its own process on 127.0.0.1, and
``--clients`` threads send ``POST /search`` with the same uploads, each waiting for its answer before
sending the next: images/s over the whole run, p50/p99 latency, and the batch sizes the replica formed
(from ``/health``). Both use every core of the machine (ONNX Runtime's threads); Ray's start-up is
reported apart.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from towhee_isc import Isc
from towhee_isc.progress import Progress
from towhee_isc.testing import make_synthetic_checkpoint, sample_photos
from towhee_isc.workflow.descriptors import write_descriptors


def uploads(count: int) -> list[bytes]:
    """JPEG files of scikit-image's photos at their own size, repeated to ``count``."""
    photos = []
    for photo in sample_photos():
        buffer = io.BytesIO()
        photo.save(buffer, 'JPEG', quality=90)
        photos.append(buffer.getvalue())
    return [photos[i % len(photos)] for i in range(count)]


def operator_rate(op: Isc, images: list[bytes]) -> float:
    with Progress(None, 'the operator: warm-up (ONNX export or cache)', delay=0):
        op(images[:2])  # warm up (ONNX export or cache, first-run allocations)
    start = time.perf_counter()
    with Progress(None, f'the operator alone on {len(images)} uploads (one call)', delay=0):
        op(images)  # its best: one list, the next image decoded while the network runs
    return len(images) / (time.perf_counter() - start)


def post(url: str, body: bytes) -> float:
    """Seconds for one ``POST`` answered 200."""
    start = time.perf_counter()
    request = urllib.request.Request(url, data=body, headers={'Content-Type': 'image/jpeg'}, method='POST')
    with urllib.request.urlopen(request, timeout=600) as answer:
        answer.read()
        assert answer.status == 200
    return time.perf_counter() - start


def batch_sizes(url: str) -> dict[str, int]:
    with urllib.request.urlopen(url + '/health', timeout=60) as answer:
        return json.load(answer)['batch_sizes']


def service_run(root: Path, ckpt: Path, images: list[bytes], clients: int, max_batch: int) -> dict:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    url = f'http://127.0.0.1:{port}'
    log = open(root / 'serve.log', 'w')
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, '-m', 'towhee_isc', 'serve', '--references', str(root / 'refs.h5'),
                                '--checkpoint', str(ckpt), '--port', str(port), '--max-batch-size', str(max_batch)],
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        with Progress(None, 'starting the service (Ray, Serve, the replica)', delay=0):
            while True:
                if process.poll() is not None:
                    sys.exit('the service stopped:\n' + (root / 'serve.log').read_text()[-3000:])
                try:
                    batch_sizes(url)
                    break
                except (OSError, ValueError):
                    time.sleep(1)
        start_up = time.perf_counter() - started
        with Progress(None, f'warm-up: {clients} uploads', delay=0), \
                concurrent.futures.ThreadPoolExecutor(clients) as pool:  # as for the operator
            list(pool.map(lambda body: post(url + '/search?k=5', body), images[:clients]))
        before = batch_sizes(url)
        start = time.perf_counter()
        with Progress(len(images), f'POST /search, {clients} clients', unit='upload', delay=0) as progress, \
                concurrent.futures.ThreadPoolExecutor(clients) as pool:
            answered = threading.Lock()  # the clients' threads count their answers one at a time

            def timed_post(body: bytes) -> float:
                seconds = post(url + '/search?k=5', body)
                with answered:
                    progress.advance()
                return seconds

            latencies = list(pool.map(timed_post, images))
        elapsed = time.perf_counter() - start
        after = batch_sizes(url)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
        log.close()
    formed = {size: n - before.get(size, 0) for size, n in after.items() if n - before.get(size, 0)}
    return {'images_per_s': len(images) / elapsed, 'p50_ms': 1000 * statistics.median(latencies),
            'p99_ms': 1000 * float(np.percentile(latencies, 99)), 'batch_sizes': formed, 'start_up_s': start_up}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--requests', type=int, default=64)
    parser.add_argument('--clients', type=int, default=8)
    parser.add_argument('--max-batch-size', type=int, default=8)
    parser.add_argument('--arch', default='tf_efficientnetv2_m_in21ft1k')
    parser.add_argument('--size', type=int, default=512)
    parser.add_argument('--json')
    args = parser.parse_args()
    images = uploads(args.requests)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt = root / 'isc.pth.tar'
        make_synthetic_checkpoint(ckpt, args.arch, args.size, sample_photos()[:4])
        op = Isc(checkpoint_path=ckpt, device='cpu')
        write_descriptors(root / 'refs.h5', [f'R{i}' for i in range(8)], np.stack(op(images[:8])))
        alone = operator_rate(op, images)
        del op  # the service's replica holds its own
        served = service_run(root, ckpt, images, args.clients, args.max_batch_size)
    result = {'arch': args.arch, 'size': args.size, 'requests': args.requests, 'clients': args.clients,
              'operator_images_per_s': alone, **{f'service_{k}': v for k, v in served.items()},
              'ratio': served['images_per_s'] / alone}
    print(f"{args.arch} at {args.size}, {args.requests} uploads, {args.clients} clients:\n"
          f"  operator alone   {alone:7.2f} images/s\n"
          f"  service /search  {served['images_per_s']:7.2f} images/s ({100 * result['ratio']:.0f} % of the operator's)\n"
          f"  latency          p50 {served['p50_ms']:.0f} ms, p99 {served['p99_ms']:.0f} ms\n"
          f"  batches formed   {served['batch_sizes']} (size: count)\n"
          f"  service start-up {served['start_up_s']:.0f} s (Ray, Serve, the replica's model)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == '__main__':
    main()
