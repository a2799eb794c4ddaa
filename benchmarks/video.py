"""Video copy detection on a copy set made from real photos: `video embed` -> `video search` ->
`video evaluate`, beside VSC 2022's baseline recipe run on the same descriptors.

    .venv/bin/python benchmarks/video.py [--seeds 0 1 2] [--refs 8] [--queries 10] [--edits mild|hard]
                                         [--checkpoint FILE] [--device cpu|cuda]

Per seed: reference videos (20-30 s, 3-8 shots panning and zooming over ninths of one photo with a
scene, its own: no photo is in two references), query videos (20-30 s) of photos no reference uses,
half of them with an edited copy of 6-12 s of a reference at a known offset, and noise videos (a
third set of photos) for score normalisation. ``mild`` edits:
re-encode (x264 CRF 28-35), rescale 75-100 %, crop <= 10 % (of the width and of the height, at random
between the sides), brightness 0.8-1.2; ``hard`` adds a
caption overlay and a speed change (0.75-1.5x). Without ``--checkpoint`` a synthetic checkpoint
(``--arch`` resnet18 at ``--img-size`` 96 px, random weights) makes the descriptors.

``--videos-from DIR`` (with ``--keep`` a new folder) embeds the videos an earlier ``--keep`` run made with
another ``--checkpoint`` (a kept folder's own descriptors are reused as they are, whatever the checkpoint).

``--embed-rate`` instead times, per seed, one `video embed` run over all its videos (refs, queries and noise;
kept by an earlier run's ``--keep``, else made now) against the operator alone on the same decoded frames,
per second of wall and CPU time.

``--search-scale QUERIES REFERENCES`` instead times `video search` alone (the real command, in a child
process) on random 256-d descriptors of 60 s videos at 1 fps with planted copies (half the queries hold
20 s of a reference, each frame turned to a cosine of 0.9 from its original), as benchmarks/million.py
does for images, and counts the planted copies found with both ends within 1 s.

Rows: ours (`video search`: frame k-NN candidates, ``--align dp``/``tn``, ``--score-norm`` with the
noise videos), and VSC's baseline as its repository configures it (vsc/baseline/sscd_baseline.py with
score normalisation: drop the noise set's lowest-variance dimension, L2-normalise, bias -1.2 x
nearest-noise similarity; 1,200 x queries frame pairs retrieved over all pairs, 25 x queries video
pairs kept, 5 x queries aligned by VCSL's TN with max_step 5, min_length 4, similarity bias 0.5, a
segment scored by its box's best similarity), restated with this package's pieces.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from towhee_isc.backends import padded_batch
from towhee_isc.video.alignment import temporal_network
from towhee_isc.video.embed import embed_videos, frame_side
from towhee_isc.video.localization import VSC_TN
from towhee_isc.video.metrics import (Segment, descriptor_candidates, evaluate_matching, read_segments,
                                      write_segments)
from towhee_isc.video.reader import sample_frames
from towhee_isc.video.search import search_videos
from towhee_isc.video.storage import VideoFeatures, VideoSet, read_video_descriptors
from towhee_isc.video.synthetic import PHOTOS, Shot, edit, photos, render, write_video
from towhee_isc.workflow.embedding import Embedder

FPS, SIZE = 10, (160, 120)


# Photos whose ninths show different things: each reference pans over ninths of its own one. (Under the
# synthetic checkpoint the ninths of moon, cell, text, brick, clock or chelsea are at a mean cosine of
# 0.8-1.0 of each other, so two references made of them showed the same scene.)
SCENES = ('astronaut', 'coffee', 'immunohistochemistry', 'retina', 'logo', 'camera', 'coins', 'colorwheel', 'page',
          'horse')
OTHERS = tuple(p for p in PHOTOS if p not in SCENES)


def fail(message: str) -> None:
    """One line on stderr and exit status 2, as the package's commands end on bad settings."""
    print(f'error: {message}', file=sys.stderr)
    raise SystemExit(2)


