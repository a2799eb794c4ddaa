"""Image reading and conversion: every accepted kind of input -> an RGB ``PIL.Image``, the one thing the
reference preprocessing takes. All checks on one image live here (file kinds, pixel limit, modes, dtypes),
so every entry point of the operator behaves the same.
"""
from __future__ import annotations

import io
import os
import re
import stat
import struct
from pathlib import Path
from typing import IO, Any, Collection, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

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

# Pillow reads a JPEG's markers up to its first scan in Python, inside Image.open, so before any check that
# needs the opened image: a loop turn for each segment and stray byte, some segments parsed byte by byte
# (quantization tables, Photoshop's) and Exif segments joined with ``bytes +=``, quadratic (100,000 Exif
# segments of 8 bytes, a 1.8 MB file, took 18 s to open); our count of scans walks every segment too.
# Cameras write a few dozen segments (one Exif, XMP, ICC chunks, up to 4 tables, a few per scan); extended
# XMP (a depth map) splits a few MB into 64 KB segments (256 for 16 MB). Beyond these bounds (segments in
# the file, and before the first scan: segments Pillow parses, bytes) a JPEG is refused before Pillow opens it.
MAX_JPEG_SEGMENTS = 4096
MAX_JPEG_PARSED_SEGMENTS = 16
MAX_JPEG_HEADER_BYTES = 16 * 2**20

# Pillow reads a PNG's chunks (every one, up to IEND) and a GIF's blocks before its first image in Python,
# a loop turn each (2.8 M empty PNG chunks, a 33 MB file: 11 CPU-s; 6.7 M GIF comment blocks: 4.8 CPU-s and
# 1.2 GB). Encoders write a few chunks plus image data in IDAT chunks of 8 KB or more (libpng's default; 4,096
# of them for a 32 MB PNG), and a few GIF extensions (an ICC profile of 1 MB: 4,000 sub-blocks of 255
# bytes); four times that still opens in milliseconds. A PNG may hold MAX_PNG_CHUNKS chunks and one more per
# PNG_BYTES_PER_CHUNK of file besides: a 141 MB 16-bit scan in libpng's 8 KB IDATs has 17,243, and a chunk
# of 8 KB costs its loop turn no more than its data costs to inflate; empty chunks gain an attacker nothing.
MAX_PNG_CHUNKS = 16384
PNG_BYTES_PER_CHUNK = 8192
MAX_GIF_BLOCKS = 16384

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


def open_image(source: str | os.PathLike | io.BytesIO, what: str = 'image') -> Image.Image:
    """``PIL.Image.open`` of an image in one of ``ACCEPTED_FORMATS``; anything else is refused
    (``UnidentifiedImageError``) before any decoder sees it, and so is a file whose structure would make
    opening or decoding it slow (``ImageError``, see ``check_container``)."""
    Image.init()
    check_container(source, what)
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
# The next marker that is not parameterless: 0xFF followed by neither 0x00 (stuffing), 0xFF (fill) nor a
# parameterless code. Searched in C: a Python step per 0xFF took 9 s for 32 MB of stuffed 0xFF bytes.
_NEXT_MARKER = re.compile(rb'\xff[^\x00\x01\xd0-\xd8\xff]')
# Pillow's reader before the first scan differs: JPG (C8), JPGn (F0-FD), SOI and EOI carry no length, and it
# goes on after EOI.
_PILLOW_PARAMETERLESS = {0xC8, *range(0xD0, 0xDA), *range(0xF0, 0xFE)}
# Start of frame markers (SOF0-15 but DHT, JPG and DAC).
_SOF = {*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC}


# The JPEG scan walk reads a file in windows of this many bytes: memory stays small whatever the file's size,
# and a file cut short while walked only comes back short (a mapping of it killed the process with SIGBUS).
JPEG_WALK_WINDOW = 2**20


