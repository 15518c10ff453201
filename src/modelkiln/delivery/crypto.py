"""AES-256-GCM encrypted model files, decrypted in memory only.

File format (version 1; all integers little-endian)::

    offset  size  field
    0       8     magic  b"\\x89KILNENC"
    8       2     format version, uint16 = 1
    10      4     header length H, uint32 (at most 65536)
    14      H     header: UTF-8 JSON object
                    "alg":  "AES-256-GCM"
                    "name": the original file name (e.g. "model.onnx")
                    "size": the original size in bytes (= the ciphertext's length)
                    "key_id": 16 hex digits, SHA-256("modelkiln model key id" NUL key)[:8]:
                              tells keys apart, reveals nothing usable about the key
                    "external_data": model files only: the external-data files the model refers
                              to (ONNX ``location``s), each stored beside it as "<location>.enc"
    14+H    12    nonce (random per file)
    26+H    size  ciphertext
    26+H+size 16  GCM tag

The additional authenticated data is bytes ``0 .. 14+H`` (magic, version, length and header), so
a changed byte anywhere, header included, fails authentication. One key may encrypt up to 2^32
files (random 96-bit nonces). Any AES-GCM implementation reads it: split the file as above and
decrypt with key, nonce, AAD and tag (tests/delivery decrypt one with wolfSSL).

Keys: 32 bytes, in a file as the raw 32 bytes, 64 hex digits, or base64 of the 32 bytes
(surrounding whitespace ignored), or in the environment: ``KILN_MODEL_KEY_FILE`` (a path) or
``KILN_MODEL_KEY`` (hex or base64). Keys never appear in messages, logs or reprs: only the key id.

External-data weights (``model.onnx.data``) are encrypted as ``model.onnx.data.enc``; loading
decrypts both into memory and copies the weights into the in-memory ModelProto's initializers
(``load_encrypted_model``), which ONNX Runtime loads from bytes. A ModelProto cannot exceed 2 GB
(protobuf's limit), so larger encrypted models are refused with a message saying so (ONNX
Runtime's ``SessionOptions.add_external_initializers_from_files_in_memory`` is the way past it).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import mmap
import os
import stat
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from modelkiln.delivery.errors import DecryptError, DeliveryError, KeyFileError
from modelkiln.delivery.signing import write_secret
from modelkiln.onnx_io import graph_tensors

log = logging.getLogger(__name__)

MAGIC = b"\x89KILNENC"
VERSION = 1
ALGORITHM = "AES-256-GCM"
ENC_SUFFIX = ".enc"
KEY_FILE_ENV = "KILN_MODEL_KEY_FILE"
KEY_ENV = "KILN_MODEL_KEY"
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
MAX_HEADER = 1 << 16
PROTOBUF_LIMIT = (1 << 31) - 1
_PREFIX = struct.Struct("<8sHI")
_CHUNK = 16 << 20
_ONE_SHOT = (1 << 31) - 1 - TAG_BYTES  # cryptography's AEAD calls take at most 2**31 - 1 bytes
_KEY_ID_CONTEXT = b"modelkiln model key id\0"


@dataclass(frozen=True)
class ModelKey:
    """A 32-byte AES key; its repr shows only the key id, so it cannot leak through logs."""

    secret: bytes = field(repr=False)
    source: str = field(default="key", compare=False)

    def __post_init__(self) -> None:
        if len(self.secret) != KEY_BYTES:
            raise KeyFileError(f"{self.source}: a model key has {KEY_BYTES} bytes, got {len(self.secret)}")

    @property
    def key_id(self) -> str:
        return hashlib.sha256(_KEY_ID_CONTEXT + self.secret).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"ModelKey(id={self.key_id}, source={self.source!r})"

    __str__ = __repr__


def parse_key(data: bytes, source: str) -> ModelKey:
    """A key from 32 raw bytes, 64 hex digits or base64 of 32 bytes (whitespace around ignored).
    Errors name ``source`` and the length found, never the content."""
    if len(data) == KEY_BYTES:
        return ModelKey(bytes(data), source)
    text = data.strip()
    if len(text) == 2 * KEY_BYTES:
        try:
            return ModelKey(binascii.unhexlify(text), source)
        except (binascii.Error, ValueError):
            pass
    for decode in (base64.b64decode, base64.urlsafe_b64decode):
        try:
            raw = decode(text + b"=" * (-len(text) % 4))
        except (binascii.Error, ValueError):
            continue
        if len(raw) == KEY_BYTES:
            return ModelKey(raw, source)
    raise KeyFileError(
        f"{source}: not a model key (expected {KEY_BYTES} raw bytes, {2 * KEY_BYTES} hex digits or base64 "
        f"of {KEY_BYTES} bytes; found {len(data)} bytes)"
    )


def load_key(path: Path) -> ModelKey:
    """The key in file ``path``; warns when others than its owner may read it."""
    path = Path(path)
    try:
        data = path.read_bytes()
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise KeyFileError(f"model key file not found: {path}") from None
    except OSError as exc:
        raise KeyFileError(f"model key file {path}: {exc.strerror}") from None
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("model key file %s is readable by others than its owner: chmod 600 it", path)
    return parse_key(data, str(path))


def resolve_model_key(path: Path | None = None, environ: Mapping[str, str] | None = None) -> ModelKey | None:
    """The key to decrypt models with: ``path`` (--model-key), else the file named by
    ``KILN_MODEL_KEY_FILE``, else the value of ``KILN_MODEL_KEY``; None when none is given."""
    env = os.environ if environ is None else environ
    if path is not None:
        return load_key(path)
    if env.get(KEY_FILE_ENV):
        return load_key(Path(env[KEY_FILE_ENV]))
    if env.get(KEY_ENV):
        return parse_key(env[KEY_ENV].encode(), f"${KEY_ENV}")
    return None


def generate_model_key(path: Path, overwrite: bool = False) -> ModelKey:
    """Write a new random key to ``path`` as 64 hex digits (mode 0600)."""
    if path.exists() and not overwrite:
        raise KeyFileError(f"{path} exists; not overwriting a key")
    key = ModelKey(os.urandom(KEY_BYTES), str(path))
    write_secret(path, key.secret.hex().encode() + b"\n")
    return key


@dataclass(frozen=True)
class EncryptedHeader:
    """The authenticated, unencrypted header of an encrypted file."""

    name: str
    size: int
    key_id: str
    external_data: tuple[str, ...] = ()
    alg: str = ALGORITHM

    def to_bytes(self) -> bytes:
        body: dict[str, Any] = {"alg": self.alg, "name": self.name, "size": self.size, "key_id": self.key_id}
        if self.external_data:
            body["external_data"] = list(self.external_data)
        return json.dumps(body, separators=(",", ":")).encode()


def is_encrypted(path: Path) -> bool:
    """Whether ``path`` starts with our magic."""
    try:
        with Path(path).open("rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def encrypt_bytes(data: bytes, key: ModelKey, name: str, external_data: tuple[str, ...] = ()) -> bytes:
    """``data`` in our file format (module docstring), under a fresh random nonce."""
    header = EncryptedHeader(name, len(data), key.key_id, external_data).to_bytes()
    aad = _PREFIX.pack(MAGIC, VERSION, len(header)) + header
    nonce = os.urandom(NONCE_BYTES)
    if len(data) <= _ONE_SHOT:
        return b"".join((aad, nonce, AESGCM(key.secret).encrypt(nonce, data, aad)))
    enc = Cipher(algorithms.AES(key.secret), modes.GCM(nonce)).encryptor()
    enc.authenticate_additional_data(aad)
    view = memoryview(data)
    parts = [aad, nonce, *(enc.update(view[i : i + _CHUNK]) for i in range(0, len(data), _CHUNK))]
    parts.append(enc.finalize())
    parts.append(enc.tag)
    return b"".join(parts)


def encrypt_file(src: Path, dst: Path | None, key: ModelKey, external_data: tuple[str, ...] = ()) -> Path:
    """Encrypt ``src`` to ``dst`` (default ``<src>.enc``), written whole then renamed into place."""
    src = Path(src)
    dst = Path(dst) if dst is not None else src.with_name(src.name + ENC_SUFFIX)
    blob = encrypt_bytes(src.read_bytes(), key, src.name, external_data)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    tmp.write_bytes(blob)
    os.replace(tmp, dst)
    return dst


def external_locations(model: onnx.ModelProto) -> tuple[str, ...]:
    """The external-data files ``model``'s tensors refer to, in first-use order."""
    found: dict[str, None] = {}
    for t in graph_tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            found[_location(t)] = None
    return tuple(found)


