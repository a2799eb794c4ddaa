"""Quality of the fine-tuning recipe, offline: train a small network from random initialisation for a few
CPU minutes, then compare it with the same network untrained and with a perceptual hash on a held-out copy
set, per kind of edit.

    nice -n 19 python benchmarks/train_quality.py --seeds 0 1 --epochs 2 --batch-size 16 --hard-p-scale 0.5 --cpu-minutes 10 --dead-leaves 0 --photo-leaves 1500

The data is what this machine has, nothing downloaded:
- real photos shipped with scikit-image (and matplotlib's Grace Hopper), split by photo into a training
  half and a held-out half; each photo is cut into tiles, each tile an image of its own;
- procedurally generated "dead leaves" images (overlapping discs of random colour and size with a
  power-law size distribution, the classic model of natural-image statistics), for training, as
  distractors and as overlay backgrounds (the distractors and backgrounds are always the same: no
  training option changes them);
- for training only, more photo-like images made from the training half's photos: random crops at
  several scales (--photo-crops) and dead leaves textured with patches of them (--photo-leaves);
- for training only, real photos from elsewhere on the machine (--extra-photos). On the machine the README's
  numbers come from, the other photos are a few: the Google Cloud SDK's Jetty demo picture
  (``.../jetty-home/modules/demo.d/root/images/jetty-pic.png``, sky and a pier) and the Rust embedded book's
  photo of a circuit board (``.../share/doc/rust/html/embedded-book/assets/f3.jpg``); skimage's
  motorcycle_right is the other stereo view of the held-out motorcycle_left and is refused.
References are the held-out tiles plus the distractors; queries are fixed-seed edits of every held-out
tile, one query per kind of edit (crop, overlay onto another picture, text, colour, blur, rotation,
JPEG, and all of them combined). Nothing of the held-out half is seen in training.

Scores: the project's own ``evaluate`` (μAP over each query's 10 best references, recall at precision
0.9) and recall@1, overall and per kind of edit. The perceptual hash is a 64-bit DCT hash (the
``imagehash.phash`` algorithm: 32 x 32 greyscale, 2-d DCT, the 8 x 8 lowest frequencies against their
median), scored by minus the Hamming distance. The untrained network is the trained one's starting
point (same seed), its BatchNorm statistics set on the training images so it is not handicapped.
The training budget is CPU time (user + system of this process, over 2 cores), printed with the result.
"""
from __future__ import annotations

import argparse
import io
import os
import random
import resource
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont

# scikit-image's bundled photos (not the synthetic ones), and one stereo view of the motorcycle only.
PHOTOS = ('astronaut', 'brick', 'camera', 'cell', 'chelsea', 'clock_motion', 'coffee', 'coins', 'grass',
          'gravel', 'hubble_deep_field', 'ihc', 'microaneurysms', 'moon', 'motorcycle_left', 'page', 'retina',
          'rocket', 'text', 'grace_hopper')
DEAD_LEAVES_STREAM = 1500
EDITS = ('crop', 'overlay', 'text', 'colour', 'blur', 'rotation', 'jpeg', 'combined')


def photo_files() -> list[Path]:
    import matplotlib
    import skimage
    data = Path(skimage.__file__).parent / 'data'
    files = {p.stem: p for p in data.iterdir() if p.suffix in ('.png', '.jpg')}
    files['grace_hopper'] = Path(matplotlib.get_data_path()) / 'sample_data' / 'grace_hopper.jpg'
    return [files[name] for name in PHOTOS if name in files]


def extra_photo(path: str, held: Sequence[Image.Image]) -> Image.Image:
    """A training photo from elsewhere on the machine; refused when its perceptual hash is within 12 bits
    of a held-out photo's (skimage's motorcycle_right, the other stereo view of the held-out
    motorcycle_left, is 4 bits away; unrelated photos 20 or more)."""
    image = Image.open(path).convert('RGB')
    distance = min(int((phash(image) != phash(h)).sum()) for h in held)
    if distance <= 12:
        raise SystemExit(f'error: {path} looks like a held-out photo (perceptual hash {distance} bits away): '
                         'it cannot train')
    return image