def jpeg_segments(source: bytes | IO[bytes]) -> tuple[int, int]:
    """(scans, segments): the scans (SOS segments) libjpeg decodes in the JPEG ``source`` (its bytes, or a file
    open on it, read window by window) and the segments with a length it reads, found by reading its markers
    as libjpeg does: after a segment (or a scan's entropy-coded data), the next 0xFF not followed by a 0x00
    stuffing byte starts a marker; runs of 0xFF are fill. A marker without a length must not be taken to
    have one (``FF 01`` then ``FF DA`` would hide the scans in the 65 KB it seems to skip). The walk stops
    past MAX_JPEG_SEGMENTS segments."""
    in_memory = isinstance(source, (bytes, bytearray, memoryview))
    window, start, whole = (source, 0, True) if in_memory else (b'', 0, False)  # window: the bytes from start on
    i, scans, segments = 2, 0, 0
    while segments <= MAX_JPEG_SEGMENTS:
        if not whole and i - start + 4 > len(window):  # fewer than a marker and its length held: read on from i
            source.seek(i)
            window, start = source.read(JPEG_WALK_WINDOW), i
            whole = len(window) < JPEG_WALK_WINDOW  # the rest of the file
        found = _NEXT_MARKER.search(window, i - start)
        if found is None:
            if whole:
                break
            i = start + len(window) - 1  # its last byte may be a marker's 0xFF
            continue
        at = found.start()
        if at + 4 > len(window) and not whole:
            i = start + at  # the marker's length is in the next window
            continue
        marker = window[at + 1]
        if marker not in _WITH_LENGTH:  # EOI, or a marker libjpeg refuses: it decodes nothing further
            break
        scans, segments = scans + (marker == 0xDA), segments + 1
        i = start + at + 2 + int.from_bytes(window[at + 2:at + 4], 'big')
    return scans, segments


def jpeg_header(data: bytes) -> tuple[int, int, int]:
    """(segments, parsed segments, bytes) before the first scan of JPEG ``data``, walked as Pillow's reader
    walks it: each fill, stuffing or stray byte counts as a segment (a loop turn each); parsed are those
    Pillow decodes in Python (Exif, DQT, Photoshop, and SOFn, whose every 3 bytes are a loop turn: 250 padded
    SOF segments took 3 CPU-s and 523 MB). The walk stops once past a bound (see
    MAX_JPEG_SEGMENTS), so its own cost is bounded too."""
    i, segments, parsed = 2, 0, 0
    while segments <= MAX_JPEG_SEGMENTS and i <= MAX_JPEG_HEADER_BYTES:
        found = data.find(b'\xff', i)
        if found < 0 or found + 1 >= len(data):
            return segments + len(data) - i, parsed, len(data)
        marker, segments, i = data[found + 1], segments + 1 + found - i, found
        if marker in (0x00, 0xFF) or marker in _PILLOW_PARAMETERLESS:
            i += 1 if marker == 0xFF else 2
        elif marker == 0xDA:
            break
        elif marker >= 0xC0:
            parsed += (marker in _SOF or marker == 0xDB or (marker == 0xE1 and data[i + 4:i + 10] == b'Exif\0\0')
                       or (marker == 0xED and data[i + 4:i + 18] == b'Photoshop 3.0\0'))
            i += 2 + int.from_bytes(data[i + 2:i + 4], 'big')
        else:  # Pillow refuses the file ("no marker found")
            break
    return segments, parsed, i


def check_container(source: str | os.PathLike | io.BytesIO, what: str) -> None:
    """Refuse, before Pillow opens it, a JPEG, PNG, GIF or TIFF whose structure would make Pillow's reader
    loop in Python for long (see ``check_jpeg``, ``check_png``, ``check_gif``, ``check_tiff``); other files
    pass unread. A file is told by its content, as Pillow tells it."""
    try:
        f = source if isinstance(source, io.BytesIO) else open(source, 'rb')
    except (OSError, ValueError):
        return  # Pillow reports it
    position = f.tell()
    try:
        check = {'JPEG': check_jpeg, 'PNG': check_png, 'GIF': check_gif, 'TIFF': check_tiff, 'BMP': check_bmp}.get(
            format_signature(f.read(16), ACCEPTED_FORMATS) or '')
        if check is not None:
            check(f, what)
    except OSError:
        return  # Pillow reports it
    finally:
        if f is source:
            f.seek(position)
        else:
            f.close()


