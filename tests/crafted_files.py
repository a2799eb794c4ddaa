"""Image files built to make decoding expensive while looking small (the hostile reviews' attacks), shared by
the in-process decoder tests and the tests that give them to the commands and the service."""
from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def encoded(image: Image.Image, fmt: str = 'JPEG', **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def jpeg_with_hidden_scans(size: int = 2000, times: int = 1000) -> bytes:
    """A progressive JPEG whose last scan is repeated ``times`` times, the repeats behind TEM markers
    (``FF 01``: libjpeg reads no length there; a walker that reads one skips 65,498 bytes), with runs of
    ``FF`` fill bytes lining up the next TEM. libjpeg decodes every repeat: 7 s at 2000 px and 1,000 times."""
    data = encoded(Image.new('RGB', (size, size), (120, 80, 40)), 'JPEG', progressive=True)
    last, end = data.rfind(b'\xff\xda'), data.rfind(b'\xff\xd9')
    scan = data[last:end]
    per_block = (65500 - 2) // len(scan)
    parts, left = [data[:end]], times - 1
    while left > 0:
        block = b'\xff\x01' + scan * min(per_block, left)
        parts.append(block + b'\xff' * (65500 - len(block) + 1))
        left -= min(per_block, left)
    return b''.join(parts) + data[end:]


def blp_holding(jpeg: bytes, width: int, height: int) -> bytes:
    """A BLP1 texture (Pillow recognises it by content, whatever the file's name) whose pixels are the JPEG
    stream ``jpeg``, its header saying ``width`` x ``height`` whatever the JPEG's own size and scans."""
    header = b'BLP1' + struct.pack('<iIII', 0, 0, width, height) + struct.pack('<i', 5) + bytes(4)
    offsets, lengths = [28 + 128 + 4] + [0] * 15, [len(jpeg)] + [0] * 15
    return header + struct.pack('<16I', *offsets) + struct.pack('<16I', *lengths) + struct.pack('<I', 0) + jpeg


def tiff_in_one_tile(tile: int, size: int = 16, tile_type: int = 4) -> bytes:
    """A ``size`` x ``size`` RGB TIFF stored as one deflated tile of ``tile`` x ``tile`` zero pixels
    (libtiff inflates the whole tile: 20000 px took 1.2 GB and 14 s for a 16x16 image). ``tile_type``: the
    TIFF type of TileWidth and TileLength; libtiff reads the 64-bit ones (16-18), Pillow skips them."""
    packer, parts = zlib.compressobj(1), []
    row = bytes(3 * tile * 256)
    for start in range(0, tile, 256):
        parts.append(packer.compress(row[:3 * tile * min(256, tile - start)]))
    pixels = b''.join(parts) + packer.flush()
    tags = [(256, 3, 1, size), (257, 3, 1, size), (258, 3, 3, None), (259, 3, 1, 8), (262, 3, 1, 2),
            (277, 3, 1, 3), (284, 3, 1, 1), (322, tile_type, 1, tile), (323, tile_type, 1, tile), (324, 4, 1, None),
            (325, 4, 1, len(pixels))]
    directory = 8
    extra = directory + 2 + 12 * len(tags) + 4  # BitsPerSample's three values, the tile size as 8 bytes, the tile
    data_at = extra + 6 + 8
    entries = b''
    for tag, kind, count, value in tags:
        value = {258: extra, 324: data_at}.get(tag, value)
        if kind >= 16:  # 8 bytes: stored after BitsPerSample, the entry holding where
            value = extra + 6
        packed = struct.pack('<H', value) + bytes(2) if kind == 3 and count == 1 else struct.pack('<I', value)
        entries += struct.pack('<HHI', tag, kind, count) + packed
    return (b'II*\x00' + struct.pack('<I', directory) + struct.pack('<H', len(tags)) + entries + bytes(4)
            + struct.pack('<3H', 8, 8, 8) + struct.pack('<Q', tile) + pixels)


def jpeg_with_exif_segments(count: int, size: int = 8) -> bytes:
    """A 64x64 JPEG behind ``count`` APP1 Exif segments of ``size`` bytes: Pillow joins them with ``bytes +=``
    inside Image.open (quadratic: 100,000 of 8 bytes, a 1.8 MB file, took 18 s)."""
    segment = b'\xff\xe1' + struct.pack('>H', 2 + 6 + size) + b'Exif\0\0' + bytes(size)
    data = encoded(Image.new('RGB', (64, 64), (120, 30, 200)))
    return data[:2] + segment * count + data[2:]


def camera_jpeg(photo: Image.Image) -> bytes:
    """``photo`` as a phone writes it: progressive, one Exif segment (rotated: orientation 6), XMP, a 300 KB
    ICC profile (5 APP2 chunks) and 5 MB of extended XMP (a depth map: 80 APP1 chunks of 64 KB)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encoded(photo, exif=exif, icc_profile=bytes(300_000), xmp=b'<x:xmpmeta/>', progressive=True)
    chunk = b'http://ns.adobe.com/xmp/extension/\0' + b'0' * 40 + b'x' * 65000
    extended = (b'\xff\xe1' + struct.pack('>H', 2 + len(chunk)) + chunk) * 80
    return data[:2] + extended + data[2:]
