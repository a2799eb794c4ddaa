"""Image reading and conversion: every accepted kind of input -> an RGB ``PIL.Image``, the one thing the
reference preprocessing takes. All checks on one image live here (file kinds, pixel limit, modes, dtypes),
so every entry point of the operator behaves the same.
"""
from __future__ import annotations

import io
import os
import stat
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# towhee.types.Image modes -> how to get RGB channels out of them.
CHANNEL_ORDER = {'RGB': [0, 1, 2], 'RGBA': [0, 1, 2], 'BGR': [2, 1, 0], 'BGRA': [2, 1, 0]}
GRAY_MODES = ('L', 'GRAY')


class ImageError(ValueError):
    """One image cannot be used (missing, not an image, damaged, too large, an unusable mode).

    Only this error is about the image itself: a workflow may skip that image and go on. Any other
    error (settings, weights, devices) concerns every image.
    """


# A JPEG's decoding work grows with its scans times its pixels. Encoders write 1 to ~12 scans (10 for a
# colour progressive JPEG from libjpeg); a crafted file can repeat one scan thousands of times (318 KB,
# 6000x6000, 3,000 scans: over a minute to decode). Raise it like PIL.Image.MAX_IMAGE_PIXELS if needed.
MAX_JPEG_SCANS = 50

# The formats opened: those people give a copy detector (photos, screenshots, scans, web images), each
# with a decoder whose work the checks below bound. Pillow recognises a file by its content, whatever its
# name, and knows some forty formats: some wrap another image whose size and scans the outer header hides
# (a BLP texture holding a 1,009-scan or 144-MP JPEG, an ICO holding a huge PNG), some run another program
# (EPS: Ghostscript, a PostScript interpreter with no time limit), most are rarely met and little tested.
# None of those is ever reached: convert such files first (or extend this tuple in the Python API).
ACCEPTED_FORMATS = ('JPEG', 'PNG', 'WEBP', 'GIF', 'BMP', 'TIFF')

# A TIFF is decoded in whole tiles, and a tile may be far larger than the image (a 16x16 image in one
# 20000x20000 tile: 1.2 GB and 14 s). Honest tiles cover at most ~4 times the image (the last row and
# column of tiles padded), or one tile of up to 2048x2048 (usual tiles are 256-1024 px) for a small image.
TIFF_TILES_SLACK = 4
TIFF_TILES_FLOOR = 2048 * 2048


def open_image(source: Path | io.BytesIO) -> Image.Image:
    """``PIL.Image.open`` of an image in one of ``ACCEPTED_FORMATS``; anything else is refused
    (``UnidentifiedImageError``) before any decoder sees it."""
    Image.init()
    return Image.open(source, formats=[f for f in ACCEPTED_FORMATS if f in Image.OPEN])


def format_signature(prefix: bytes, formats: Sequence[str] | None = None) -> str | None:
    """The Pillow format (of ``formats``; all by default) whose signature ``prefix`` (a file's first 16
    bytes) starts with, None if none: a file is told by its content, nothing decoded."""
    Image.init()
    for name in formats or Image.ID:
        accept = Image.OPEN[name][1] if name in Image.OPEN else None
        try:
            if accept is not None and accept(prefix[:16]):
                return name
        except Exception:  # a plugin's check on a prefix it does not expect: not that format
            continue
    return None


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a regular file whose content is an image in an accepted format, whatever its name."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, 'rb') as f:
            return format_signature(f.read(16), ACCEPTED_FORMATS) is not None
    except OSError:
        return False

_OVER_LIMIT = ('over the pixel limit of {:,} (a decompression bomb, or a very large scan: raise '
               'PIL.Image.MAX_IMAGE_PIXELS to allow it)')


def max_pixels() -> int | None:
    """The largest image (width x height) that is decoded: PIL's ``Image.MAX_IMAGE_PIXELS`` (89.5 MP
    unless the user changed it; None disables the check), for every decoding path alike."""
    return Image.MAX_IMAGE_PIXELS


def check_pixels(width: int, height: int, what: str) -> None:
    limit = max_pixels()
    if width <= 0 or height <= 0:
        raise ImageError(f'zero-size image {what}: {width}x{height}')
    if limit is not None and width * height > limit:
        raise ImageError(f'{what} is {width}x{height} = {width * height:,} pixels, {_OVER_LIMIT.format(limit)}')