def model_files(src: Path) -> list[Path]:
    """An ONNX model file and the external-data files it refers to."""
    src = Path(src)
    proto = _load_plain(src)
    return [src, *(src.parent / loc for loc in external_locations(proto))]


def _load_plain(src: Path) -> onnx.ModelProto:
    try:
        return onnx.load(os.fspath(src), load_external_data=False)
    except FileNotFoundError:
        raise DeliveryError(f"model file not found: {src}") from None
    except Exception as exc:
        raise DeliveryError(f"{src} is not an ONNX model: {type(exc).__name__}") from exc


def encrypt_model(src: Path, dst: Path | None, key: ModelKey) -> list[Path]:
    """Encrypt an ONNX model and its external-data files: ``dst`` (default ``<src>.enc``) and, per
    data file ``L`` the model refers to, ``<dst folder>/L.enc``. Returns the files written."""
    src = Path(src)
    dst = Path(dst) if dst is not None else src.with_name(src.name + ENC_SUFFIX)
    proto = _load_plain(src)
    locations = external_locations(proto)
    written = []
    for loc in locations:
        _check_location(loc, src)
        data = src.parent / loc
        if not data.is_file():
            raise DeliveryError(f"{src}: external data file '{loc}' not found beside it")
        target = dst.parent / (loc + ENC_SUFFIX)
        target.parent.mkdir(parents=True, exist_ok=True)
        written.append(encrypt_file(data, target, key))
    written.insert(0, encrypt_file(src, dst, key, locations))
    return written


