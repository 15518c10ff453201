"""The one guarded image reader: headers read first, oversized images refused before decoding,
normal images read exactly, anything else a clear BadInput."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from modelkiln.errors import BadInput, PayloadTooLarge
from modelkiln.zoo import images
from modelkiln.zoo.images import MAX_IMAGE_PIXELS, decode_image, read_header, read_image

HUGE = 50_000  # 2.5 GP: ~7.5 GB once decoded as BGR


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG (valid CRCs, one tiny compressed row) whose IHDR claims width x height."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = zlib.compress(b"\x00" + b"\x00" * 3)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", row) + _chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int) -> bytes:
    """SOI, an APP0 segment to skip, then a baseline frame header claiming width x height."""
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    sof = (
        b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3) + b"\x01\x11\x00\x02\x11\x01\x03\x11\x01"
    )
    return b"\xff\xd8" + app0 + sof + b"\xff\xd9"


def bmp_claiming(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, -height, 1, 24, 0, 0, 0, 0, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info), 0, 0, 14 + len(info)) + info


def webp_vp8x_claiming(width: int, height: int) -> bytes:
    body = b"\x00\x00\x00\x00" + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    chunk = b"VP8X" + struct.pack("<I", len(body)) + body
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def tiff_claiming(width: int, height: int, big_endian: bool = False) -> bytes:
    o = ">" if big_endian else "<"
    entries = struct.pack(o + "HHI", 256, 4, 1) + struct.pack(o + "I", width)
    entries += struct.pack(o + "HHI", 257, 4, 1) + struct.pack(o + "I", height)
    head = (b"MM\x00*" if big_endian else b"II*\x00") + struct.pack(o + "I", 8)
    return head + struct.pack(o + "H", 2) + entries + struct.pack(o + "I", 0)


CLAIMS = {
    "png": png_claiming,
    "jpeg": jpeg_claiming,
    "bmp": bmp_claiming,
    "webp": webp_vp8x_claiming,
    "tiff": tiff_claiming,
}


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any call into OpenCV's decoder fails the test: refusals must come from the header alone."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("cv2.imdecode was called")

    monkeypatch.setattr(images.cv2, "imdecode", refuse)


@pytest.mark.parametrize("kind", sorted(CLAIMS))
def test_headers_are_read_without_decoding(kind: str) -> None:
    header = read_header(CLAIMS[kind](1234, 567), "x")
    assert (header.format, header.width, header.height) == (kind, 1234, 567)


def test_over_limit_png_is_refused_before_decoding(tmp_path: Path, no_decoding: None) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_claiming(HUGE, HUGE))
    assert path.stat().st_size < 100  # a few bytes claiming 2.5 gigapixels
    with pytest.raises(PayloadTooLarge, match=rf"{HUGE}x{HUGE} pixels; the limit is {MAX_IMAGE_PIXELS}"):
        read_image(path)
    assert issubclass(PayloadTooLarge, BadInput)  # the CLI prints it as one line


@pytest.mark.parametrize("kind", sorted(CLAIMS))
def test_every_format_is_guarded(kind: str, no_decoding: None) -> None:
    with pytest.raises(PayloadTooLarge, match=f"{HUGE}x{HUGE}"):
        decode_image(CLAIMS[kind](HUGE, HUGE), f"bomb.{kind}")


def test_the_limit_is_a_parameter(tmp_path: Path) -> None:
    path = tmp_path / "small.png"
    cv2.imwrite(str(path), np.zeros((20, 30, 3), np.uint8))
    with pytest.raises(PayloadTooLarge, match="30x20 pixels; the limit is 100 pixels"):
        read_image(path, max_pixels=100)
    assert read_image(path, max_pixels=600).shape == (20, 30, 3)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".webp", ".tiff"])
def test_normal_images_read_as_opencv_reads_them(tmp_path: Path, suffix: str) -> None:
    image = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    path = tmp_path / f"img{suffix}"
    assert cv2.imwrite(str(path), image)
    got = read_image(path)
    np.testing.assert_array_equal(got, cv2.imread(str(path), cv2.IMREAD_COLOR))
    if suffix in (".png", ".bmp", ".tiff"):  # lossless
        np.testing.assert_array_equal(got, image)
    np.testing.assert_array_equal(read_image(path, rgb=True), got[:, :, ::-1])


def test_pillow_written_jpeg_with_exif_and_big_endian_tiff(tmp_path: Path) -> None:
    pil = pytest.importorskip("PIL.Image")
    picture = pil.fromarray(np.full((21, 34, 3), 90, np.uint8))
    exif = pil.Exif()
    exif[0x010E] = "a description long enough to matter " * 20
    picture.save(tmp_path / "exif.jpg", exif=exif.tobytes())
    assert read_image(tmp_path / "exif.jpg").shape == (21, 34, 3)
    assert read_header(tiff_claiming(34, 21, big_endian=True), "be.tif").width == 34


@pytest.mark.parametrize(
    "data",
    [
        b"not a jpeg",
        b"GIF89a\x10\x00\x10\x00",  # a real format we do not accept
        png_claiming(10, 10)[:20],  # cut inside IHDR
        b"\xff\xd8\xff\xda\x00\x02",  # scan before any frame header
        b"",
    ],
)
def test_unsupported_or_cut_images_are_a_clear_bad_input(data: bytes) -> None:
    with pytest.raises(BadInput, match="cannot decode image x.bin"):
        decode_image(data, "x.bin")


def test_zero_sized_and_missing_images(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="declares 0x7 pixels"):
        read_header(png_claiming(0, 7), "zero.png")
    with pytest.raises(BadInput, match="image not found"):
        read_image(tmp_path / "nope.png")


def test_corrupt_body_behind_a_good_header_is_a_bad_input() -> None:
    data = png_claiming(64, 64)  # the one IDAT row is far too short for 64x64
    with pytest.raises(BadInput, match="cannot decode image"):
        decode_image(data, "short.png")
