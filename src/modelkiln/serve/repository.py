"""The model repository on disk: ``<repo>/<model>/config.yaml`` and ``<repo>/<model>/<version>/model.onnx``
(a pipeline has a config and no versions). Versions are positive integers; the newest is served
unless a request names another."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from modelkiln.delivery.crypto import ENC_SUFFIX
from modelkiln.errors import ConfigError, ModelNotFound
from modelkiln.genai.spec import SPEC_FILE
from modelkiln.serve.config import ModelConfig, load_config
from modelkiln.serve.guard import shown

log = logging.getLogger(__name__)
MODEL_FILE = "model.onnx"
ENCRYPTED_MODEL_FILE = MODEL_FILE + ENC_SUFFIX  # AES-256-GCM (kiln deploy --encrypt-key), opened in memory
GENAI_FILE = SPEC_FILE  # a generative model's version is a folder from kiln export
MAX_NAME_BYTES = 200  # a model name is one folder name; the OS refuses components over 255 bytes


@dataclass(frozen=True)
class RepoEntry:
    name: str
    config: ModelConfig
    versions: dict[int, Path]  # version -> model file, or folder for genai (empty for pipelines)

    @property
    def latest(self) -> int:
        return max(self.versions) if self.versions else 1


class Repository:
    """Reads a repository folder; every call rescans, so files added while serving are found."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ModelNotFound(f"model repository not found: {self.root}")

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if self.has(p.name))

    def has(self, name: str) -> bool:
        """Whether ``name`` is a model folder here (a name that cannot be one is never looked up)."""
        folder = self.root / name
        return (
            valid_name(name)
            and folder.is_dir()
            and ((folder / "config.yaml").is_file() or bool(_versions(folder)))
        )

    def entry(self, name: str) -> RepoEntry:
        if not self.has(name):  # the message names neither the repository path nor its models
            raise ModelNotFound(f"model {shown(name)} is not in the repository")
        folder = self.root / name
        config = load_config(folder / "config.yaml", name)
        if config.name != name:
            raise ConfigError(
                f"{folder / 'config.yaml'}: name '{config.name}' differs from its folder '{name}'"
            )
        versions = _versions(folder)
        if not versions and config.pipeline is None:
            raise ModelNotFound(f"model '{name}': no <version>/{MODEL_FILE} (or {GENAI_FILE}) under {folder}")
        return RepoEntry(name, config, versions)


def valid_name(name: str) -> bool:
    """A single path component the file system accepts: no separator, no leading dot, no NUL,
    at most MAX_NAME_BYTES bytes (longer names make the OS raise instead of answer 'no')."""
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return False
    return 0 < size <= MAX_NAME_BYTES and not name.startswith(".") and not any(c in name for c in "/\\\0")


def _versions(folder: Path) -> dict[int, Path]:
    found: dict[int, Path] = {}
    for sub in folder.iterdir():
        if not (sub.is_dir() and sub.name.isdigit() and int(sub.name) > 0):
            continue
        if (sub / MODEL_FILE).is_file():
            found[int(sub.name)] = sub / MODEL_FILE
        elif (sub / ENCRYPTED_MODEL_FILE).is_file():
            found[int(sub.name)] = sub / ENCRYPTED_MODEL_FILE
        elif (sub / GENAI_FILE).is_file():
            found[int(sub.name)] = sub
    return found