def check_jpeg(f: IO[bytes], what: str) -> None:
    """Refuse a JPEG (open as ``f``) of more markers than the bounds (MAX_JPEG_SEGMENTS and the two after it)
    or of more than MAX_JPEG_SCANS scans. Pillow takes any file starting ``FF D8 FF`` as a JPEG, whatever its
    name. A file is read in windows, never whole nor mapped (a 1.5 GB file was read twice; a mapped file cut
    short while walked killed the process with SIGBUS): the header walk needs its first
    MAX_JPEG_HEADER_BYTES and a segment beyond, the scan walk reads on window by window."""
    if isinstance(f, io.BytesIO):
        data: Any = f.getvalue()  # an upload, bounded by the caller; no copy while it is unchanged
        whole = True
    else:
        f.seek(0)
        data = f.read(MAX_JPEG_HEADER_BYTES + 2**17)  # a walk past the bound, by one segment and stray bytes
        whole = len(data) < MAX_JPEG_HEADER_BYTES + 2**17
    scans, segments = jpeg_segments(data if whole else f)
    header_segments, parsed, size = jpeg_header(data)
    segments = max(segments, header_segments)
    if MAX_JPEG_SCANS is not None and scans > MAX_JPEG_SCANS:
        raise ImageError(f'{what} is a JPEG of {scans} scans, over the limit of {MAX_JPEG_SCANS} (encoders write '
                         'at most ~12; so many only make decoding slow: raise towhee_isc.images.MAX_JPEG_SCANS '
                         'to allow it)')
    over = [f'{count:,} {counted} (bound {bound:,})' for count, bound, counted in (
        (segments, MAX_JPEG_SEGMENTS, 'segments and stray bytes'),
        (parsed, MAX_JPEG_PARSED_SEGMENTS, 'Exif, DQT, SOF or Photoshop segments before its first scan'),
        (size, MAX_JPEG_HEADER_BYTES, 'bytes before its first scan')) if count > bound]
    if over:  # the counts as read so far: each walk stops once past its bound
        raise ImageError(f'{what} is a JPEG of too many markers: {"; ".join(over)}. Cameras write a few dozen '
                         'segments; so many only make opening slow (raise towhee_isc.images.MAX_JPEG_SEGMENTS, '
                         'MAX_JPEG_PARSED_SEGMENTS or MAX_JPEG_HEADER_BYTES to allow it)')


def png_chunk_bound(size: int) -> int:
    """The chunks a PNG of ``size`` bytes may hold: MAX_PNG_CHUNKS, and one per PNG_BYTES_PER_CHUNK."""
    return MAX_PNG_CHUNKS + size // PNG_BYTES_PER_CHUNK


def png_chunks(f: IO[bytes], bound: int) -> int:
    """The chunks of the PNG open as ``f`` up to IEND, walked by their 8-byte headers (the data skipped); the
    walk stops past ``bound``."""
    f.seek(8)
    chunks = 0
    while chunks <= bound:
        head = f.read(8)
        if len(head) < 8:
            break
        length, kind = struct.unpack('>I4s', head)
        chunks += 1
        if kind == b'IEND':
            break
        f.seek(length + 4, os.SEEK_CUR)  # the data and its CRC
    return chunks


def check_png(f: IO[bytes], what: str) -> None:
    """Refuse a PNG of more chunks than ``png_chunk_bound`` of its size."""
    size = f.seek(0, os.SEEK_END)
    bound = png_chunk_bound(size)
    if png_chunks(f, bound) > bound:
        raise ImageError(f'{what} is a PNG of over {bound:,} chunks in {size:,} bytes (encoders write a few, and image '
                         f'data in chunks of 8 KB or more: {MAX_PNG_CHUNKS:,} and one per {PNG_BYTES_PER_CHUNK:,} bytes '
                         'are allowed); so many only make opening slow (a crafted file; raise '
                         'towhee_isc.images.MAX_PNG_CHUNKS to allow it)')


def gif_blocks(f: IO[bytes]) -> int:
    """The extension blocks, their sub-blocks and the stray bytes before the first image of the GIF open as
    ``f`` (Pillow's open reads these, a loop turn each); the walk stops past MAX_GIF_BLOCKS."""
    f.seek(10)
    flags = f.read(3)[:1]
    if not flags:
        return 0
    if flags[0] & 0x80:  # the global colour table
        f.seek(3 << ((flags[0] & 7) + 1), os.SEEK_CUR)
    blocks = 0
    while blocks <= MAX_GIF_BLOCKS:
        introducer = f.read(1)
        if introducer in (b'', b',', b';'):  # the first image, the end
            break
        blocks += 1
        if introducer != b'!':  # a stray byte: Pillow skips it
            continue
        f.read(1)  # the extension's label
        while blocks <= MAX_GIF_BLOCKS:
            size = f.read(1)
            if not size or not size[0]:
                break
            blocks += 1
            f.seek(size[0], os.SEEK_CUR)
    return blocks