# JPEG markers as libjpeg reads them: these carry no length (TEM, RST0-7, SOI), these a 2-byte length
# (SOFn, DHT, DAC, SOS, DQT, DNL, DRI, APPn, COM); at any other marker libjpeg stops with an error.
_PARAMETERLESS = {0x01, *range(0xD0, 0xD9)}
_WITH_LENGTH = {*range(0xC0, 0xD0), *range(0xDA, 0xDE), *range(0xE0, 0xF0), 0xFE}


def jpeg_scans(data: bytes) -> int:
    """The number of scans (SOS segments) libjpeg decodes in JPEG ``data``, found by reading its markers
    as libjpeg does: after a segment (or a scan's entropy-coded data), the next 0xFF not followed by a
    0x00 stuffing byte starts a marker; runs of 0xFF are fill. A marker without a length must not be
    taken to have one (``FF 01`` then ``FF DA`` would hide the scans in the 65 KB it seems to skip)."""
    i, scans = 2, 0
    while True:
        i = data.find(b'\xff', i)
        if i < 0 or i + 1 >= len(data):
            return scans
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte: the marker is further on
            i += 1
        elif marker == 0x00 or marker in _PARAMETERLESS:  # stuffing inside a scan, or a marker without a length
            i += 2
        elif marker in _WITH_LENGTH:
            scans += marker == 0xDA
            i += 2 + int.from_bytes(data[i + 2:i + 4], 'big')
        else:  # EOI, or a marker libjpeg refuses: it decodes nothing further
            return scans


def check_jpeg_scans(image: Image.Image, source: Path | io.BytesIO, what: str) -> None:
    """Refuse a JPEG of more than ``MAX_JPEG_SCANS`` scans before it is decoded (see MAX_JPEG_SCANS)."""
    if image.format not in ('JPEG', 'MPO') or MAX_JPEG_SCANS is None:
        return
    data = source.getvalue() if isinstance(source, io.BytesIO) else Path(source).read_bytes()
    scans = jpeg_scans(data)
    if scans > MAX_JPEG_SCANS:
        raise ImageError(f'{what} is a JPEG of {scans} scans, over the limit of {MAX_JPEG_SCANS} (encoders write '
                         'at most ~12; so many only make decoding slow: raise towhee_isc.images.MAX_JPEG_SCANS '
                         'to allow it)')