def make_set(root: Path, seed: int, n_refs: int, n_queries: int, hard: bool) -> list[Segment]:
    """Write refs/, queries/, noise/ under ``root``; return the ground truth."""
    rng = np.random.default_rng(seed)
    images = photos(SCENES + OTHERS)
    scenes = rng.permutation(len(SCENES))
    # No photo is in two references, and the queries' unrelated shots and the noise come from photos no
    # reference uses: the ground truth is the only copy of each reference segment.
    rest = rng.permutation(np.r_[scenes[n_refs:], np.arange(len(SCENES), len(images))])
    pools = {'refs': scenes[:n_refs], 'queries': rest[:5], 'noise': rest[5:]}

    def shots(pool, seconds, ref=None):
        out, left = [], seconds
        cells = [(x / 3, y / 3, (x + 1) / 3, (y + 1) / 3) for x in range(3) for y in range(3)]
        cells = [cells[i] for i in rng.permutation(len(cells))]
        while left > 0:
            length = min(left, float(rng.uniform(4, 8)))
            if ref is not None:  # each shot pans over its own ninth of the reference's photo
                out.append(Shot.random(rng, int(pool[ref]), length, within=cells.pop()))
            else:
                out.append(Shot.random(rng, int(rng.choice(pool)), length))
            left -= length
        return out

    truth, refs = [], []
    for name in pools:
        (root / name).mkdir(parents=True)
    for i in range(n_refs):
        frames = render(shots(pools['refs'], float(rng.integers(20, 31)), ref=i), images, FPS, SIZE)
        refs.append(frames)
        write_video(root / 'refs' / f'R{i:06d}.mp4', frames, FPS, quality=18)
    for i in range(n_queries):
        frames = render(shots(pools['queries'], float(rng.integers(20, 31))), images, FPS, SIZE)
        if i % 2 == 0:
            r = int(rng.integers(n_refs))
            length = float(rng.integers(6, 13))
            start = float(rng.integers(0, int(len(refs[r]) / FPS - length) + 1))
            speed = float(rng.uniform(0.75, 1.5)) if hard else 1.0
            scale = float(rng.uniform(0.75, 1.0))
            # crop <= 10 % (#17): up to a tenth of the width and of the height cut away, split at random
            # between the two sides (by a generator of its own: the rest of the set is drawn as it was)
            cut, (x, y) = float(rng.uniform(0, 0.1)), np.random.default_rng([seed, i]).uniform(size=2)
            copy = edit(refs[r][int(start * FPS):int((start + length) * FPS)],
                        crop=(cut * x, cut * y, cut * (1 - x), cut * (1 - y)),
                        brightness=float(rng.uniform(0.8, 1.2)), overlay=hard, speed=speed, size=SIZE)
            offset = float(rng.integers(0, int(len(frames) / FPS) + 1))
            at = int(offset * FPS)
            frames = frames[:at] + copy + frames[at:]
            truth.append(Segment(f'Q{i:06d}', f'R{r:06d}', offset, offset + len(copy) / FPS, start, start + length))
            frames = edit(frames, size=(round(SIZE[0] * scale) // 2 * 2, round(SIZE[1] * scale) // 2 * 2))
        write_video(root / 'queries' / f'Q{i:06d}.mp4', frames, FPS, quality=int(rng.integers(28, 36)))
    for i in range(max(4, n_refs // 2)):
        write_video(root / 'noise' / f'N{i:06d}.mp4', render(shots(pools['noise'], 25.0), images, FPS, SIZE), FPS)
    return truth


def vsc_baseline(queries: VideoSet, refs: VideoSet, noise: VideoSet) -> list[Segment]:
    """VSC's SSCD baseline with score normalisation (see the module docstring), on our descriptors."""
    def frames(s: VideoSet):
        return np.concatenate([v.features for v in s.videos])

    low = int(frames(noise).var(axis=0).argmin())

    def normalised(x):
        x = np.delete(x, low, axis=1)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    n = normalised(frames(noise))
    q_sets = [normalised(v.features) for v in queries.videos]
    r_sets = [normalised(v.features) for v in refs.videos]
    bias = [-1.2 * (q @ n.T).max(axis=1) for q in q_sets]
    q_all, r_all = np.concatenate([np.c_[q, b] for q, b in zip(q_sets, bias)]), np.concatenate([np.c_[r, np.ones(len(r))] for r in r_sets])
    q_ids = np.concatenate([[v.video_id] * len(v) for v in queries.videos])
    r_ids = np.concatenate([[v.video_id] * len(v) for v in refs.videos])
    candidates = descriptor_candidates(q_ids, q_all.astype(np.float32), r_ids, r_all.astype(np.float32))
    index_q = {v.video_id: i for i, v in enumerate(queries.videos)}
    index_r = {v.video_id: i for i, v in enumerate(refs.videos)}
    found = []
    for (qid, rid), _ in list(candidates.items())[:5 * len(queries.videos)]:
        qi, ri = index_q[qid], index_r[rid]
        sims = (q_sets[qi] @ r_sets[ri].T + bias[qi][:, None]) + 0.5  # VSC's similarity_bias
        qv, rv = queries.videos[qi], refs.videos[ri]
        for b in temporal_network(sims, **VSC_TN):
            score = sims[b.query_first:b.query_last, b.ref_first:b.ref_last].max() - 0.5 \
                if b.query_last > b.query_first and b.ref_last > b.ref_first else -np.inf
            found.append(Segment(qid, rid, qv.timestamps[b.query_first, 0], qv.timestamps[b.query_last, 1],
                                 rv.timestamps[b.ref_first, 0], rv.timestamps[b.ref_last, 1], float(score)))
    return sorted(found, key=lambda s: -s.score)


def boundary_errors(truth: list[Segment], found: list[Segment]) -> list[float]:
    """For each copy, the largest start/end error (s) of the best-scored prediction on its pair."""
    best = {}
    for s in found:
        best.setdefault(s.pair, s)
    errors = []
    for t in truth:
        s = best.get(t.pair)
        errors.append(np.inf if s is None else max(abs(s.query_start - t.query_start), abs(s.query_end - t.query_end),
                                                   abs(s.ref_start - t.ref_start), abs(s.ref_end - t.ref_end)))
    return errors


def warm(op, frames: list) -> None:
    """Run each batch shape the operator will meet once (on CUDA, cuDNN plans each anew: ~2 s each)."""
    batch = op.batch_size or 1
    for rows in sorted({padded_batch(n, batch) for n in range(1, batch + 1)}):
        op((frames * rows)[:rows])


def operator_rate(op, video: Path) -> tuple[float, float]:
    """Images per second of wall time and per second of CPU time (all threads) of the operator alone on
    the decoded frames of one video (the same frames `video embed` embeds)."""
    frames = [f for f, _, _ in sample_frames(video)]
    warm(op, frames)
    start, cpu = time.perf_counter(), time.process_time()
    op(frames)
    return len(frames) / (time.perf_counter() - start), len(frames) / (time.process_time() - cpu)


def embed_rates(work: Path, seeds: list[int], embedder) -> None:
    """Per seed: one `video embed` run over all its videos (refs, queries and noise, as a user embeds a
    collection: its fixed costs, such as threads starting and files written, count as in real use), then
    the operator alone on the same decoded frames, each per second of wall and of CPU time."""
    for seed in seeds:
        folders = [work / f'seed{seed}' / name for name in ('refs', 'queries', 'noise')]
        videos = sorted(video for folder in folders for video in folder.iterdir())
        frames = [f for video in videos for f, _, _ in sample_frames(video, max_side=frame_side(embedder.op))]
        warm(embedder.op, frames)
        with tempfile.TemporaryDirectory() as out:
            start, cpu = time.perf_counter(), time.process_time()
            embed_videos([str(f) for f in folders], str(Path(out) / 'all.npz'), embedder, quiet=True)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        start, op_cpu = time.perf_counter(), time.process_time()
        embedder.op(frames)
        op_wall, op_cpu = time.perf_counter() - start, time.process_time() - op_cpu
        print(json.dumps({'seed': seed, 'videos': len(videos), 'frames': len(frames),
                          'embed_frames_per_s': round(len(frames) / wall, 1),
                          'operator_images_per_s': round(len(frames) / op_wall, 1),
                          'embed_frames_per_cpu_s': round(len(frames) / cpu, 2),
                          'operator_images_per_cpu_s': round(len(frames) / op_cpu, 2),
                          'ratio_per_cpu_s': round(op_cpu / cpu, 3), 'ratio_wall': round(op_wall / wall, 3)}),
              flush=True)


def search_scale(work: Path, n_queries: int, n_refs: int, seconds: int = 60, dim: int = 256) -> None:
    """Time `video search` on random descriptors with planted copies (see the module docstring)."""
    import subprocess
    from towhee_isc.video.metrics import read_segments
    from towhee_isc.video.storage import write_video_descriptors
    rng = np.random.default_rng(0)
    times = np.c_[np.arange(seconds), np.arange(1, seconds + 1)].astype(np.float64)

    def unit(x):
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

    refs = [unit(rng.normal(size=(seconds, dim))) for _ in range(n_refs)]
    queries, truth = [], {}
    for i in range(n_queries):
        frames = unit(rng.normal(size=(seconds, dim)))
        if i % 2 == 0:
            r, start, at = int(rng.integers(n_refs)), int(rng.integers(0, 40)), int(rng.integers(0, 40))
            original = refs[r][start:start + 20]
            noise = unit(rng.normal(size=original.shape))
            noise = unit(noise - (noise * original).sum(1, keepdims=True) * original)  # orthogonal to the original
            frames[at:at + 20] = unit(0.9 * original + np.sqrt(1 - 0.81) * noise)
            truth[f'Q{i:06d}', f'R{r:06d}'] = (at, at + 20, start, start + 20)
        queries.append(VideoFeatures(f'Q{i:06d}', frames, times))
    made = work / f'scale_{n_queries}x{n_refs}.json'  # the same files as an earlier run with --keep: kept
    if not made.exists():
        write_video_descriptors(work / 'scale_refs.npz', [VideoFeatures(f'R{i:06d}', f, times) for i, f in enumerate(refs)])
        write_video_descriptors(work / 'scale_queries.npz', queries)
        made.write_text('written')
    del queries, refs
    import os
    import resource
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    run = subprocess.run([sys.executable, '-m', 'towhee_isc', 'video', 'search', str(work / 'scale_queries.npz'),
                          '--references', str(work / 'scale_refs.npz'), '-o', str(work / 'scale_matches.csv')],
                         capture_output=True, text=True)
    seconds_taken = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if run.returncode:
        raise SystemExit(run.stderr)
    best = {}
    for s in read_segments(work / 'scale_matches.csv'):
        best.setdefault(s.pair, s)
    found = sum(1 for pair, (qs, qe, rs, re_) in truth.items() if pair in best and max(
        abs(best[pair].query_start - qs), abs(best[pair].query_end - qe), abs(best[pair].ref_start - rs),
        abs(best[pair].ref_end - re_)) <= 1)
    print(json.dumps({'queries': n_queries, 'references': n_refs, 'reference_frames': n_refs * seconds,
                      'search_s': round(seconds_taken, 1), 'search_cpu_s': round(cpu, 1),
                      'load_average_1_5_15_min': [round(x, 2) for x in os.getloadavg()],
                      'planted_copies_found_within_1s': f'{found}/{len(truth)}',
                      'engine': run.stdout.splitlines()[0]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--refs', type=int, default=8)
    parser.add_argument('--queries', type=int, default=10)
    parser.add_argument('--edits', choices=('mild', 'hard'), default='mild')
    parser.add_argument('--checkpoint', help='default: a synthetic checkpoint (--arch at --img-size px)')
    parser.add_argument('--arch', default='resnet18', help='the synthetic checkpoint\'s timm backbone')
    parser.add_argument('--img-size', type=int, default=96, help='the synthetic checkpoint\'s input size')
    parser.add_argument('--keep', help='keep the videos, descriptors and CSVs in this folder')
    parser.add_argument('--videos-from', metavar='DIR',
                        help="an earlier --keep folder: each seed's videos and ground truth are linked from it, not "
                             'made again, and embedded with this run\'s checkpoint (the embedding is kept in --keep)')
    parser.add_argument('--device', default='cpu', help="the operator's device: cpu (default), cuda, cuda:N")
    parser.add_argument('--search-scale', type=int, nargs=2, metavar=('QUERIES', 'REFERENCES'),
                        help='only time video search on random descriptors of this many 60 s videos')
    parser.add_argument('--embed-rate', action='store_true',
                        help="only time `video embed` against the operator on the refs of --seeds (made if not kept)")
    args = parser.parse_args()
    if args.refs > len(SCENES):  # before anything is written
        fail(f'--refs {args.refs}: at most {len(SCENES)} (one photo per reference)')
    work = Path(args.keep or tempfile.mkdtemp(prefix='video-bench-'))
    work.mkdir(parents=True, exist_ok=True)
    if args.search_scale:
        search_scale(work, *args.search_scale)
        return
    checkpoint = args.checkpoint
    if checkpoint is None:
        from towhee_isc.testing import make_synthetic_checkpoint, sample_photos
        checkpoint = str(work / f'synthetic_{args.arch}_{args.img_size}.pth.tar')
        if not Path(checkpoint).exists():
            make_synthetic_checkpoint(checkpoint, args.arch, args.img_size, sample_photos())
    embedder = Embedder(checkpoint_path=checkpoint, device=args.device)
    if args.embed_rate:
        for seed in args.seeds:  # made here (not embedded) when no earlier run kept them
            if not (work / f'seed{seed}' / 'refs').is_dir():
                write_segments(work / f'seed{seed}' / 'truth.csv',
                               make_set(work / f'seed{seed}', seed, args.refs, args.queries, args.edits == 'hard'))
        embed_rates(work, args.seeds, embedder)
        return
    rows = []
    for seed in args.seeds:
        root = work / f'seed{seed}'
        if args.videos_from and not (root / 'truth.csv').exists():
            root.mkdir(parents=True, exist_ok=True)
            for name in ('refs', 'queries', 'noise', 'truth.csv'):
                (root / name).symlink_to((Path(args.videos_from) / f'seed{seed}' / name).resolve())
        if (root / 'rates.json').exists():  # made and embedded by an earlier run with --keep
            truth = read_segments(root / 'truth.csv', ground_truth=True)
            rates, op_rate, cpu_rate, op_cpu_rate = json.loads((root / 'rates.json').read_text())
        else:
            if (root / 'truth.csv').exists():  # videos made earlier (--videos-from), not yet embedded
                truth = read_segments(root / 'truth.csv', ground_truth=True)
            else:
                truth = make_set(root, seed, args.refs, args.queries, args.edits == 'hard')
                write_segments(root / 'truth.csv', truth)
            rates = {}
            for name in ('refs', 'queries', 'noise'):
                cpu = time.process_time()  # the process's CPU time: decoding thread and torch's threads
                _, _, rates[name], frames = embed_videos([root / name], str(root / f'{name}.npz'), embedder, quiet=True)
                if name == 'refs':
                    cpu_rate = frames / (time.process_time() - cpu)
            op_rate, op_cpu_rate = operator_rate(embedder.op, next((root / 'refs').iterdir()))
            (root / 'rates.json').write_text(json.dumps([rates, op_rate, cpu_rate, op_cpu_rate]))
        q, r, n = (read_video_descriptors(root / f'{name}.npz') for name in ('queries', 'refs', 'noise'))
        if args.checkpoint and r.model != embedder.op.fingerprint:  # kept descriptors of another model
            fail(f'{root} holds descriptors of another checkpoint than {args.checkpoint}: embed its videos '
                 'again with --videos-from and a new --keep folder')
        methods = {}
        for align in ('dp', 'tn'):
            start = time.perf_counter()
            found, *_ = search_videos(q, r, align, noise=n)
            methods[f'ours --align {align} --score-norm'] = (found, time.perf_counter() - start)
        start = time.perf_counter()
        found, *_ = search_videos(q, r, 'dp')
        methods['ours --align dp (no score-norm)'] = (found, time.perf_counter() - start)
        start = time.perf_counter()
        methods["VSC's baseline (SN + global k-NN + VCSL TN)"] = (vsc_baseline(q, r, n), time.perf_counter() - start)
        for method, (found, seconds) in methods.items():
            write_segments(root / f'matches {method.split(" (")[0].replace(" ", "_")}.csv', found)
            numbers = evaluate_matching(truth, found)
            errors = boundary_errors(truth, found)
            rows.append({'seed': seed, 'edits': args.edits, 'method': method, 'segment_ap': round(numbers['segment_ap'], 4),
                         'pairwise_micro_ap': round(numbers['pairwise_micro_ap'], 4),
                         'copies_within_1s': f'{sum(e <= 1 for e in errors)}/{len(errors)}',
                         'search_s': round(seconds, 2), 'embed_frames_per_s': round(rates['refs'], 1),
                         'operator_images_per_s': round(op_rate, 1), 'embed_frames_per_cpu_s': round(cpu_rate, 2),
                         'operator_images_per_cpu_s': round(op_cpu_rate, 2)})
            print(json.dumps(rows[-1]), flush=True)
    print('\n| seed | method | segment AP | pairwise uAP | copies within 1 s | search s | embed frames/s | operator images/s '
          '| embed frames/CPU-s | operator images/CPU-s |')
    print('|---|---|---|---|---|---|---|---|---|---|')
    for row in rows:
        print(f"| {row['seed']} | {row['method']} | {row['segment_ap']:.4f} | {row['pairwise_micro_ap']:.4f} | "
              f"{row['copies_within_1s']} | {row['search_s']} | {row['embed_frames_per_s']} | {row['operator_images_per_s']} | "
              f"{row['embed_frames_per_cpu_s']} | {row['operator_images_per_cpu_s']} |")
    print(f'\n(files in {work})')


if __name__ == '__main__':
    main()
