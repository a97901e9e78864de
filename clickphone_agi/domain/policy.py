"""Published privacy-policy versions: immutable, identified by version, content-hashed (pure)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import date, datetime


@dataclass(frozen=True)
class Policy:
    """One archived version. ``text`` is the exact UTF-8 bytes published; ``sha256`` is their hash."""

    version: str
    text: bytes
    summary: str
    effective_on: date
    published_at: datetime

    @property
    def sha256(self) -> str:
        return content_hash(self.text)


def content_hash(text: bytes) -> str:
    """The hex sha256 of a policy text: what proves, later, which words were in force."""
    return hashlib.sha256(text).hexdigest()


def archive_url(base_url: str, version: str) -> str:
    """Where subscribers read an archived version: ``<public_base_url>/v1/policies/<version>/text``."""
    return f"{base_url.rstrip('/')}/v1/policies/{version}/text"
