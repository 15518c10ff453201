"""``genai.json``: what an exported chat-model folder holds and how to run it (context, stop
tokens, the file of each graph, what the vision encoder is fed). Written by the export of a Qwen-VL family, read by
the chat model, ``kiln deploy`` and the server; one dataclass so every reader agrees on the keys and
a broken file is refused with the key and the file named.

Two forms of the vision part: today's, one encoder for any image size (``"vision": "vision.onnx"``
and ``"vision_config"``: family, patch, merge, window, what ``export.builder.vision.vision_feed``
needs), and the older one graph per fixed image bucket (``"buckets"`` and ``"vision"`` keyed
"HxW"), which folders exported before keep loading with."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelkiln.errors import ConfigError, ModelNotFound

#: The spec's file name inside an exported folder.
SPEC_FILE = "genai.json"

Bucket = tuple[int, int]  # (height, width) of an image bucket the vision encoder was exported for
#: What the one vision encoder of a folder is fed with, besides the pixels (``vision_config``).
VISION_KEYS = ("family", "patch", "merge", "window")


@dataclass(frozen=True)
class GenaiSpec:
    """An exported chat-model folder: the graphs (relative file names) and the facts to drive them."""

    model: str  # the zoo name (qwen2-vl-tiny, ...)
    context: int  # most tokens (prompt + answer) the decoder takes
    merge: int  # vision patches merged per image token, per side
    buckets: tuple[Bucket, ...]  # older folders: image sizes a vision graph exists for (else empty)
    image_token: int  # the token id image embeddings replace
    stop: tuple[int, ...]  # token ids that end an answer
    embed: str  # token embedding graph
    decoder: str  # decoder step graph (past/present KV cache)
    vision: Mapping[Bucket, str]  # older folders: vision encoder graph per bucket (else empty)
    encoder: str | None = None  # the one vision encoder for any image size
    vision_config: Mapping[str, Any] | None = None  # what ``encoder`` is fed with (VISION_KEYS)

    def __post_init__(self) -> None:
        if self.context < 1 or self.merge < 1:
            raise ConfigError(f"'context' and 'merge' must be >= 1, got {self.context}, {self.merge}")
        missing = [b for b in self.buckets if b not in self.vision]
        if missing:
            raise ConfigError(f"'vision' has no graph for the bucket(s) {missing}")
        if self.encoder is not None:
            if self.buckets or self.vision:
                raise ConfigError(
                    "one vision encoder for any size and per-bucket graphs: give one or the other"
                )
            absent = [k for k in VISION_KEYS if k not in (self.vision_config or {})]
            if absent:
                raise ConfigError(f"'vision_config' misses {absent}")
        elif not self.vision:
            raise ConfigError("'vision' names no vision encoder graph")

    def vision_graphs(self) -> list[str]:
        """The vision encoder graph(s): the one for any size, or one per bucket (older folders)."""
        return [self.encoder] if self.encoder is not None else list(self.vision.values())

    def graphs(self) -> list[str]:
        """Every graph file of the folder: embedding, decoder, then the vision encoder(s)."""
        return [self.embed, self.decoder, *self.vision_graphs()]

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (older folders: buckets as [h, w] lists, vision keyed "HxW")."""
        head = {"model": self.model, "context": self.context, "merge": self.merge}
        tail = {
            "image_token": self.image_token,
            "stop": sorted(self.stop),
            "embed": self.embed,
            "decoder": self.decoder,
        }
        if self.encoder is not None:
            return {**head, **tail, "vision": self.encoder, "vision_config": dict(self.vision_config or {})}
        return {
            **head,
            "buckets": [list(b) for b in self.buckets],
            **tail,
            "vision": {f"{h}x{w}": f for (h, w), f in self.vision.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = SPEC_FILE) -> GenaiSpec:
        """Parse the JSON form; ConfigError names the missing or invalid key and ``source``."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        reader = _Reader(data, source)
        if isinstance(data.get("vision"), str):
            return cls._any_size(reader, source)
        vision = {
            _bucket(_parse_bucket(k, f"{source}: 'vision'"), f"{source}: 'vision'"): _text(
                f, f"{source}: 'vision.{k}'"
            )
            for k, f in reader.mapping("vision").items()
        }
        try:
            return cls(
                model=reader.text("model"),
                context=reader.integer("context"),
                merge=reader.integer("merge"),
                buckets=tuple(_bucket(b, f"{source}: 'buckets'") for b in reader.sequence("buckets")),
                image_token=reader.integer("image_token"),
                stop=tuple(_integer(s, f"{source}: 'stop'") for s in reader.sequence("stop")),
                embed=reader.text("embed"),
                decoder=reader.text("decoder"),
                vision=vision,
            )
        except ConfigError as exc:
            if str(exc).startswith(source):
                raise
            raise ConfigError(f"{source}: {exc}") from None  # a check across keys: name the file too

    @classmethod
    def _any_size(cls, reader: _Reader, source: str) -> GenaiSpec:
        config = reader.mapping("vision_config")
        for key in VISION_KEYS:
            if key == "family":
                _text(config.get(key), f"{source}: 'vision_config.{key}'")
            else:
                _integer(config.get(key), f"{source}: 'vision_config.{key}'")
        try:
            return cls(
                model=reader.text("model"),
                context=reader.integer("context"),
                merge=reader.integer("merge"),
                buckets=(),
                image_token=reader.integer("image_token"),
                stop=tuple(_integer(s, f"{source}: 'stop'") for s in reader.sequence("stop")),
                embed=reader.text("embed"),
                decoder=reader.text("decoder"),
                vision={},
                encoder=reader.text("vision"),
                vision_config=dict(config),
            )
        except ConfigError as exc:
            if str(exc).startswith(source):
                raise
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> GenaiSpec:
        """The spec of an exported folder (or of the ``genai.json`` file itself)."""
        path = Path(path)
        file = path / SPEC_FILE if path.is_dir() else path
        if not file.is_file():
            raise ModelNotFound(f"{file} not found: not a folder written by `kiln export` for a chat model")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{file}: not valid JSON ({exc})") from exc
        return cls.from_dict(data, str(file))

    def save(self, path: str | Path) -> Path:
        """Write ``genai.json`` into the folder ``path`` (or to ``path`` when it names a .json file)."""
        path = Path(path)
        file = path if path.suffix == ".json" else path / SPEC_FILE
        file.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return file


class _Reader:
    """Typed reads of the keys of one JSON object, every error naming the key and the file."""

    def __init__(self, data: Mapping[str, Any], source: str) -> None:
        self.data, self.source = data, source

    def _get(self, key: str) -> Any:
        if key not in self.data:
            raise ConfigError(f"{self.source}: missing key '{key}'")
        return self.data[key]

    def text(self, key: str) -> str:
        return _text(self._get(key), f"{self.source}: '{key}'")

    def integer(self, key: str) -> int:
        return _integer(self._get(key), f"{self.source}: '{key}'")

    def sequence(self, key: str) -> list[Any]:
        value = self._get(key)
        if not isinstance(value, list):
            raise ConfigError(f"{self.source}: '{key}' must be a list, got {value!r}")
        return value

    def mapping(self, key: str) -> dict[str, Any]:
        value = self._get(key)
        if not isinstance(value, dict):
            raise ConfigError(f"{self.source}: '{key}' must be an object, got {value!r}")
        return value


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be a non-empty string, got {value!r}")
    return value


def _integer(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    return value


def _bucket(value: Any, where: str) -> Bucket:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ConfigError(f"{where}: a bucket is [height, width] in pixels, got {value!r}")
    return int(value[0]), int(value[1])


def _parse_bucket(key: str, where: str) -> list[int]:
    try:
        return [int(v) for v in key.split("x")]
    except ValueError:
        raise ConfigError(f"{where}: keys are HEIGHTxWIDTH, got {key!r}") from None
