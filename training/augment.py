"""The winner's augmentations (``exp/v98.py``), each a small class: PIL image of any mode in, RGB PIL
image out (``Normalized`` and ``RandomErase`` work on the tensor at the end).

``recipe()`` puts them together: every training image gives ``ncrops`` views, one moderate
(RandomResizedCrop scale 0.7-1, flip) and ``ncrops - 1`` hard ones (rotation, a strong crop or an
overlay onto / under another training image, then colour jitter, pixelisation, pixel shuffling,
JPEG, greyscale, blur, perspective, flips, text, emoji and edge enhancing in a random order, and
random erasing). Randomness comes from Python's ``random`` and torch's generator, which the dataset
seeds per image, so a view depends only on (seed, epoch, image).

augly 1.0.0 (the ``train`` extra) provides fonts and emoji images, drawn here with Pillow (its
``meme_format`` no longer works with today's Pillow and is not used). Without augly, text is drawn in
Pillow's own font and emoji as drawn faces.
"""
from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from torchvision import transforms

from ..images import pil_to_rgb, to_pil_rgb

Augmentation = Callable[[Image.Image], Image.Image]


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == 'RGB' else pil_to_rgb(image, 'training image')


class Random:
    """Apply ``self.apply`` with probability ``p`` (to the image converted to RGB)."""
    p: float = 1.0

    def __call__(self, image: Image.Image) -> Image.Image:
        image = _rgb(image)
        return self.apply(image) if random.random() < self.p else image

    def apply(self, image: Image.Image) -> Image.Image:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f'{type(self).__name__}({", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "pool")})'


class Torchvision(Random):
    """A torchvision PIL transform (crop, jitter, flip, perspective, greyscale) on RGB images."""

    def __init__(self, transform: Callable[[Image.Image], Image.Image], p: float = 1.0):
        self.transform, self.p = transform, p

    def apply(self, image: Image.Image) -> Image.Image:
        return _rgb(self.transform(image))


class Pixelize(Random):
    """Down-scale by a random ratio, then back up with nearest neighbours (blocky pixels)."""

    def __init__(self, ratios: tuple[float, float] = (0.1, 1.0), p: float = 0.25):
        self.ratios, self.p = ratios, p

    def apply(self, image: Image.Image) -> Image.Image:
        ratio = random.uniform(*self.ratios)
        small = image.resize((max(1, round(image.width * ratio)), max(1, round(image.height * ratio))), Image.BILINEAR)
        return small.resize(image.size, Image.NEAREST)


class ShufflePixels(Random):
    """Swap a fraction ``factor`` of the pixels among themselves (fixed permutation per call)."""

    def __init__(self, factor: float = 0.1, p: float = 0.25):
        self.factor, self.p = factor, p

    def apply(self, image: Image.Image) -> Image.Image:
        pixels = torch.from_numpy(_array(image)).reshape(-1, 3)
        count = int(len(pixels) * self.factor)
        chosen = torch.randperm(len(pixels))[:count]
        pixels[chosen] = pixels[chosen[torch.randperm(count)]]
        return Image.fromarray(pixels.reshape(image.height, image.width, 3).numpy())


def _array(image: Image.Image):
    import numpy as np
    return np.array(image, dtype=np.uint8)


