"""Image dimensions from the encoded header alone, before any pixel is decoded.

A few kilobytes of PNG can declare 50 000 x 50 000 pixels, and a decoder allocates for what the
header says; reading the header first lets ``images.decode_image`` refuse such files before
OpenCV sees them. Plain ``struct`` reads of the formats we accept (PNG, JPEG, BMP, WebP, TIFF),
so the guard needs no Pillow; every read is bounds-checked and anything unparsable is refused.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from modelkiln.errors import BadInput

_PNG = b"\x89PNG\r\n\x1a\n"
#: JPEG start-of-frame markers (C4 DHT, C8 JPG and CC DAC share the range but are not frames).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
#: JPEG markers without a length field.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
_TIFF_WIDTH, _TIFF_HEIGHT = 256, 257


@dataclass(frozen=True)
class ImageHeader:
    """What an encoded image declares: its format (as in ``images.FORMATS``) and pixel size."""

    format: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


class _Truncated(Exception):
    """A read past the end of the data: the header is cut short."""


def _unpack(fmt: str, data: bytes, offset: int) -> tuple[int, ...]:
    if offset < 0 or offset + struct.calcsize(fmt) > len(data):
        raise _Truncated
    return struct.unpack_from(fmt, data, offset)


def read_header(data: bytes, source: str) -> ImageHeader:
    """The format and size ``data`` declares; BadInput naming ``source`` when it is not one of our
    formats, is cut short, or declares no pixels."""
    try:
        header = _sniff(data)
    except (_Truncated, struct.error):
        header = None
    if header is None:
        raise BadInput(f"cannot decode image {source}: not a supported image format or corrupt")
    if header.width < 1 or header.height < 1:
        raise BadInput(f"image {source} declares {header.width}x{header.height} pixels")
    return header


def _sniff(data: bytes) -> ImageHeader | None:
    if data.startswith(_PNG):
        return _png(data)
    if data.startswith(b"\xff\xd8"):
        return _jpeg(data)
    if data.startswith(b"BM"):
        return _bmp(data)
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return _webp(data)
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return _tiff(data)
    return None


def _png(data: bytes) -> ImageHeader | None:
    if data[12:16] != b"IHDR":
        return None
    width, height = _unpack(">II", data, 16)
    return ImageHeader("png", width, height)


def _jpeg(data: bytes) -> ImageHeader | None:
    """Walk the marker segments to the first start-of-frame (skipping APPn, EXIF thumbnails…)."""
    i = 2
    while True:
        if _unpack("B", data, i)[0] != 0xFF:
            return None
        while _unpack("B", data, i)[0] == 0xFF:  # fill bytes before a marker
            i += 1
        marker = data[i]
        i += 1
        if marker in _JPEG_STANDALONE:
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        (length,) = _unpack(">H", data, i)
        if length < 2:
            return None
        if marker in _JPEG_SOF:
            height, width = _unpack(">HH", data, i + 3)
            return ImageHeader("jpeg", width, height)
        i += length


def _bmp(data: bytes) -> ImageHeader:
    (info_size,) = _unpack("<I", data, 14)
    if info_size == 12:  # OS/2 BITMAPCOREHEADER: unsigned 16-bit sizes
        width, height = _unpack("<HH", data, 18)
    else:  # BITMAPINFOHEADER and later: signed, a negative height means top-down rows
        width, height = _unpack("<ii", data, 18)
        height = abs(height)
    return ImageHeader("bmp", width, height)


def _webp(data: bytes) -> ImageHeader | None:
    chunk = data[12:16]
    if chunk == b"VP8 ":  # lossy: 14-bit sizes after the key-frame start code
        if data[23:26] != b"\x9d\x01\x2a":
            return None
        width, height = _unpack("<HH", data, 26)
        return ImageHeader("webp", width & 0x3FFF, height & 0x3FFF)
    if chunk == b"VP8L":  # lossless: signature 0x2f, then 14-bit width-1 and height-1
        if _unpack("B", data, 20)[0] != 0x2F:
            return None
        (bits,) = _unpack("<I", data, 21)
        return ImageHeader("webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8X":  # extended: 24-bit canvas width-1 and height-1
        _unpack("6B", data, 24)
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return ImageHeader("webp", width, height)
    return None


def _tiff(data: bytes) -> ImageHeader | None:
    """Width and height tags of the first image directory (the page OpenCV decodes)."""
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")
    if big:  # BigTIFF: 8-byte offsets and counts, 20-byte entries
        (offset,) = _unpack(order + "Q", data, 8)
        (count,) = _unpack(order + "Q", data, offset)
        first, size, value_at = offset + 8, 20, 12
    else:
        (offset,) = _unpack(order + "I", data, 4)
        (count,) = _unpack(order + "H", data, offset)
        first, size, value_at = offset + 2, 12, 8
    found: dict[int, int] = {}
    for k in range(min(count, 4096)):
        entry = first + k * size
        tag, kind = _unpack(order + "HH", data, entry)
        if tag not in (_TIFF_WIDTH, _TIFF_HEIGHT):
            continue
        value = {3: "H", 4: "I", 16: "Q"}.get(kind)  # SHORT, LONG, LONG8 (BigTIFF)
        if value is None:
            return None
        found[tag] = _unpack(order + value, data, entry + value_at)[0]
    if len(found) != 2:
        return None
    return ImageHeader("tiff", found[_TIFF_WIDTH], found[_TIFF_HEIGHT])
