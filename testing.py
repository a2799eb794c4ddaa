"""Synthetic checkpoints in the official format, for tests and benchmarks (no weights download).

Plain random weights make a chaotic network: activations blow up layer after layer and the fp32
output is rounding noise (fp32 and fp64 differ by 0.2-0.8 on the L2-normalised vectors). So the
BatchNorm running statistics are calibrated on real photos first, as after training: the network
then behaves like a trained one numerically (fp32 agrees with fp64 to ~1e-5) and different photos
get clearly different vectors.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from .model import IscNet, save_checkpoint

# scikit-image's bundled colour photos (public domain or CC0; see skimage.data).
PHOTO_NAMES = ('astronaut', 'chelsea', 'coffee', 'rocket', 'hubble_deep_field', 'immunohistochemistry',
               'retina', 'camera')


def sample_photos(names: Sequence[str] = PHOTO_NAMES) -> list[Image.Image]:
    """Real photos as RGB ``PIL.Image`` (needs scikit-image, a test dependency)."""
    from skimage import data
    return [Image.fromarray(np.asarray(getattr(data, name)())).convert('RGB') for name in names]


def calibrate_batchnorm(model: nn.Module, batch: torch.Tensor) -> None:
    """Set every BatchNorm's running statistics to those of ``batch`` (cumulative average), then eval."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    with torch.no_grad():
        model(batch)
    for norm in norms:
        norm.momentum = 0.1
    model.eval()


def make_synthetic_checkpoint(path: str | os.PathLike, arch: str, input_size: int,
                              photos: Sequence[Image.Image], seed: int = 0) -> IscNet:
    """Random weights (timm's init, seeded) with BatchNorm calibrated on ``photos`` and their mirror
    images, saved in the official format at ``path``. Returns the model (eval mode, CPU)."""
    torch.manual_seed(seed)
    model = IscNet(arch)
    transform = model.preprocess(input_size)
    images = [transform(p) for p in photos]
    batch = torch.stack(images + [image.flip(-1) for image in images])
    calibrate_batchnorm(model, batch)
    save_checkpoint(model, path, input_size)
    return model



def make_copy_detection_set(root: str | os.PathLike, photos: Sequence[Image.Image]) -> Path:
    """A small copy-detection set in the challenge's layout under ``root``: ``references/`` (the first
    6 photos), ``queries/`` (copies of them: crop, resize, JPEG quality 30, faded colour, overlaid
    text, mirror; and 2 photos with no reference; some in a subfolder, one PNG) and
    ``ground_truth.csv``. Needs at least 8 photos. Returns ``root``."""
    from PIL import ImageDraw, ImageEnhance, ImageOps
    root = Path(root)
    refs, queries = root / 'references', root / 'queries'
    refs.mkdir(parents=True)
    (queries / 'sub').mkdir(parents=True)
    small = [p.copy() for p in photos[:8]]
    for p in small:
        p.thumbnail((320, 320))
    for i, image in enumerate(small[:6]):
        image.save(refs / f'R{i:06d}.jpg', quality=92)
    w, h = small[0].size
    texted = small[4].copy()
    ImageDraw.Draw(texted).text((10, 10), 'COPY', fill=(255, 0, 0))
    made = [small[0].crop((w // 8, h // 8, w, h)), small[1].resize((160, 120)), small[2],
            ImageEnhance.Color(small[3]).enhance(0.3), texted, ImageOps.mirror(small[5]), small[6], small[7]]
    for i, image in enumerate(made):
        folder = queries / 'sub' if i % 2 else queries
        if i == 7:
            image.save(folder / f'Q{i:05d}.png')
        else:
            image.save(folder / f'Q{i:05d}.jpg', quality=30 if i == 2 else 90)
    (root / 'ground_truth.csv').write_text('query_id,reference_id\n' + ''.join(
        f'Q{i:05d},R{i:06d}\n' for i in range(6)) + 'Q00006,\nQ00007,\n')
    return root
