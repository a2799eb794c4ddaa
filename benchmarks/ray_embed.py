"""``towhee-isc embed --ray-address`` vs the single-process ``towhee-isc embed`` on the same cores.

    .venv/bin/python benchmarks/ray_embed.py [--images 200] [--arch tf_efficientnetv2_m_in21ft1k --size 512]
                                             [--cpus 2] [--actors 2]

Starts a one-node Ray cluster of ``--cpus`` CPUs on loopback (``ray start --head --block``, stopped by
its PID afterwards) and reports its start-up apart. Each embed runs as a real command, with the
ONNX export already cached (as on any run after the first). Fixed costs (process start, model
load, actor start-up) are measured with a 2-image run of each route and taken out to give the
steady rate; the overhead figure is on the whole run. A synthetic checkpoint of ``--arch`` stands in
for the published weights (speed does not depend on the weight values); JPEGs at 640x480 are made
from scikit-image's photos. Both routes must give the same ids and vectors (checked).
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from towhee_isc.progress import Progress
from towhee_isc.testing import make_synthetic_checkpoint, sample_photos
from towhee_isc.workflow.descriptors import read_descriptors


def make_images(folder: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    photos = sample_photos()
    folder.mkdir(parents=True)
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = photo.size
        x, y = rng.integers(0, w // 4), rng.integers(0, h // 4)
        image = photo.crop((x, y, x + 3 * w // 4, y + 3 * h // 4)).resize((640, 480))
        image.save(folder / f'R{i:06d}.jpg', quality=int(rng.integers(60, 95)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def timed(command: list[str], env: dict[str, str], label: str) -> float:
    """Seconds ``command`` took; meanwhile a progress line says which step runs and for how long."""
    start = time.perf_counter()
    with Progress(None, label, delay=0):
        result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode:
        sys.exit(f'{command} failed:\n{result.stderr[-3000:]}')
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--images', type=int, default=200)
    parser.add_argument('--arch', default='tf_efficientnetv2_m_in21ft1k', help='the published architecture by default')
    parser.add_argument('--size', type=int, default=512)
    parser.add_argument('--cpus', type=int, default=2, help="the cluster's CPUs (this machine's cores by default: 2)")
    parser.add_argument('--actors', type=int, default=2)
    parser.add_argument('--json', help='also write the figures here')
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix='rayb', dir='/tmp'))  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, 'TORCH_HOME': str(work / 'torch'), 'RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER': '0',
           'RAY_AUTH_MODE': 'token', 'RAY_AUTH_TOKEN': secrets.token_hex(16), 'RAY_USAGE_STATS_ENABLED': '0'}
    head = None
    try:
        ckpt = work / 'bench.pth.tar'
        with Progress(None, f'making a synthetic {args.arch} checkpoint and {args.images} images', delay=0):
            make_synthetic_checkpoint(ckpt, args.arch, args.size, sample_photos()[:4])
            make_images(work / 'images', args.images)
            make_images(work / 'two', 2)
        embed = [sys.executable, '-m', 'towhee_isc', 'embed', '--checkpoint', str(ckpt), '--device', 'cpu', '--quiet']

        def single(folder: str, out: str, label: str) -> float:
            return timed([*embed, str(work / folder), '-o', str(work / out)], env, f'single process: {label}')

        single('two', 'warm.h5', 'ONNX export (warm-up)')  # exports the ONNX model into the cache both routes use
        single_fixed = single('two', 'single2.h5', '2 images (fixed costs)')
        single_total = single('images', 'single.h5', f'{args.images} images')

        port, temp = free_port(), work / 'ray'
        temp.mkdir()
        start = time.perf_counter()
        log = open(work / 'ray_start.log', 'w')
        head = subprocess.Popen(
            [sys.executable, '-m', 'ray.scripts.scripts', 'start', '--head', '--block', '--node-ip-address=127.0.0.1',
             f'--port={port}', f'--num-cpus={args.cpus}', '--num-gpus=0', '--include-dashboard=false',
             '--disable-usage-stats', f'--dashboard-port={free_port()}', f'--ray-client-server-port={free_port()}',
             f'--temp-dir={temp}'], stdout=log, stderr=subprocess.STDOUT, env=env)
        with Progress(None, 'starting the Ray cluster', delay=0):
            while 'will now block' not in (work / 'ray_start.log').read_text():
                if head.poll() is not None:
                    sys.exit((work / 'ray_start.log').read_text()[-3000:])
                time.sleep(0.2)
        cluster_start = time.perf_counter() - start

        def on_ray(folder: str, out: str, label: str) -> float:
            return timed([*embed, str(work / folder), '-o', str(work / out), '--ray-address', f'127.0.0.1:{port}',
                          '--actors', str(args.actors), '--cpus-per-actor', str(args.cpus // args.actors)], env,
                         f'--ray-address: {label}')

        ray_fixed = on_ray('two', 'ray2.h5', '2 images (fixed costs)')
        ray_total = on_ray('images', 'ray.h5', f'{args.images} images')

        ids, vectors = read_descriptors(work / 'single.h5')
        ray_ids, ray_vectors = read_descriptors(work / 'ray.h5')
        assert ids == ray_ids and np.abs(vectors - ray_vectors).max() < 1e-5, 'the routes disagree'
        steady_single = (args.images - 2) / (single_total - single_fixed)
        steady_ray = (args.images - 2) / (ray_total - ray_fixed)
        figures = {
            'arch': args.arch, 'size': args.size, 'images': args.images, 'cpus': args.cpus, 'actors': args.actors,
            'cluster_start_s': round(cluster_start, 1),
            'single_total_s': round(single_total, 1), 'ray_total_s': round(ray_total, 1),
            'ray_overhead_pct': round(100 * (ray_total / single_total - 1), 1),
            'single_fixed_s': round(single_fixed, 1), 'ray_fixed_s': round(ray_fixed, 1),
            'single_images_per_s': round(steady_single, 2), 'ray_images_per_s': round(steady_ray, 2),
            'ray_images_per_s_per_actor': round(steady_ray / args.actors, 2),
            'max_abs_difference': float(np.abs(vectors - ray_vectors).max()),
        }
        print(f"{args.images} images, {args.arch} at {args.size}, {args.cpus} CPUs, {args.actors} actors")
        print(f"  Ray cluster start-up (ray start --head)   {figures['cluster_start_s']:7.1f} s (apart)")
        print(f"  single process embed                     {single_total:7.1f} s  "
              f"(fixed {single_fixed:.1f} s, then {steady_single:.2f} images/s)")
        print(f"  embed --ray-address                      {ray_total:7.1f} s  "
              f"(fixed {ray_fixed:.1f} s, then {steady_ray:.2f} images/s, {steady_ray / args.actors:.2f} per actor)")
        print(f"  Ray overhead on the whole run            {figures['ray_overhead_pct']:+7.1f} %")
        print(f"  same ids; largest vector difference      {figures['max_abs_difference']:.1e}")
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=1))
    finally:
        if head is not None:
            head.terminate()
            try:
                head.wait(timeout=90)
            except subprocess.TimeoutExpired:
                head.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