def tiles(image: Image.Image, grid: int) -> list[Image.Image]:
    """The image cut into grid x grid non-overlapping tiles."""
    w, h = image.width // grid, image.height // grid
    return [image.crop((x * w, y * h, (x + 1) * w, (y + 1) * h)) for y in range(grid) for x in range(grid)]


def dead_leaves(rng: np.random.Generator, size: int = 192, discs: int = 250) -> Image.Image:
    """Discs of random colour, radius ~ r^-3 (scale invariant), drawn front to back until covered."""
    image = Image.new('RGB', (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    r_min, r_max = 2.0, size / 3
    u = rng.random(discs)
    radii = (r_min ** -2 - u * (r_min ** -2 - r_max ** -2)) ** -0.5  # inverse CDF of p(r) ~ r^-3
    for r in radii[::-1]:  # the last drawn is in front
        x, y = rng.uniform(-r, size + r, 2)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.5))))
    return image


def photo_crops(rng: np.random.Generator, photos: Sequence[Image.Image], count: int, side: int = 192) -> list[Image.Image]:
    """``count`` random crops of ``photos`` at several scales (3-50 % of a photo's area, log-uniform),
    the longer side resized to ``side``: many photo-like training images from a few photos."""
    out = []
    for _ in range(count):
        photo = photos[int(rng.integers(len(photos)))]
        area, aspect = np.exp(rng.uniform(np.log(0.03), np.log(0.5))), np.exp(rng.uniform(np.log(0.75), np.log(4 / 3)))
        w = min(photo.width, int(photo.width * (area * aspect) ** 0.5))
        h = min(photo.height, int(photo.height * (area / aspect) ** 0.5))
        x, y = int(rng.integers(photo.width - w + 1)), int(rng.integers(photo.height - h + 1))
        crop = photo.crop((x, y, x + w, y + h))
        scale = side / max(w, h)
        out.append(crop.resize((max(8, round(w * scale)), max(8, round(h * scale))), Image.BILINEAR))
    return out


def photo_leaves(rng: np.random.Generator, photos: Sequence[Image.Image], size: int = 192, leaves: int = 40) -> Image.Image:
    """The dead-leaves model with photo texture: discs and rectangles (radius ~ r^-3), each filled with a
    patch of a random photo, over a crop of another. Every image is a new arrangement of photo-like
    content, so the network cannot tell them apart by colour alone."""
    def patch(side: int) -> Image.Image:
        photo = photos[int(rng.integers(len(photos)))]
        src = max(8, min(photo.width, photo.height, int(side * rng.uniform(0.5, 2.0))))
        x, y = int(rng.integers(photo.width - src + 1)), int(rng.integers(photo.height - src + 1))
        return photo.crop((x, y, x + src, y + src)).resize((side, side), Image.BILINEAR)

    image = patch(size)
    r_min, r_max = 8.0, size / 2.5
    u = rng.random(leaves)
    radii = (r_min ** -2 - u * (r_min ** -2 - r_max ** -2)) ** -0.5
    for r in radii[::-1]:
        side = max(4, int(2 * r))
        mask = Image.new('L', (side, side), 0)
        draw = ImageDraw.Draw(mask)
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((0, 0, side - 1, side - 1), fill=255)
        x, y = rng.uniform(-r, size - r, 2)
        image.paste(patch(side), (int(x), int(y)), mask)
    return image


# ----- the edits that make queries (fixed seed per query) -----

def _fonts() -> list[str]:
    try:
        from augly import utils
        return sorted(str(p) for p in Path(utils.FONTS_DIR).glob('*.ttf'))
    except Exception:
        return []


FONTS = _fonts()


def edit_crop(image: Image.Image, rng: random.Random, backgrounds) -> Image.Image:
    area = rng.uniform(0.35, 0.7)
    aspect = rng.uniform(0.75, 1.33)
    w = min(image.width, int(image.width * (area * aspect) ** 0.5))
    h = min(image.height, int(image.height * (area / aspect) ** 0.5))
    x, y = rng.randrange(image.width - w + 1), rng.randrange(image.height - h + 1)
    return image.crop((x, y, x + w, y + h))