class JpegQuality(Random):
    """Re-encode as JPEG at one of ``qualities``."""

    def __init__(self, qualities: Sequence[int] = (10, 20, 30, 50), p: float = 0.35):
        self.qualities, self.p = tuple(qualities), p

    def apply(self, image: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        image.save(buffer, format='JPEG', quality=random.choice(self.qualities))
        return Image.open(io.BytesIO(buffer.getvalue())).convert('RGB')


class Blur(Random):
    """Gaussian blur with a radius drawn from ``radius``."""

    def __init__(self, radius: tuple[float, float] = (0.5, 3.0), p: float = 0.25):
        self.radius, self.p = radius, p

    def apply(self, image: Image.Image) -> Image.Image:
        return image.filter(ImageFilter.GaussianBlur(random.uniform(*self.radius)))


class Rotate(Random):
    """Rotate by an angle from ``degrees``, the canvas grown to hold the whole image (black corners)."""

    def __init__(self, degrees: tuple[float, float] = (-180.0, 180.0), p: float = 0.35):
        self.degrees, self.p = degrees, p

    def apply(self, image: Image.Image) -> Image.Image:
        return image.rotate(random.uniform(*self.degrees), resample=Image.BILINEAR, expand=True)


class EdgeEnhance(Random):
    """Pillow's EDGE_ENHANCE or EDGE_ENHANCE_MORE filter."""

    def __init__(self, p: float = 0.3):
        self.p = p

    def apply(self, image: Image.Image) -> Image.Image:
        return image.filter(random.choice([ImageFilter.EDGE_ENHANCE, ImageFilter.EDGE_ENHANCE_MORE]))


def _augly_assets(name: str, pattern: str) -> list[Path]:
    """Files of augly's asset folder ``name`` (``SMILEY_EMOJI_DIR``, ``FONTS_DIR``); none without augly."""
    try:
        from augly import utils
    except Exception:  # not installed, or an optional library of it (libmagic) is missing
        return []
    folder = Path(getattr(utils, name, ''))
    return sorted(folder.glob(pattern)) if folder.is_dir() else []


class OverlayText(Random):
    """1-2 lines of 5-9 random characters, font size 10-30 % of the image height, random colour and
    place; in one of augly's fonts when installed, else Pillow's own."""

    def __init__(self, size: tuple[float, float] = (0.1, 0.3), p: float = 0.35):
        self.size, self.p = size, p
        self.fonts = _augly_assets('FONTS_DIR', '*.ttf')

    def apply(self, image: Image.Image) -> Image.Image:
        draw = ImageDraw.Draw(image)
        font_size = max(6, int(image.height * random.uniform(*self.size)))
        try:
            font = ImageFont.truetype(str(random.choice(self.fonts)), font_size) if self.fonts else None
        except OSError:
            font = None
        font = font or ImageFont.load_default(size=font_size)
        x, y = random.uniform(0.0, 0.5) * image.width, random.uniform(0.0, 0.5) * image.height
        colour = tuple(random.randrange(256) for _ in range(3))
        for _ in range(random.randrange(1, 3)):
            text = ''.join(random.choice('ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789')
                           for _ in range(random.randrange(5, 10)))
            draw.text((x, y), text, fill=colour, font=font)
            y += font_size
        return image


class OverlayEmoji(Random):
    """One emoji, 10-30 % of the image's size, at a random place: augly's smiley PNGs when installed,
    else a drawn face."""

    def __init__(self, size: tuple[float, float] = (0.1, 0.3), p: float = 0.35):
        self.size, self.p = size, p
        self.emoji = _augly_assets('SMILEY_EMOJI_DIR', '*.png')

    def apply(self, image: Image.Image) -> Image.Image:
        side = max(4, int(min(image.size) * random.uniform(*self.size)))
        if self.emoji:
            with Image.open(random.choice(self.emoji)) as source:
                emoji = source.convert('RGBA').resize((side, side), Image.BILINEAR)
        else:
            emoji = Image.new('RGBA', (side, side))
            draw = ImageDraw.Draw(emoji)
            draw.ellipse((0, 0, side - 1, side - 1), fill=(255, random.randrange(160, 230), 0, 255))
            for cx in (0.33, 0.67):
                draw.ellipse((side * (cx - 0.07), side * 0.3, side * (cx + 0.07), side * 0.45), fill=(0, 0, 0, 255))
            draw.arc((side * 0.25, side * 0.4, side * 0.75, side * 0.8), 20, 160, fill=(0, 0, 0, 255),
                     width=max(1, side // 12))
        x = random.randrange(max(1, image.width - side + 1))
        y = random.randrange(max(1, image.height - side + 1))
        image.paste(emoji, (x, y), emoji)
        return image


class OverlayImageOrCrop(Random):
    """With probability ``overlay_p``: put this image onto another training image, or another one onto
    this (half the time each), 20-80 % of the background's size, opacity from ``opacity_lower`` to 1,
    then a moderate crop (scale 0.7-1). Otherwise a hard RandomResizedCrop (scale 0.15-1)."""

    def __init__(self, pool: Sequence[Any], input_size: int, overlay_p: float = 0.1, opacity_lower: float = 0.4,
                 size: tuple[float, float] = (0.2, 0.8), moderate_scale: float = 0.7, hard_scale: float = 0.15):
        self.pool, self.input_size, self.overlay_p = pool, input_size, overlay_p
        self.opacity_lower, self.size = opacity_lower, size
        self.moderate = transforms.RandomResizedCrop(input_size, scale=(moderate_scale, 1.0))
        self.hard = transforms.RandomResizedCrop(input_size, scale=(hard_scale, 1.0))

    def apply(self, image: Image.Image) -> Image.Image:
        if not self.pool or random.random() >= self.overlay_p:
            return self.hard(image)
        other = to_pil_rgb(random.choice(self.pool), ' (overlay)')
        background, overlay = (other, image) if random.random() < 0.5 else (image, other)
        fraction = random.uniform(*self.size)
        w, h = max(1, int(background.width * fraction)), max(1, int(background.height * fraction))
        overlay = overlay.resize((w, h), Image.BILINEAR)
        mask = Image.new('L', (w, h), int(255 * random.uniform(self.opacity_lower, 1.0)))
        out = background.copy()
        out.paste(overlay, (int(random.uniform(0, 1 - fraction) * background.width),
                            int(random.uniform(0, 1 - fraction) * background.height)), mask)
        return self.moderate(out)


class Shuffled:
    """Apply every augmentation of ``augmentations`` once, in a random order."""

    def __init__(self, augmentations: Sequence[Augmentation]):
        self.augmentations = list(augmentations)

    def __call__(self, image: Image.Image) -> Image.Image:
        for augmentation in random.sample(self.augmentations, len(self.augmentations)):
            image = augmentation(image)
        return _rgb(image)


class ToNormalizedTensor:
    """RGB PIL image -> (3, S, S) float32 tensor normalised with the backbone's mean and std; random
    erasing (random values) with probability ``erase_p`` first. ``size`` resizes a view that is not
    S x S already."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], erase_p: float = 0.0):
        self.size = size
        self.erase = transforms.RandomErasing(p=erase_p, value='random') if erase_p else None
        self.normalize = transforms.Normalize(mean, std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = _rgb(image)
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.BILINEAR)
        x = transforms.functional.to_tensor(image)
        if self.erase is not None:
            x = self.erase(x)
        return self.normalize(x)


class Views:
    """One image -> ``ncrops`` views stacked: (ncrops, 3, S, S) float32; the first moderate, the rest hard."""

    def __init__(self, moderate: Callable[[Image.Image], torch.Tensor], hard: Callable[[Image.Image], torch.Tensor],
                 ncrops: int):
        self.moderate, self.hard, self.ncrops = moderate, hard, ncrops

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.stack([self.moderate(image)] + [self.hard(image) for _ in range(self.ncrops - 1)])


# The winner's probability of each hard-view edit (exp/v98.py), by the name ``hard_p`` overrides it with;
# all but the overlay (which replaces the strong crop) are multiplied by ``hard_p_scale``.
HARD_EDITS: dict[str, float] = {'overlay': 0.1, 'rotate': 0.35, 'colour': 1.0, 'pixelize': 0.25, 'shuffle': 0.25, 'jpeg': 0.35,
                                'greyscale': 0.25, 'blur': 0.25, 'perspective': 0.35, 'text': 0.35, 'emoji': 0.35,
                                'edge': 0.3, 'erase': 0.25}


def recipe(input_size: int, mean: Sequence[float], std: Sequence[float], ncrops: int = 2,
           pool: Sequence[Any] = (), hard_p_scale: float = 1.0, hard_p: dict[str, float] | None = None,
           colour_jitter: float = 0.8) -> Views:
    """The winner's moderate and hard views at ``input_size``; ``pool`` are the training images that
    hard views may be overlaid with. ``hard_p_scale`` (0-1) multiplies the probability of each of the
    hard view's edits (not its crop, overlay or flips): 1 is the winner's (about 4.4 edits a view), 0.5
    gentler views that a small network learns from in fewer steps. ``hard_p`` sets the probability of
    named edits (keys of ``HARD_EDITS``) outright, instead of scaling the winner's. ``colour_jitter`` is
    the jitter's brightness, contrast and saturation strength (hue a quarter of it; the winner's 0.8)."""
    hard_p = hard_p or {}
    unknown = sorted(set(hard_p) - set(HARD_EDITS))
    if unknown:
        raise ValueError(f'unknown hard-view edits {unknown}: known are {list(HARD_EDITS)}')

    def p(name: str) -> float:
        return hard_p[name] if name in hard_p else HARD_EDITS[name] * (1.0 if name == 'overlay' else hard_p_scale)

    c = colour_jitter
    moderate = transforms.Compose([
        Torchvision(transforms.RandomResizedCrop(input_size, scale=(0.7, 1.0))),
        Torchvision(transforms.RandomHorizontalFlip()),
        ToNormalizedTensor(input_size, mean, std),
    ])
    hard = transforms.Compose([
        Rotate(p=p('rotate')),
        OverlayImageOrCrop(pool, input_size, overlay_p=p('overlay')),
        Shuffled([
            Torchvision(transforms.ColorJitter(c, c, c, c / 4), p=p('colour')),
            Pixelize(p=p('pixelize')),
            ShufflePixels(factor=0.1, p=p('shuffle')),
            JpegQuality(p=p('jpeg')),
            Torchvision(transforms.Grayscale(3), p=p('greyscale')),
            Blur(p=p('blur')),
            Torchvision(transforms.RandomPerspective(p=1.0), p=p('perspective')),
            Torchvision(transforms.RandomHorizontalFlip(p=1.0), p=0.5),
            Torchvision(transforms.RandomVerticalFlip(p=1.0), p=0.1),
            OverlayText(p=p('text')),
            OverlayEmoji(p=p('emoji')),
            EdgeEnhance(p=p('edge')),
        ]),
        ToNormalizedTensor(input_size, mean, std, erase_p=p('erase')),
    ])
    return Views(moderate, hard, ncrops)
