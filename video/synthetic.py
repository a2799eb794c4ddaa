"""Videos made from still photos, for tests and the benchmark: shots that pan and zoom over a photo,
written with PyAV (any codec FFmpeg has; rotation metadata optional), and the edits a copy goes
through (rescale, crop, brightness, overlay, speed)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

# scikit-image's bundled photos that load offline, one per subject (chelsea = cat).
PHOTOS = ('astronaut', 'chelsea', 'coffee', 'rocket', 'hubble_deep_field', 'immunohistochemistry', 'retina', 'logo',
          'camera', 'moon', 'coins', 'clock', 'brick', 'grass', 'gravel', 'cell', 'colorwheel', 'page', 'text')


def photos(names: Sequence[str] = PHOTOS) -> list[Image.Image]:
    """Real photos as RGB ``PIL.Image`` (scikit-image's data, a test dependency)."""
    from skimage import data
    return [Image.fromarray(np.asarray(getattr(data, n)())).convert('RGB') for n in names]


@dataclass(frozen=True)
class Shot:
    """``seconds`` of a window moving (pan and zoom) over ``photo`` from box ``start`` to box ``end``
    (left, top, right, bottom as fractions of the photo)."""

    photo: int
    seconds: float
    start: tuple[float, float, float, float]
    end: tuple[float, float, float, float]

    @classmethod
    def random(cls, rng: np.random.Generator, photo: int, seconds: float,
               within: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)) -> 'Shot':
        """Random start and end windows (45-80 % of the region ``within``, as fractions of the photo)."""
        left, top, right, bottom = within

        def box():
            w = rng.uniform(0.45, 0.8)
            h = w * rng.uniform(0.7, 1.0)
            x, y = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
            return (left + x * (right - left), top + y * (bottom - top),
                    left + (x + w) * (right - left), top + (y + h) * (bottom - top))
        return cls(photo, seconds, box(), box())

    def frame(self, image: Image.Image, t: float, size: tuple[int, int]) -> np.ndarray:
        """The RGB frame at ``t`` seconds into the shot."""
        a = min(max(t / self.seconds, 0.0), 1.0)
        left, top, right, bottom = (s + (e - s) * a for s, e in zip(self.start, self.end))
        w, h = image.size
        crop = image.crop((round(left * w), round(top * h), round(right * w), round(bottom * h)))
        return np.asarray(crop.resize(size, Image.BILINEAR))


def render(shots: Sequence[Shot], images: Sequence[Image.Image], fps: float, size: tuple[int, int]
           ) -> list[np.ndarray]:
    """Frames of shots one after another at ``fps``."""
    frames = []
    for shot in shots:
        frames += [shot.frame(images[shot.photo], i / fps, size) for i in range(round(shot.seconds * fps))]
    return frames


def write_video(path: str | os.PathLike, frames: Iterable[np.ndarray], fps: int = 10, codec: str = 'libx264',
                rotation: int | None = None, quality: int = 23) -> None:
    """Encode RGB frames (all the same even size) into a video file; ``rotation``: display matrix degrees
    (counter-clockwise) a player turns the frames by; ``quality``: CRF for x264 (lower is better)."""
    import av
    frames = iter(frames)
    first = next(frames)
    with av.open(str(path), 'w') as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = first.shape[1], first.shape[0]
        stream.pix_fmt = 'yuv420p'
        if codec == 'libx264':
            stream.options = {'crf': str(quality), 'preset': 'ultrafast'}
        if rotation:
            stream.set_display_rotation(rotation)
        for rgb in [first, *frames]:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format='rgb24')))
        container.mux(stream.encode())


def edit(frames: Sequence[np.ndarray], scale: float = 1.0,
         crop: float | tuple[float, float, float, float] = 0.0, brightness: float = 1.0,
         overlay: bool = False, speed: float = 1.0, size: tuple[int, int] | None = None) -> list[np.ndarray]:
    """A copy's edits: crop away ``crop`` (left, top, right, bottom fractions of the frame; one number:
    that much of each side), change brightness, draw a caption box, resample time by ``speed`` (2.0:
    twice as fast), rescale by ``scale`` (or to ``size``)."""
    left, top, right, bottom = (float(crop),) * 4 if np.ndim(crop) == 0 else map(float, crop)
    if not (min(left, top, right, bottom) >= 0 and left + right < 1 and top + bottom < 1):
        raise ValueError(f'crop {crop!r}: each fraction >= 0, and left + right and top + bottom below 1')
    picked = [frames[min(int(i * speed), len(frames) - 1)] for i in range(max(1, round(len(frames) / speed)))]
    out = []
    for rgb in picked:
        image = Image.fromarray(rgb)
        w, h = image.size
        if left or top or right or bottom:
            image = image.crop((round(left * w), round(top * h), round((1 - right) * w), round((1 - bottom) * h)))
        if brightness != 1.0:
            image = ImageEnhance.Brightness(image).enhance(brightness)
        if overlay:
            draw = ImageDraw.Draw(image)
            draw.rectangle((0, image.height * 3 // 4, image.width, image.height), fill=(20, 20, 20))
            draw.text((4, image.height * 3 // 4 + 2), 'COPY 2026', fill=(255, 255, 0))
        target = size or (max(2, round(w * scale) // 2 * 2), max(2, round(h * scale) // 2 * 2))
        out.append(np.asarray(image.resize(target, Image.BILINEAR)))
    return out
