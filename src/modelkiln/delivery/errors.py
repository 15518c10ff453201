"""Errors of the delivery room: every one names the file (never a key) and says what to do."""

from __future__ import annotations

from modelkiln.errors import KilnError


class DeliveryError(KilnError):
    """A package that cannot be sealed, read or checked as asked."""


class ManifestError(DeliveryError):
    """A manifest.json that is missing, not JSON, or lacks / mistypes a key (the message names it)."""


class IntegrityError(DeliveryError):
    """A file whose SHA-256 differs from what its package manifest lists (names the file)."""


class KeyFileError(DeliveryError):
    """A key file or key variable that is missing or not in a format we read (names the file or
    variable and the length found; never the key's bytes)."""


class DecryptError(DeliveryError):
    """An encrypted model that cannot be opened: wrong key, a changed byte, a truncated file or not
    our format. AES-GCM cannot tell a wrong key from a tampered file, so neither does the message."""


class SignatureError(DeliveryError):
    """A manifest signature that does not verify with the given public key (or is missing)."""


class GoldenError(DeliveryError):
    """A golden set that is unreadable, holds pickled objects, or misses inputs or outputs."""