def check_gif(f: IO[bytes], what: str) -> None:
    """Refuse a GIF of more than MAX_GIF_BLOCKS blocks before its first image."""
    blocks = gif_blocks(f)
    if blocks > MAX_GIF_BLOCKS:
        raise ImageError(f'{what} is a GIF of over {MAX_GIF_BLOCKS:,} extension blocks before its first image '
                         '(encoders write a few); so many only make opening slow (a crafted file; raise '
                         'towhee_isc.images.MAX_GIF_BLOCKS to allow it)')


# TIFF's integer types and their struct codes: libtiff takes any of them for a tile size, Pillow skips the
# 64-bit ones (16-18), so it saw no tiles in a 16x16 TIFF that libtiff decoded in one 36000x36000 tile.
_TIFF_INTEGERS = {1: 'B', 3: 'H', 4: 'L', 6: 'b', 8: 'h', 9: 'l', 13: 'L', 16: 'Q', 17: 'q', 18: 'Q'}


# Pillow reads these tags' values at open, in Python (an XResolution of 4.1 M rationals: 14.5 CPU-s, 724 MB),
# and makes a tile for each strip or tile offset, decoded one by one (4.1 M strips for a 16x16 image: 40 CPU-s,
# 1.15 GB). The TIFF specification gives each one value, or one per sample, or one per strip or tile; more
# are refused. Strips and tiles: as many as the image needs (at least 64, for writers that round), and at
# most MAX_TIFF_STRIPS (honest writers make strips of ~8 KB: 32,000 for the largest image under the pixel limit).
_TIFF_ONE_VALUE = {256, 257, 259, 262, 277, 278, 282, 283, 284, 296, 317, 322, 323}
_TIFF_PER_SAMPLE = {258, 338, 339}
_TIFF_PER_STRIP = {273, 279, 324, 325}
_TIFF_FIXED = {320: 3 * 2**16, 530: 2, 532: 6}  # ColorMap (3 x 2^bits), YCbCrSubSampling, ReferenceBlackWhite
MAX_TIFF_STRIPS = 2**16
# Other tags Pillow reads at open (XMP, ICC, Orientation, FillOrder, ...) are read whole, a Python object for
# each number (4.1 M rationals in XMP: 15 CPU-s, in Orientation 30); bytes and text come as one string. The
# numbers outside the strips, tiles and ColorMap are bounded in all (a GeoTIFF's tie points: a few hundred).
_TIFF_BYTE_TYPES = {1, 2, 7}  # BYTE, ASCII, UNDEFINED (SBYTE is unpacked into a Python int each)
MAX_TIFF_OTHER_VALUES = 2**16
MAX_TIFF_ENTRIES = 2**16 - 1  # a classic TIFF's most; Pillow reads every entry of the first directory