def read_header(path: Path) -> EncryptedHeader:
    """The header of an encrypted file (no key needed)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            head = f.read(_PREFIX.size + MAX_HEADER)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise DecryptError(f"cannot decrypt {path}: no such file") from None
    except OSError as exc:
        raise DecryptError(f"cannot decrypt {path}: {exc.strerror}") from None
    header, _ = _split(path, head, size)
    return header


def decrypt_bytes(path: Path, key: ModelKey) -> bytes:
    """The plaintext of encrypted file ``path``, in memory only. One DecryptError for a wrong key,
    a changed byte or a file that is not ours; it names the file and key ids, never the key.

    The file is memory-mapped (read-only) and decrypted in one call, so the plaintext is the only
    copy made; files over 2 GB are decrypted in chunks."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            if os.fstat(f.fileno()).st_size < _PREFIX.size:
                raise DecryptError(f"cannot decrypt {path}: not a modelkiln encrypted file (too short)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return _decrypt(path, mm, key)
    except FileNotFoundError:
        raise DecryptError(f"cannot decrypt {path}: no such file") from None
    except OSError as exc:
        raise DecryptError(f"cannot decrypt {path}: {exc.strerror}") from None


def _decrypt(path: Path, mm: mmap.mmap, key: ModelKey) -> bytes:
    header, offset = _split(path, mm, len(mm))
    nonce = mm[offset : offset + NONCE_BYTES]
    view = memoryview(mm)
    try:
        aad, sealed = view[:offset], view[offset + NONCE_BYTES :]
        try:
            if header.size <= _ONE_SHOT:
                return AESGCM(key.secret).decrypt(nonce, sealed, aad)
            return _decrypt_chunked(key, nonce, aad, sealed, header.size)
        except InvalidTag:
            if header.key_id != key.key_id:
                reason = (
                    f"wrong key (the file names key id {header.key_id}; the key given is {key.key_id}) "
                    "or a changed file"
                )
            else:
                reason = "the file was changed after encryption (authentication failed)"
            raise DecryptError(f"cannot decrypt {path}: {reason}") from None
        finally:
            aad.release()
            sealed.release()
    finally:
        view.release()


def _decrypt_chunked(key: ModelKey, nonce: bytes, aad: memoryview, sealed: memoryview, size: int) -> bytes:
    """AES-GCM over data too large for one call (cryptography's AEAD API stops at 2 GB)."""
    dec = Cipher(algorithms.AES(key.secret), modes.GCM(nonce, bytes(sealed[size:]))).decryptor()
    dec.authenticate_additional_data(aad)
    parts = [dec.update(sealed[start : min(start + _CHUNK, size)]) for start in range(0, size, _CHUNK)]
    parts.append(dec.finalize())  # raises InvalidTag before anything is returned
    return b"".join(parts)


def _split(path: Path, blob: bytes | mmap.mmap, total: int) -> tuple[EncryptedHeader, int]:
    """The header and the offset of the nonce from the start of a file (``blob``, at least its
    prefix and header) of ``total`` bytes; DecryptError for anything not our format."""

    def bad(reason: str) -> DecryptError:
        return DecryptError(f"cannot decrypt {path}: {reason}")

    if len(blob) < _PREFIX.size or blob[: len(MAGIC)] != MAGIC:
        raise bad("not a modelkiln encrypted file (no magic)")
    _, version, hlen = _PREFIX.unpack_from(blob)
    if version != VERSION:
        raise bad(f"format version {version}; this modelkiln reads version {VERSION}")
    if hlen > MAX_HEADER or _PREFIX.size + hlen > min(len(blob), total):
        raise bad("the header length is damaged")
    try:
        h = json.loads(bytes(blob[_PREFIX.size : _PREFIX.size + hlen]).decode())
        header = EncryptedHeader(
            str(h["name"]),
            int(h["size"]),
            str(h["key_id"]),
            tuple(str(x) for x in h.get("external_data", [])),
            str(h["alg"]),
        )
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        raise bad("the header is damaged") from None
    if header.alg != ALGORITHM:
        raise bad(f"algorithm '{header.alg}'; this modelkiln reads {ALGORITHM}")
    offset = _PREFIX.size + hlen
    expected = offset + NONCE_BYTES + header.size + TAG_BYTES
    if header.size < 0 or expected != total:
        raise bad(f"truncated or extended (the header implies {expected} bytes, the file has {total})")
    return header, offset


# --- loading encrypted ONNX models -----------------------------------------------------------


def load_encrypted_model(path: Path, key: ModelKey) -> bytes | onnx.ModelProto:
    """An encrypted ONNX model ready for ``OrtBackend.load``: its bytes when it has no external
    data, else a ModelProto whose external initializers were filled from the decrypted
    ``<location>.enc`` files beside it. Nothing decrypted is written anywhere."""
    path = Path(path)
    header = read_header(path)
    data = decrypt_bytes(path, key)
    if not header.external_data:
        return data
    total = len(data) + sum(_size_of(path, loc) for loc in header.external_data)
    if total > PROTOBUF_LIMIT:
        raise DeliveryError(
            f"{path}: model and external data hold {total} bytes, over protobuf's 2 GB limit for one "
            "in-memory ModelProto; such encrypted models cannot be loaded from memory yet"
        )
    proto = onnx.load_from_string(data)
    blobs: dict[str, bytes] = {}
    for loc in header.external_data:
        _check_location(loc, path)
        blobs[loc] = decrypt_bytes(path.parent / (loc + ENC_SUFFIX), key)
    fold_external_data(proto, blobs, str(path))
    return proto


def model_source(path: Path, key: ModelKey | None) -> Path | bytes | onnx.ModelProto:
    """What to hand ``OrtBackend.load`` / ``load_backend`` for ``path``: the path of a plaintext
    model, or the in-memory model of an encrypted one (DecryptError without a key). A missing
    ``model.onnx`` whose ``model.onnx.enc`` is there opens the encrypted file."""
    path = Path(path)
    sealed = path.with_name(path.name + ENC_SUFFIX)
    if not path.exists() and sealed.is_file():  # a package whose models were encrypted at deploy
        path = sealed
    if not is_encrypted(path):
        return path
    if key is None:
        raise DecryptError(
            f"cannot decrypt {path}: it is encrypted; give --model-key F or set {KEY_FILE_ENV} / {KEY_ENV}"
        )
    return load_encrypted_model(path, key)


def _size_of(path: Path, loc: str) -> int:
    enc = path.parent / (loc + ENC_SUFFIX)
    try:
        return enc.stat().st_size
    except OSError:
        raise DecryptError(f"cannot decrypt {enc}: no such file (external data of {path})") from None


def fold_external_data(proto: onnx.ModelProto, blobs: Mapping[str, bytes], name: str) -> None:
    """Copy each external tensor's bytes from ``blobs`` (location -> file contents) into the tensor
    and mark it internal, as onnx.load does from files."""
    for t in graph_tensors(proto.graph):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = _location(t)
        blob = blobs.get(loc)
        if blob is None:
            raise DecryptError(
                f"cannot load {name}: tensor '{t.name}' refers to '{loc}', which was not decrypted"
            )
        offset = int(info.get("offset", "0"))
        length = int(info["length"]) if "length" in info else len(blob) - offset
        if offset < 0 or length < 0 or offset + length > len(blob):
            raise DecryptError(f"cannot load {name}: tensor '{t.name}' lies outside '{loc}'")
        t.raw_data = blob[offset : offset + length]
        del t.external_data[:]
        t.data_location = onnx.TensorProto.DEFAULT


def _location(t: onnx.TensorProto) -> str:
    return next((e.value for e in t.external_data if e.key == "location"), "")


def _check_location(loc: str, model: Path) -> None:
    parts = loc.replace("\\", "/").split("/")
    if not loc or os.path.isabs(loc) or any(p in ("", ".", "..") for p in parts):
        raise DeliveryError(f"{model}: external data location '{loc}' is not a file beside the model")
