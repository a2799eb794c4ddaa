"""Image files built to make decoding expensive while looking small (the hostile reviews' attacks), shared by
the in-process decoder tests and the tests that give them to the commands and the service."""
from __future__ import annotations

import functools
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


@functools.lru_cache(maxsize=4)
def deflated_zeros(size: int) -> bytes:
    """``size`` zero bytes deflated (made once per size: the tests make the same large tile several times)."""
    packer, parts, block = zlib.compressobj(1), [], bytes(2**20)
    for start in range(0, size, len(block)):
        parts.append(packer.compress(block[:min(len(block), size - start)]))
    return b''.join(parts) + packer.flush()


def tiff_in_one_tile(tile: int, size: int = 16, tile_type: int = 4) -> bytes:
    """A ``size`` x ``size`` RGB TIFF stored as one deflated tile of ``tile`` x ``tile`` zero pixels
    (libtiff inflates the whole tile: 20000 px took 1.2 GB and 14 s for a 16x16 image). ``tile_type``: the
    TIFF type of TileWidth and TileLength; libtiff reads the 64-bit ones (16-18), Pillow skips them."""
    pixels = deflated_zeros(3 * tile * tile)
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


def png_with_chunks(count: int, kind: bytes = b'prIv') -> bytes:
    """A 16x16 PNG with ``count`` empty chunks of ``kind`` after its header (12 bytes each; Pillow reads each in a
    Python loop turn: 2.8 M in a 33 MB file took 11 CPU-s; empty IDATs go the same way while decoding)."""
    data = encoded(Image.new('RGB', (16, 16), (10, 20, 30)), 'PNG')
    chunk = struct.pack('>I', 0) + kind + struct.pack('>I', zlib.crc32(kind))
    return data[:33] + chunk * count + data[33:]  # after the signature and IHDR


def gif_with_comments(count: int) -> bytes:
    """A 16x16 GIF behind ``count`` comment extensions of one 1-byte sub-block (Pillow keeps each sub-block in a
    list: 6.7 M in a 33 MB file took 4.8 CPU-s and 1.2 GB)."""
    data = encoded(Image.new('P', (16, 16), 3), 'GIF')
    image = data.index(b'\x2c')  # the image descriptor
    return data[:image] + b'\x21\xfe\x01c\x00' * count + data[image:]


def tiff_with_counts(strips: int = 1, resolutions: int = 1, resolution_tag: int = 282) -> bytes:
    """A 16x16 grey TIFF listing ``strips`` strips (all the same 256 pixel bytes; Pillow decodes each listed one:
    4.1 M took 40 CPU-s) and an XResolution of ``resolutions`` rationals (Pillow makes each a Python object at
    open: 4.1 M took 14.5 CPU-s), or those rationals under ``resolution_tag`` (Orientation's 274: 30 CPU-s)."""
    tags = [(256, 3, 1), (257, 3, 1), (258, 3, 1), (259, 3, 1), (262, 3, 1), (273, 4, strips), (277, 3, 1),
            (278, 3, 1), (279, 4, strips), (resolution_tag, 5, resolutions), (283, 5, 1), (296, 3, 1)]
    pixels_at = 8 + 2 + 12 * len(tags) + 4
    offsets_at = pixels_at + 256
    listed = 4 * strips if strips > 1 else 0  # one strip's offset and size are held in their entries
    counts_at = offsets_at + listed
    rationals_at = counts_at + listed
    inline = {256: 16, 257: 16, 258: 8, 259: 1, 262: 1, 277: 1, 278: 16 // min(strips, 16), 296: 2,
              273: pixels_at if strips == 1 else offsets_at, 279: 256 // min(strips, 16) if strips == 1 else counts_at,
              resolution_tag: rationals_at, 283: rationals_at}
    entries = b''.join(struct.pack('<HHI', tag, kind, count)
                       + (struct.pack('<HH', inline[tag], 0) if kind == 3 else struct.pack('<I', inline[tag]))
                       for tag, kind, count in tags)
    per_strip = 256 // min(strips, 16)
    return (b'II*\x00' + struct.pack('<IH', 8, len(tags)) + entries + bytes(4) + bytes(range(256))
            + (struct.pack(f'<{strips}I', *[pixels_at + i % 16 * per_strip for i in range(strips)]) if strips > 1 else b'')
            + (struct.pack(f'<{strips}I', *[per_strip] * strips) if strips > 1 else b'')
            + struct.pack('<2I', 72, 1) * resolutions)