def check_tiff_tiles(image: Image.Image, what: str) -> None:
    """Refuse a TIFF whose tiles cover far more than the image before it is decoded (see TIFF_TILES_SLACK).
    Strips need no check: libtiff decodes a strip no taller than the image."""
    if image.format != 'TIFF':
        return
    tile_width, tile_height = image.tag_v2.get(322), image.tag_v2.get(323)  # TileWidth, TileLength
    if not tile_width or not tile_height:
        return
    width, height = image.size
    covered = -(-width // tile_width) * tile_width * -(-height // tile_height) * tile_height
    if covered > max(TIFF_TILES_SLACK * width * height, TIFF_TILES_FLOOR):
        raise ImageError(f'{what} is a {width}x{height} TIFF in tiles of {tile_width}x{tile_height}: decoding it '
                         f'would inflate {covered:,} pixels, far more than the image has (a crafted file)')


def regular_file(path: Path, where: str = '') -> Path:
    """``path`` if it is an existing regular file; a FIFO, device or folder would block or fail when
    read, so only regular files are ever opened."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ImageError(f'image file not found: {str(path)!r}{where}') from None
    except ValueError:  # a NUL character: no file can have that name
        raise ImageError(f'{str(path)!r} is not a file name (it holds a NUL character){where}') from None
    except OSError as e:
        raise ImageError(f'cannot read image file {str(path)!r}{where}: {e.strerror}') from None
    if not stat.S_ISREG(mode):
        kind = 'a folder' if stat.S_ISDIR(mode) else 'not a regular file (a pipe, socket or device)'
        raise ImageError(f'{str(path)!r} is {kind}, not an image file{where}')
    return path


def to_pil_rgb(item: Any, where: str = '', draft: tuple[int, int] | None = None,
               exif_transpose: bool = False) -> Image.Image:
    """One image of any accepted kind -> an RGB ``PIL.Image``.

    Accepted: a file path (``str``/``os.PathLike``), the bytes of an image file (``bytes``,
    ``bytearray``, ``memoryview``), a ``PIL.Image`` of any mode, a ``towhee.types.Image`` or
    ``towhee.types.VideoFrame`` (its mode honoured) or a uint8 ``np.ndarray`` (HxW, HxWx1, HxWx3 RGB, HxWx4 RGBA; 1-d: an image file's
    bytes, the form Towhee's Triton client can send, as it serialises arrays but not bytes). For files and bytes:
    ``draft`` lets the JPEG decoder scale down in the DCT domain, to no less than this size;
    ``exif_transpose`` turns the image upright as its EXIF orientation says. ``where`` is appended to
    messages (e.g. ' (list item 3)').

    Raises:
        ImageError: the image cannot be used; TypeError: not a kind of image we take.
    """
    if isinstance(item, (str, os.PathLike)):
        path = regular_file(Path(item), where)
        return _decode(path, f'image file {str(path)!r}{where}', draft, exif_transpose)
    if isinstance(item, np.ndarray) and item.ndim == 1 and item.dtype == np.uint8:
        item = item.tobytes()
    if isinstance(item, (bytes, bytearray, memoryview)):
        if not len(item):
            raise ImageError(f'empty image bytes{where}')
        return _decode(io.BytesIO(item), f'image bytes{where}', draft, exif_transpose)
    if isinstance(item, Image.Image):
        check_pixels(item.width, item.height, f'PIL image{where}')
        return pil_to_rgb(item, f'PIL image{where}')
    if isinstance(item, np.ndarray):
        return _array_to_pil(item, where)
    raise TypeError(f'unsupported input type {type(item).__name__}{where}: expected towhee.types.Image, '
                    'np.ndarray (uint8, HxW or HxWxC), PIL.Image, a file path, image bytes, or a list of these')


def image_size(source: Path | io.BytesIO, what: str) -> tuple[int, int]:
    """Width and height from the header alone (nothing decoded), checked against the pixel limit."""
    try:
        with open_image(source) as image:
            check_pixels(image.width, image.height, what)
            check_jpeg_scans(image, source, what)
            check_tiff_tiles(image, what)
            return image.size
    except ImageError:
        raise
    except Exception as e:  # PIL's plugins raise anything on a crafted file (see _decode)
        raise _image_error(e, what, source) from e


def _decode(source: Path | io.BytesIO, what: str, draft: tuple[int, int] | None,
            exif_transpose: bool) -> Image.Image:
    try:
        with open_image(source) as image:
            check_pixels(image.width, image.height, what)
            check_jpeg_scans(image, source, what)
            check_tiff_tiles(image, what)
            if draft is not None:
                image.draft('RGB', draft)  # JPEG only; other formats ignore it
            if exif_transpose:
                image = ImageOps.exif_transpose(image)
            image.load()
            return pil_to_rgb(image, what)
    except ImageError:
        raise
    except Exception as e:
        # PIL reports damaged files in OSError, ValueError, SyntaxError, EOFError, and its plugins raise
        # anything on a crafted one (NotImplementedError: a DDS pixel format; AttributeError: a SPIDER
        # stack header): whatever happens while decoding is this image's problem, never its neighbours'.
        raise _image_error(e, what, source) from e


def _known_format(source: Path | io.BytesIO) -> str | None:
    """The format Pillow knows but we do not open whose signature ``source`` starts with, if any (a broken
    JPEG has a JPEG's signature: it is damaged, not of another format)."""
    Image.init()
    others = [f for f in Image.ID if f not in ACCEPTED_FORMATS]
    try:
        if isinstance(source, io.BytesIO):
            return format_signature(source.getvalue()[:16], others)
        with open(source, 'rb') as f:
            return format_signature(f.read(16), others)
    except OSError:
        return None


def _image_error(e: Exception, what: str, source: Path | io.BytesIO) -> ImageError:
    if isinstance(e, ImageError):
        return e
    if isinstance(e, UnidentifiedImageError):
        accepted = ', '.join(ACCEPTED_FORMATS)
        known = _known_format(source)
        return ImageError(f'{what} is {known}, a format not accepted here (only {accepted}): convert it first' if known
                          else f'{what} is not an image (or not in a format accepted here: {accepted})')
    if isinstance(e, Image.DecompressionBombError):  # PIL's own check, at twice the limit
        return ImageError(f'{what} is {_OVER_LIMIT.format(max_pixels())}')
    if isinstance(e, (OSError, ValueError, SyntaxError, EOFError)):
        return ImageError(f'cannot read {what}: {e}')
    return ImageError(f'cannot read {what}: the decoder failed ({type(e).__name__}: {e})')


def pil_to_rgb(image: Image.Image, what: str) -> Image.Image:
    """Any PIL mode -> RGB. Integer and float modes wider than 8 bits are scaled to 0-255 first:
    PIL's own ``convert('RGB')`` clips them, which turns a 16-bit photo nearly white.

    - ``I;16*`` (16-bit grey, e.g. 16-bit PNG): v / 257 (65535 -> 255).
    - ``I`` (32-bit integers): values within 0-255 are taken as they are, within 0-65535 as 16-bit;
      anything else (negative, or over 16 bits) has no known scale and is refused.
    - ``F`` (32-bit float): values within 0-1 are scaled by 255, within 0-255 taken as they are;
      NaN, infinite or other ranges are refused.
    """
    if image.mode == 'RGB':
        return image
    if image.mode.startswith('I;16') or image.mode in ('I', 'F'):
        return Image.fromarray(_wide_to_uint8(image, what), 'L').convert('RGB')
    try:
        return image.convert('RGB')
    except Exception as e:  # as in _decode: any failure on this image is this image's
        raise ImageError(f'cannot convert {what} of mode {image.mode!r} to RGB: {e}') from e


def _wide_to_uint8(image: Image.Image, what: str) -> np.ndarray:
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith('I;16'):
        scale = 257.0
    else:
        if not np.isfinite(values).all():
            raise ImageError(f'{what} of mode {image.mode!r} holds NaN or infinite values')
        low, high = (values.min(), values.max()) if values.size else (0.0, 0.0)
        if low < 0:
            raise ImageError(f'{what} of mode {image.mode!r} holds negative values ({low:g}): no known scale to 8 bits')
        if image.mode == 'F' and high <= 1.0:
            scale = 1 / 255
        elif high <= 255:
            scale = 1.0
        elif image.mode == 'I' and high <= 65535:
            scale = 257.0
        else:
            raise ImageError(f'{what} of mode {image.mode!r} holds values up to {high:g}: no known scale to 8 bits '
                             '(convert it to 8 or 16 bits first)')
    return np.clip(np.rint(values / scale), 0, 255).astype(np.uint8)


def _array_to_pil(array: np.ndarray, where: str) -> Image.Image:
    from towhee.types import Image as TowheeImage, VideoFrame  # video decoders give VideoFrames, BGR or RGB
    mode = getattr(array, 'mode', None) if isinstance(array, (TowheeImage, VideoFrame)) else None
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise TypeError(f'image arrays must be uint8, got {array.dtype}{where}; '
                        'for preprocessed float tensors use skip_preprocess=True')
    if array.size == 0:
        raise ImageError(f'zero-size image{where}: shape {array.shape}')
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        check_pixels(array.shape[1], array.shape[0], f'image array{where}')
        if mode not in (None, *GRAY_MODES):
            raise ImageError(f'a 2-d image array cannot have mode {mode!r}{where}')
        return Image.fromarray(np.ascontiguousarray(array), 'L').convert('RGB')
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ImageError(f'image arrays must be HxW, HxWx1, HxWx3 or HxWx4, got shape {array.shape}{where}')
    check_pixels(array.shape[1], array.shape[0], f'image array{where}')
    mode = (mode or ('RGB' if array.shape[2] == 3 else 'RGBA')).upper()
    if mode not in CHANNEL_ORDER or len(mode) != array.shape[2]:
        raise ImageError(f'unsupported image mode {mode!r} for shape {array.shape}{where}: '
                         f'supported modes are {sorted(CHANNEL_ORDER)} and {list(GRAY_MODES)}')
    return Image.fromarray(np.ascontiguousarray(array[:, :, CHANNEL_ORDER[mode]]), 'RGB')


def is_jpeg(path: Path) -> bool:
    """Whether a regular file starts with the JPEG signature (anything else goes the usual way)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, 'rb') as f:
            return f.read(3) == b'\xff\xd8\xff'
    except OSError:
        return False  # the usual path reports it