def edit_overlay(image: Image.Image, rng: random.Random, backgrounds) -> Image.Image:
    background = rng.choice(backgrounds).resize((image.width, image.height)).copy()
    scale = rng.uniform(0.45, 0.75)
    small = image.resize((int(image.width * scale), int(image.height * scale)), Image.BILINEAR)
    background.paste(small, (rng.randrange(image.width - small.width + 1), rng.randrange(image.height - small.height + 1)))
    return background


def edit_text(image: Image.Image, rng: random.Random, backgrounds) -> Image.Image:
    image = image.copy()
    draw = ImageDraw.Draw(image)
    size = max(8, int(image.height * rng.uniform(0.1, 0.2)))
    font = ImageFont.truetype(rng.choice(FONTS), size) if FONTS else ImageFont.load_default(size=size)
    colour = tuple(rng.randrange(256) for _ in range(3))
    y = rng.uniform(0.0, 0.4) * image.height
    for _ in range(rng.randrange(2, 4)):
        words = ' '.join(''.join(rng.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(rng.randrange(3, 8)))
                         for _ in range(2))
        draw.text((rng.uniform(0.0, 0.3) * image.width, y), words, fill=colour, font=font)
        y += size * 1.2
    return image


def edit_colour(image: Image.Image, rng: random.Random, backgrounds) -> Image.Image:
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.6, 1.4))
    image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.6, 1.4))
    image = ImageEnhance.Color(image).enhance(rng.choice([0.0, rng.uniform(0.3, 2.0)]))
    hsv = np.array(image.convert('HSV'))
    hsv[..., 0] = (hsv[..., 0].astype(int) + rng.randrange(-40, 41)) % 256
    return Image.fromarray(hsv, 'HSV').convert('RGB')


def edit_blur(image: Image.Image, rng: random.Random, backgrounds) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0.01, 0.025) * max(image.size)))


def edit_rotation(image: Image.Image, rng: random.Random, backgrounds) -> Image.Image:
    angle = rng.choice([-1, 1]) * rng.uniform(10, 40) if rng.random() < 0.7 else rng.choice([90, 180, 270])
    return image.rotate(angle, resample=Image.BILINEAR, expand=True)


def edit_jpeg(image: Image.Image, rng: random.Random, backgrounds) -> Image.Image:
    scale = rng.uniform(0.3, 0.6)
    small = image.resize((max(8, int(image.width * scale)), max(8, int(image.height * scale))), Image.BILINEAR)
    buffer = io.BytesIO()
    small.save(buffer, format='JPEG', quality=rng.randrange(5, 15))
    return Image.open(io.BytesIO(buffer.getvalue())).convert('RGB')


SINGLE: dict[str, Callable] = {'crop': edit_crop, 'overlay': edit_overlay, 'text': edit_text, 'colour': edit_colour,
                               'blur': edit_blur, 'rotation': edit_rotation, 'jpeg': edit_jpeg}


def edit_combined(image: Image.Image, rng: random.Random, backgrounds) -> Image.Image:
    """Three of the others, milder crops first, in a random order."""
    for name in rng.sample(sorted(SINGLE), 3):
        image = SINGLE[name](image, rng, backgrounds)
    return image


SINGLE_AND_COMBINED = {**SINGLE, 'combined': edit_combined}


# ----- the data set -----