def tiff_of_jpeg(scans_repeated: int, size: int = 64, listed: int = 1) -> bytes:
    """A size x size RGB TIFF of JPEG compression (7) in one strip: a progressive JPEG (10 scans) whose last scan
    is repeated ``scans_repeated`` more times (libtiff stops at 100 scans only: 99 at 9000x9000 in 961 KB took
    9.4 CPU-s), listed ``listed`` times at offsets one byte apart, each as long as the strip (overlapping)."""
    jpeg = encoded(Image.new('RGB', (size, size), (120, 80, 40)), 'JPEG', progressive=True, subsampling=0)
    last, end = jpeg.rfind(b'\xff\xda'), jpeg.rfind(b'\xff\xd9')
    strip = jpeg[:end] + jpeg[last:end] * scans_repeated + jpeg[end:]
    strip_at = 8 + 6  # after the header and BitsPerSample's three values
    arrays_at = strip_at + len(strip)
    arrays = struct.pack(f'<{listed}I', *range(strip_at, strip_at + listed)) + struct.pack(f'<{listed}I', *[len(strip)] * listed)
    tags = [(256, 3, 1, size), (257, 3, 1, size), (258, 3, 3, 8), (259, 3, 1, 7), (262, 3, 1, 2),
            (273, 4, listed, strip_at if listed == 1 else arrays_at), (277, 3, 1, 3), (278, 3, 1, size),
            (279, 4, listed, len(strip) if listed == 1 else arrays_at + 4 * listed), (284, 3, 1, 1)]
    entries = b''.join(struct.pack('<HHI', tag, kind, count) + (struct.pack('<HH', value, 0) if kind == 3 and count == 1
                                                               else struct.pack('<I', value))
                       for tag, kind, count, value in tags)
    directory_at = arrays_at + (len(arrays) if listed > 1 else 0)
    return (b'II*\x00' + struct.pack('<I', directory_at) + struct.pack('<3H', 8, 8, 8) + strip
            + (arrays if listed > 1 else b'') + struct.pack('<H', len(tags)) + entries + bytes(4))


def png_with_exif(rationals: int, orientation: int = 6) -> bytes:
    """A 16x8 PNG whose eXIf chunk holds Orientation ``orientation`` and a tag of ``rationals`` RATIONAL values
    (``ImageOps.exif_transpose`` re-packed all of them: 4.1 M, a 33 MB file, took 53 CPU-s and 1.35 GB)."""
    exif = (b'II*\x00' + struct.pack('<IH', 8, 2) + struct.pack('<HHIHH', 0x0112, 3, 1, orientation, 0)
            + struct.pack('<HHII', 65000, 5, rationals, 8 + 2 + 24 + 4) + bytes(4) + struct.pack('<2I', 1, 3) * rationals)
    return encoded(Image.new('RGB', (16, 8), (200, 10, 10)), 'PNG', exif=exif)


def jpeg_with_sof_segments(count: int, size: int = 65535) -> bytes:
    """A 64x64 JPEG behind ``count`` SOF0 segments padded to ``size`` bytes (Pillow loops over every 3 bytes of
    each in Python: 250 of 64 KB took 3 CPU-s and 523 MB)."""
    segment = b'\xff\xc0' + struct.pack('>HBHHB', size, 8, 64, 64, 1) + bytes(size - 8)
    data = encoded(Image.new('RGB', (64, 64), (1, 2, 3)))
    return data[:2] + segment * count + data[2:]


def bmp_rle(width: int, height: int) -> bytes:
    """An 8-bit run-length encoded (RLE8) BMP of ``width`` x ``height``, each row one pixel then end of line:
    tiny, but Pillow decodes it pixel by pixel in Python (9000 x 9000 in 37 KB: 20 CPU-s)."""
    palette = b''.join(bytes((i, i, i, 0)) for i in range(256))
    pixels = b'\x01\x07\x00\x00' * height + b'\x00\x01'  # a run of one pixel of colour 7, end of line; end
    offset = 14 + 40 + len(palette)
    return (b'BM' + struct.pack('<IHHI', offset + len(pixels), 0, 0, offset)
            + struct.pack('<IiiHHIIiiII', 40, width, height, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
            + palette + pixels)


def gif_of_dots(width: int, height: int, frames: int, delay_cs: int = 100) -> bytes:
    """A GIF of a ``width`` x ``height`` canvas whose ``frames`` frames are one pixel each (23 bytes a frame),
    each shown ``delay_cs`` hundredths of a second: FFmpeg decodes every frame as the whole canvas (round 14:
    9000 x 9000, 5 frames, 2,320 bytes -> 1,159 MB of full-size frames from ``towhee_frames``)."""
    out = bytearray(b'GIF89a' + struct.pack('<HHBBB', width, height, 0xF0, 0, 0) + bytes([0, 0, 0, 255, 255, 255]))
    for i in range(frames):
        out += b'\x21\xf9\x04' + struct.pack('<BHB', 0x04, delay_cs, 0) + b'\x00'  # graphic control: keep, the delay
        out += b'\x2c' + struct.pack('<HHHHB', i * 7 % width, i * 13 % height, 1, 1, 0)  # a 1x1 image at a moving spot
        out += bytes([2, 2, 4 | (i % 2) << 3 | 1 << 6, 1, 0])  # LZW, 2-bit codes: clear, the pixel, end
    return bytes(out + b'\x3b')