def tiff_directory(f: IO[bytes], arrays: Collection[int] = ()) -> tuple[
        int, list[tuple[int, int, int, int | None]], dict[int, tuple[int, ...]]]:
    """(entries declared, [(tag, type, count, value)], {tag: values}) of the first directory of the TIFF (classic
    or BigTIFF) open as ``f``, read from its raw entries (at most MAX_TIFF_ENTRIES of them); value: the one
    integer of an entry of one value of any integer type (libtiff takes them all), else None; values: every
    integer of the first entry of each tag in ``arrays`` (of at most MAX_TIFF_STRIPS)."""
    f.seek(0)
    head = f.read(16)
    order = {b'II': '<', b'MM': '>'}.get(head[:2])
    if order is None or len(head) < 16:
        return 0, [], {}
    big = struct.unpack(order + 'H', head[2:4])[0] == 43
    count_code, entry_code, pointer_code = ('Q', 'HHQ8s', 'Q') if big else ('H', 'HHL4s', 'L')
    f.seek(struct.unpack(order + pointer_code, head[8:16] if big else head[4:8])[0])
    count_bytes = f.read(struct.calcsize(order + count_code))
    if len(count_bytes) < struct.calcsize(order + count_code):
        return 0, [], {}
    declared = struct.unpack(order + count_code, count_bytes)[0]
    entry_size = struct.calcsize(order + entry_code)
    table = f.read(min(declared, MAX_TIFF_ENTRIES) * entry_size)
    entries, lists = [], {}
    for tag, kind, count, field in struct.iter_unpack(order + entry_code, table[:len(table) // entry_size * entry_size]):
        code, value = _TIFF_INTEGERS.get(kind), None
        listed = tag in arrays and tag not in lists and count <= MAX_TIFF_STRIPS
        if code is not None and (count == 1 or listed):
            size = struct.calcsize(order + code) * count
            if size > len(field):  # stored elsewhere: the field holds its offset
                f.seek(struct.unpack(order + pointer_code, field)[0])
                field = f.read(size)
            if len(field) >= size:
                numbers = struct.unpack(f'{order}{count}{code}', field[:size])
                value = numbers[0] if count == 1 else None
                if listed:
                    lists[tag] = numbers
        entries.append((tag, kind, count, value))
    return declared, entries, lists


def tiff_tiles(f: IO[bytes]) -> dict[int, int | None]:
    """{tag: value} of TileWidth (322) and TileLength (323) in the first directory of the TIFF open as ``f``,
    as libtiff reads them: the first entry of each tag (see ``tiff_directory``)."""
    found: dict[int, int | None] = {}
    for tag, _, _, value in tiff_directory(f)[1]:
        if tag in (322, 323) and tag not in found:
            found[tag] = value
    return found


def check_tiff(f: IO[bytes], what: str) -> None:
    """Refuse a TIFF whose first directory has more entries than MAX_TIFF_ENTRIES, or an entry Pillow reads at
    open with more values than the specification gives it (see MAX_TIFF_STRIPS). Every entry of a tag counts:
    libtiff takes the first, Pillow the last."""
    declared, entries, lists = tiff_directory(f, _TIFF_PER_STRIP)
    if declared > MAX_TIFF_ENTRIES:
        raise ImageError(f'{what} is a TIFF whose directory has {declared:,} entries, over the {MAX_TIFF_ENTRIES:,} '
                         'a TIFF can hold (a crafted file)')

    def values(tag: int) -> list[int]:
        return [value for t, _, _, value in entries if t == tag and value is not None and value > 0]

    height, samples = max(values(257), default=1), max(values(277), default=1)
    planes = samples if 2 in values(284) else 1
    tiled = bool(values(322) and values(323))
    if tiled:
        pieces = -(-max(values(256), default=1) // min(values(322))) * -(-height // min(values(323)))
    else:
        pieces = -(-height // min(values(278), default=height))
    per_strip = min(max(pieces * planes, 64), MAX_TIFF_STRIPS)
    for tag, _, count, _ in entries:
        bound = (1 if tag in _TIFF_ONE_VALUE else samples if tag in _TIFF_PER_SAMPLE
                 else per_strip if tag in _TIFF_PER_STRIP else _TIFF_FIXED.get(tag))
        if bound is not None and count > bound:
            raise ImageError(f'{what} is a TIFF whose tag {tag} holds {count:,} values, over the {bound:,} it can '
                             'need (a crafted file: so many only make opening slow)')
    others = sum(count for tag, kind, count, _ in entries
                 if kind not in _TIFF_BYTE_TYPES and tag not in _TIFF_PER_STRIP and tag not in _TIFF_FIXED)
    if others > MAX_TIFF_OTHER_VALUES:
        raise ImageError(f'{what} is a TIFF whose tags hold {others:,} numbers besides its strips, over the bound of '
                         f'{MAX_TIFF_OTHER_VALUES:,} (a crafted file: so many only make opening slow; raise '
                         'towhee_isc.images.MAX_TIFF_OTHER_VALUES to allow it)')
    if next((value for tag, _, _, value in entries if tag == 259), None) in (6, 7):  # Compression: JPEG
        check_tiff_jpeg(f, what, lists.get(324 if tiled else 273, ()), lists.get(325 if tiled else 279, ()))


def check_tiff_jpeg(f: IO[bytes], what: str, offsets: Sequence[int], counts: Sequence[int]) -> None:
    """Refuse a JPEG-compressed TIFF one of whose strips or tiles (at ``offsets``, of ``counts`` bytes) is a
    JPEG of more scans or segments than a .jpg file may hold (MAX_JPEG_SCANS, MAX_JPEG_SEGMENTS): libjpeg decodes
    each through libtiff, which stops at 100 scans only (99 scans of 9000x9000 in a 961 KB file: 9.4 CPU-s,
    729 MB). Each distinct strip is read once; strips that overlap, holding more bytes than the file, are
    refused as crafted (so this walk reads the file once at most)."""
    size = f.seek(0, os.SEEK_END)
    pieces = sorted({(offset, max(0, min(count, size - offset))) for offset, count in zip(offsets, counts)})
    if sum(count for _, count in pieces) > size:
        raise ImageError(f'{what} is a TIFF whose JPEG strips overlap, holding more bytes than its {size:,} (a crafted '
                         'file)')
    for offset, count in pieces:
        f.seek(offset)
        scans, segments = jpeg_segments(f.read(count))
        if MAX_JPEG_SCANS is not None and scans > MAX_JPEG_SCANS or segments > MAX_JPEG_SEGMENTS:
            raise ImageError(f'{what} is a TIFF whose JPEG strip at byte {offset:,} holds {scans} scans and {segments} '
                             f'segments, over the limits of {MAX_JPEG_SCANS} and {MAX_JPEG_SEGMENTS:,} (encoders '
                             'write at most ~12 scans; so many only make decoding slow: raise '
                             'towhee_isc.images.MAX_JPEG_SCANS to allow it)')


# Pillow decodes run-length encoded BMPs (RLE8, RLE4) in Python, a loop turn per pixel and per 2 bytes of
# codes: a 37 KB 9000x9000 file of one pixel a row took 20 CPU-s, a 32 MB 16x16 one of padding codes 7.8.
# Such files are small icons and scans: larger ones are refused, and so are codes longer than the pixels
# need (at worst 2 bytes a pixel and 2 a row, plus slack).
MAX_BMP_RLE_PIXELS = 2**21


def check_bmp(f: IO[bytes], what: str) -> None:
    """Refuse a run-length encoded BMP of more than MAX_BMP_RLE_PIXELS pixels or of more codes than its
    pixels need."""
    f.seek(10)
    header = f.read(24)
    if len(header) < 24 or struct.unpack('<I', header[4:8])[0] < 40:  # OS/2 headers have no compression
        return
    offset, _, width, height, _, _, compression = struct.unpack('<IIiiHHI', header)
    if compression not in (1, 2):
        return
    pixels = abs(width) * abs(height)
    codes = os.fstat(f.fileno()).st_size if not isinstance(f, io.BytesIO) else len(f.getbuffer())
    codes -= offset
    if pixels > MAX_BMP_RLE_PIXELS or codes > 2 * pixels + 2 * abs(height) + 4096:
        raise ImageError(f'{what} is a run-length encoded BMP of {abs(width)}x{abs(height)} pixels in {codes:,} bytes '
                         f'of codes, over the bounds of {MAX_BMP_RLE_PIXELS:,} pixels and 2 bytes a pixel (Pillow '
                         'decodes it in Python; raise towhee_isc.images.MAX_BMP_RLE_PIXELS to allow a larger one)')


def check_tiff_tiles(image: Image.Image, what: str) -> None:
    """Refuse a TIFF whose tiles cover far more than the image before it is decoded (see TIFF_TILES_SLACK),
    with the tile size libtiff will use (see ``tiff_tiles``). Strips need no check: libtiff decodes a strip
    no taller than the image."""
    if image.format != 'TIFF':
        return
    position = image.fp.tell()
    try:
        tiles = tiff_tiles(image.fp)
    finally:
        image.fp.seek(position)
    if not tiles:
        return
    tile_width, tile_height = tiles.get(322), tiles.get(323)  # TileWidth, TileLength
    if not tile_width or not tile_height or tile_width < 0 or tile_height < 0:
        raise ImageError(f'{what} is a TIFF with malformed tile tags (TileWidth {tile_width}, TileLength '
                         f'{tile_height}): a crafted file')
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
        with open_image(source, what) as image:
            check_pixels(image.width, image.height, what)
            check_tiff_tiles(image, what)
            return image.size
    except ImageError:
        raise
    except Exception as e:  # PIL's plugins raise anything on a crafted file (see _decode)
        raise _image_error(e, what, source) from e


def _decode(source: Path | io.BytesIO, what: str, draft: tuple[int, int] | None,
            exif_transpose: bool) -> Image.Image:
    try:
        with open_image(source, what) as image:
            check_pixels(image.width, image.height, what)
            check_tiff_tiles(image, what)
            if draft is not None:
                image.draft('RGB', draft)  # JPEG only; other formats ignore it
            image.load()
            if exif_transpose:
                image = upright(image, what)
            return pil_to_rgb(image, what)
    except ImageError:
        raise
    except Exception as e:
        # PIL reports damaged files in OSError, ValueError, SyntaxError, EOFError, and its plugins raise
        # anything on a crafted one (NotImplementedError: a DDS pixel format; AttributeError: a SPIDER
        # stack header): whatever happens while decoding is this image's problem, never its neighbours'.
        raise _image_error(e, what, source) from e


# EXIF orientation -> the turn that makes the image upright (as ``ImageOps.exif_transpose``).
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}

# A JPEG's EXIF is one APP1 segment of at most 64 KB; a PNG's eXIf or a WebP's EXIF chunk may be the whole file,
# and Pillow parses every tag of it in Python (``ImageOps.exif_transpose`` unpacked and re-packed a 33 MB one:
# 53 CPU-s, 1.35 GB). Larger EXIF blocks than this are refused when turning an image upright.
MAX_EXIF_BYTES = 4 * 64 * 2**10


def upright(image: Image.Image, what: str) -> Image.Image:
    """The loaded ``image`` turned upright by its EXIF orientation (a new image; the same pixels as
    ``ImageOps.exif_transpose``), without re-writing its EXIF: only the Orientation tag is read, from an EXIF
    block of at most MAX_EXIF_BYTES, and the EXIF is dropped (nothing downstream reads it)."""
    exif = image.info.get('exif')
    size = len(exif) if isinstance(exif, (bytes, bytearray)) else 0
    raw = image.info.get('Raw profile type exif')  # PNG text chunk: the EXIF in hex
    size = max(size, len(raw) // 2 if isinstance(raw, str) else 0)
    if size > MAX_EXIF_BYTES:
        raise ImageError(f'{what} has an EXIF block of {size:,} bytes, over the bound of {MAX_EXIF_BYTES:,} '
                         '(cameras write at most 64 KB; so much only makes reading its orientation slow)')
    method = _UPRIGHT.get(image.getexif().get(0x0112, 1))  # Orientation
    turned = image.transpose(method) if method is not None else image.copy()
    turned.info.pop('exif', None)
    turned.info.pop('Raw profile type exif', None)
    return turned


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


# Pixels scaled at a time by _wide_to_uint8: float64 temporaries of the whole image took 2.2 GB for an 88 MP
# 16-bit PNG (a 172 KB upload); a block of rows keeps them to a few MB.
WIDE_BLOCK_PIXELS = 2**18


def _wide_to_uint8(image: Image.Image, what: str) -> np.ndarray:
    """An ``I;16*``, ``I`` or ``F`` image -> (H, W) uint8 at the scale ``pil_to_rgb`` states: rint(v / scale)
    clipped to 0-255, computed in float64 one block of rows at a time (the image's own dtype held once)."""
    values = np.asarray(image)
    if image.mode.startswith('I;16'):
        scale = 257.0
    else:
        low, high = (values.min(), values.max()) if values.size else (0, 0)
        if not (np.isfinite(low) and np.isfinite(high)):  # NaN spreads to min and max
            raise ImageError(f'{what} of mode {image.mode!r} holds NaN or infinite values')
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
    scaled = np.empty(values.shape, np.uint8)
    rows = max(1, WIDE_BLOCK_PIXELS // max(1, values.shape[1] if values.ndim > 1 else 1))
    for start in range(0, len(values), rows):
        block = values[start:start + rows].astype(np.float64)
        block /= scale
        np.rint(block, out=block)
        scaled[start:start + rows] = np.clip(block, 0, 255, out=block)
    return scaled


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