class CopySet:
    """Training images, references (held-out tiles + distractors) and queries (edits of the held-out tiles)."""

    def __init__(self, distractors: int = 300, dead_leaves_train: int = 1500, seed: int = 1234,
                 photo_crops_train: int = 0, photo_leaves_train: int = 0, extra_photos: Sequence[str] = ()):
        photos = [Image.open(p).convert('RGB') for p in photo_files()]
        order = random.Random(seed).sample(range(len(photos)), len(photos))
        held = sorted(order[:len(photos) // 2])
        rng = np.random.default_rng(seed)
        train_photos = [photos[i] for i in sorted(order[len(photos) // 2:])]
        train_photos += [extra_photo(path, [photos[i] for i in held]) for path in extra_photos]
        self.train: list[Image.Image] = [t for photo in train_photos for t in tiles(photo, 3)]
        # The first DEAD_LEAVES_STREAM images of the stream, whatever --dead-leaves says, so that the
        # distractors and overlay backgrounds drawn after them (the evaluation set) never change.
        leaves = [dead_leaves(rng) for _ in range(DEAD_LEAVES_STREAM)]
        extra = np.random.default_rng([seed, 1])  # training images beyond the evaluation's stream
        self.train += leaves[:dead_leaves_train] + [dead_leaves(extra) for _ in range(dead_leaves_train - DEAD_LEAVES_STREAM)]
        self.train += photo_crops(extra, train_photos, photo_crops_train)
        self.train += [photo_leaves(extra, train_photos) for _ in range(photo_leaves_train)]
        originals = [t for i in held for t in tiles(photos[i], 2)]
        self.references = {f'R{i:04d}': image for i, image in enumerate(originals)}
        for i in range(distractors):
            self.references[f'D{i:04d}'] = dead_leaves(rng, size=256)
        backgrounds = [dead_leaves(rng, size=256) for _ in range(50)]  # not among the references
        self.queries: dict[str, Image.Image] = {}
        self.truth: dict[str, set[str]] = {}
        self.kind: dict[str, str] = {}
        for i, image in enumerate(originals):
            for kind, edit in SINGLE_AND_COMBINED.items():
                qid = f'Q{i:04d}_{kind}'
                self.queries[qid] = edit(image, random.Random(f'{seed}/{i}/{kind}'), backgrounds)
                self.truth[qid] = {f'R{i:04d}'}
                self.kind[qid] = kind
        self.photos_held = [photo_files()[i].stem for i in held]


# ----- descriptors -----

def phash(image: Image.Image) -> np.ndarray:
    """64 bits as bool (64,): imagehash.phash's algorithm (hash_size 8, highfreq_factor 4)."""
    from scipy.fft import dct
    pixels = np.asarray(image.convert('L').resize((32, 32), Image.LANCZOS), dtype=np.float64)
    low = dct(dct(pixels, axis=0), axis=1)[:8, :8]
    return (low > np.median(low)).ravel()


def network_descriptors(net, size: int, images: Sequence[Image.Image]):
    import torch
    transform = net.preprocess(size)
    net.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), 64):
            out.append(net(torch.stack([transform(im) for im in images[start:start + 64]])))
    return torch.cat(out).numpy()


def scores(copy_set: CopySet, similarity: np.ndarray, k: int = 10) -> dict[str, dict]:
    """(Q, R) similarities -> evaluate() overall and per kind of edit, on each query's k best references."""
    from towhee_isc.workflow.metrics import Match, evaluate
    qids, rids = list(copy_set.queries), list(copy_set.references)
    matches: dict[str, list[Match]] = {}
    for q, row in zip(qids, similarity):
        best = np.argsort(-row, kind='stable')[:k]
        matches[q] = [Match(q, rids[j], float(row[j])) for j in best]
    result = {}
    for kind in ('all',) + EDITS:
        chosen = [q for q in qids if kind in ('all', copy_set.kind[q])]
        result[kind] = evaluate([m for q in chosen for m in matches[q]], {q: copy_set.truth[q] for q in chosen})
    return result


def cpu_seconds() -> float:
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def run_seed(copy_set: CopySet, args, seed: int) -> dict[str, dict[str, dict]]:
    import tempfile
    import torch
    from towhee_isc.testing import calibrate_batchnorm
    from towhee_isc.training.config import TrainConfig
    from towhee_isc.model import build_model, read_checkpoint
    from towhee_isc.training.run import TrainingInterrupted, fresh_net, train

    torch.manual_seed(seed)
    net = fresh_net(args.arch)
    net.pool.p = args.eval_gem_p
    probe = torch.stack([net.preprocess(args.eval_size)(im) for im in random.Random(seed).sample(copy_set.train, min(256, len(copy_set.train)))])
    untrained = net
    calibrate_batchnorm(untrained, probe)
    results = {}
    references = list(copy_set.references.values())
    queries = list(copy_set.queries.values())

    def network_scores(model) -> dict[str, dict]:
        r = network_descriptors(model, args.eval_size, references)
        q = network_descriptors(model, args.eval_size, queries)
        return scores(copy_set, q @ r.T)

    results['untrained'] = network_scores(untrained)
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(output_dir=tmp, epochs=args.epochs, batch_size=args.batch_size, init_lr=args.lr,
                             weight_decay=args.weight_decay, ncrops=args.ncrops,
                             hard_p_scale=args.hard_p_scale, hard_p=dict(args.hard_p or ()),
                             colour_jitter=args.colour_jitter, warmup=args.warmup, memory_size=args.memory_size,
                             gem_p=args.train_gem_p, input_size=args.input_size, seed=seed, workers=args.workers,
                             device='cpu', quiet=True)
        losses: list[float] = []
        cpu0, wall0 = cpu_seconds(), time.perf_counter()

        def on_step(step) -> None:  # the budget is CPU time: stop there even if the epochs are not done
            losses.append(step.loss)
            if cpu_seconds() - cpu0 > args.cpu_minutes * 60 * 2:
                raise KeyboardInterrupt

        try:
            last = train(copy_set.train, net, args.eval_size, config, on_step=on_step).last
            stopped = False
        except TrainingInterrupted as e:
            last, stopped = e.checkpoint, True
        cpu, wall = cpu_seconds() - cpu0, time.perf_counter() - wall0
        trained = build_model(read_checkpoint(str(last)))
        if args.save:
            Path(args.save).mkdir(parents=True, exist_ok=True)
            Path(last).replace(Path(args.save) / f'trained_s{seed}.pth.tar')
    trained.pool.p = args.eval_gem_p
    results['trained'] = network_scores(trained)
    results['_time'] = {'stopped_by_budget': stopped, 'cpu_minutes_per_core': cpu / 60 / 2, 'wall_minutes': wall / 60, 'steps': len(losses),
                        'first_loss': float(np.mean(losses[:10])), 'last_loss': float(np.mean(losses[-10:]))}
    return results


def print_table(rows: dict[str, dict[str, dict]]) -> None:
    print(f'| {"descriptor":28s} | ' + ' | '.join(f'{k:>9s}' for k in ('all',) + EDITS) + ' |')
    print('|' + '---|' * (len(EDITS) + 2))
    for name, result in rows.items():
        for metric, label in (('recall_at_rank1', 'recall@1'), ('average_precision', 'μAP'),
                              ('recall_at_p90', 'recall@P90')):
            cells = ' | '.join(f'{result[k][metric]:9.3f}' for k in ('all',) + EDITS)
            print(f'| {name + " " + label:28s} | {cells} |')


def cached_copy_set(args) -> CopySet:
    """The copy set of ``args``' data options, from ``args.copy_set`` when that file holds one built with
    the same options (a pickle this script wrote: read only files you made), else built (and written there)."""
    import pickle
    options = {k: getattr(args, k) for k in ('distractors', 'dead_leaves', 'photo_crops', 'photo_leaves', 'extra_photos')}
    path = Path(args.copy_set) if args.copy_set else None
    if path is not None and path.is_file():
        with open(path, 'rb') as f:
            saved_options, copy_set = pickle.load(f)
        if saved_options == options:
            return copy_set
        print(f'{path} holds a copy set built with {saved_options}, not {options}: building it again', flush=True)
    copy_set = CopySet(args.distractors, args.dead_leaves, photo_crops_train=args.photo_crops,
                       photo_leaves_train=args.photo_leaves, extra_photos=args.extra_photos)
    if path is not None:
        tmp = path.with_name(f'{path.name}.{os.getpid()}.tmp')  # two runs building at once each write their own
        with open(tmp, 'wb') as f:
            pickle.dump((options, copy_set), f)
        tmp.replace(path)
    return copy_set


def edit_probability(text: str) -> tuple[str, float]:
    name, _, value = text.partition('=')
    return name, float(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    parser.add_argument('--arch', default='resnet10t')
    parser.add_argument('--input-size', type=int, default=96, help='training crop side')
    parser.add_argument('--eval-size', type=int, default=112, help='side the copy set is embedded at')
    parser.add_argument('--epochs', type=int, default=4)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--lr', type=float, default=0.1)
    parser.add_argument('--weight-decay', type=float, default=1e-6)
    parser.add_argument('--ncrops', type=int, default=2)
    parser.add_argument('--hard-p-scale', type=float, default=1.0, help="times each hard-view edit's probability")
    parser.add_argument('--hard-p', type=edit_probability, action='append', metavar='EDIT=P',
                        help="one hard-view edit's probability set outright (repeatable; training.augment.HARD_EDITS)")
    parser.add_argument('--colour-jitter', type=float, default=0.8, help="hard views' colour jitter strength")
    parser.add_argument('--warmup', type=float, default=0.0, help='fraction of the steps the lr rises over first')
    parser.add_argument('--memory-size', type=int, default=1024)
    parser.add_argument('--train-gem-p', type=float, default=1.0)
    parser.add_argument('--eval-gem-p', type=float, default=1.0)
    parser.add_argument('--workers', type=int, default=0)
    parser.add_argument('--dead-leaves', type=int, default=1500, help='generated training images')
    parser.add_argument('--photo-crops', type=int, default=0, help='random crops of the training photos')
    parser.add_argument('--photo-leaves', type=int, default=0, help='dead-leaves images textured with training photos')
    parser.add_argument('--extra-photos', nargs='+', default=[], metavar='FILE',
                        help='more real photos for the training half (tiled, and texture for --photo-leaves/crops); '
                             'one that looks like a held-out photo is refused')
    parser.add_argument('--distractors', type=int, default=300)
    parser.add_argument('--cpu-minutes', type=float, default=10.0,
                        help='training budget in minutes of 2 cores (CPU time / 2); training stops there')
    parser.add_argument('--threads', type=int, default=1, help='torch threads (1: no OpenMP spinning on a busy machine)')
    parser.add_argument('--save', help='a folder to keep the trained checkpoints in')
    parser.add_argument('--copy-set', metavar='PICKLE',
                        help='read the copy set from this file when it was built with the same data options, '
                             'else build it and write it there (skips the 2-minute build on later runs)')
    args = parser.parse_args()
    args.hard_p = dict(args.hard_p or ())

    import torch
    torch.set_num_threads(args.threads)
    warnings.simplefilter('ignore')
    started = time.perf_counter()
    copy_set = cached_copy_set(args)
    print(f'training images: {len(copy_set.train)}; references: {len(copy_set.references)} '
          f'({len(copy_set.references) - args.distractors} held-out tiles of {", ".join(copy_set.photos_held)}; '
          f'{args.distractors} distractors); queries: {len(copy_set.queries)} ({len(EDITS)} edits each); '
          f'built in {time.perf_counter() - started:.0f} s', flush=True)
    hashes_r = np.stack([phash(im) for im in copy_set.references.values()])
    hashes_q = np.stack([phash(im) for im in copy_set.queries.values()])
    hamming = (hashes_q[:, None, :] != hashes_r[None, :, :]).sum(-1)
    rows = {'phash': scores(copy_set, -hamming.astype(np.float64))}
    for seed in args.seeds:
        result = run_seed(copy_set, args, seed)
        t = result.pop('_time')
        print(f'seed {seed}: {t["steps"]} steps, {t["cpu_minutes_per_core"]:.1f} CPU minutes per core '
              f'({t["wall_minutes"]:.1f} wall), loss {t["first_loss"]:.3f} -> {t["last_loss"]:.3f}'
              + (' (stopped before the last epoch: the CPU budget or Ctrl-C)' if t['stopped_by_budget'] else ''), flush=True)
        rows[f'untrained s{seed}'] = result['untrained']
        rows[f'trained s{seed}'] = result['trained']
        for metric in ('recall_at_rank1', 'average_precision'):
            print(f'  {metric}: untrained {result["untrained"]["all"][metric]:.3f} -> trained '
                  f'{result["trained"]["all"][metric]:.3f} '
                  f'({result["trained"]["all"][metric] - result["untrained"]["all"][metric]:+.3f})', flush=True)
    print(' '.join(f'--{k.replace("_", "-")} {v}' for k, v in vars(args).items() if k != 'seeds'))
    print_table(rows)


if __name__ == '__main__':
    main()
