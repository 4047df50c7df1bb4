"""Result stores: immutable, content-addressed objects (`results/<key>.<ext>`, `masks/...`).

Stores are synchronous; the service calls them from worker threads. Every read is verified
against the sha256 recorded at write time, and a mismatch reads as a miss, so a corrupt
object is recomputed and written again rather than served.

Two more families live beside the cache (docs/storefront.md, "Keeping an order's pictures"):
`uploads/<sha256>`, a processed photo kept briefly so an order can keep it by its hash, and
`kept/<sha256>.<ext>`, an order's pictures, named by the sha256 of their own bytes and kept
until a date that only ever moves later (`keep`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import logging
import os
import re
import tempfile
import threading
from collections.abc import Mapping
from contextvars import ContextVar, Token
from pathlib import Path
from typing import Protocol

from PIL import Image

log = logging.getLogger("cutout.cache")

IMMUTABLE_CACHE_CONTROL = "public, max-age=31536000, immutable"
CONTENT_TYPES = {
    "png": "image/png",
    "webp": "image/webp",
    "jpeg": "image/jpeg",
    "gif": "image/gif",
    "heic": "image/heic",
}
_OBJECT_NAME = re.compile(
    r"^(?:(?:results|masks)/[0-9a-z-]+\.(?:png|webp|jpeg)|kept/[0-9a-f]{64}\.(?:png|webp|jpeg|gif|heic)|uploads/[0-9a-f]{64})$"
)
KEPT_NAME = re.compile(r"^kept/([0-9a-f]{64})\.(png|webp|jpeg|gif|heic)$")

# The scheme://host:port a request reached the service by, so that links answered to a client
# (results, kept pictures) point where that client can follow them (set per request by
# service.links.LinkBaseMiddleware; unset outside a request).
_link_base: ContextVar[str | None] = ContextVar("cutout_link_base", default=None)


def set_link_base(url: str | None) -> Token[str | None]:
    return _link_base.set(url.rstrip("/") if url else None)


def reset_link_base(token: Token[str | None]) -> None:
    _link_base.reset(token)


class StoreError(Exception):
    """The store could not do what was asked (I/O, network, permissions)."""


def check_object_name(name: str) -> str:
    """Object names are built by the service; refuse anything that could escape the store."""
    if not _OBJECT_NAME.fullmatch(name):
        raise ValueError(f"not a store object name: {name!r}")
    return name


class ResultStore(Protocol):
    backend: str

    def get(self, name: str) -> bytes | None:
        """The verified bytes of an object, or None when absent or corrupt."""

    def lookup(self, name: str) -> tuple[int, int, int] | None:
        """(width, height, bytes) of a stored result image, or None when absent."""

    def put(self, name: str, data: bytes, content_type: str, metadata: Mapping[str, str] | None = None) -> None:
        """Store an object unless a valid copy is already there (first writer wins).

        `metadata` (a result's `width` and `height`) lets a store answer `lookup` without
        reading the bytes; a store that reads them cheaply may ignore it.
        """

    def result_url(self, result_key: str, extension: str) -> str: ...

    def keep(self, name: str, data: bytes, content_type: str, until: dt.datetime) -> dt.datetime:
        """Keep a `kept/<sha256>.<ext>` object at least until `until`; the date it is now kept until.

        Writes it if absent (first writer wins: same name, same bytes); if present, moves its
        date later when `until` is later and never earlier, so one client can only lengthen what
        another kept. Raises StoreError when it cannot promise the date.
        """

    def kept_url(self, name: str) -> str:
        """Where a browser reads a kept object."""

    def close(self) -> None: ...


class LocalStore:
    """A directory on local disk: the embedded default.

    Each object `<name>` has a sidecar `<name>.sha256`. Both are written to a temporary file
    in the same directory and renamed into place, so a reader never sees a partial object;
    the sidecar goes first, so an object without a matching sidecar is never trusted.
    """

    backend = "local"

    def __init__(self, root: Path, public_url: str = "", default_url: str = "http://127.0.0.1:8080") -> None:
        """`public_url`: the base of every link; empty: the base each request came in by (else `default_url`)."""
        self.root = root
        self.public_url = public_url.rstrip("/")
        self.default_url = default_url.rstrip("/")
        self._keep_lock = threading.Lock()
        for folder in ("results", "masks", "kept", "uploads"):
            (root / folder).mkdir(parents=True, exist_ok=True)

    def link_base(self) -> str:
        return self.public_url or _link_base.get() or self.default_url

    def _path(self, name: str) -> Path:
        return self.root / check_object_name(name)

    def get(self, name: str) -> bytes | None:
        path = self._path(name)
        if KEPT_NAME.fullmatch(name):
            until = self._kept_until(path)
            if until is None or until <= now_utc():
                return None  # never kept, or kept no longer: gone, as the bucket's lifecycle would have it
        return self._read_verified(path, name)

    def _read_verified(self, path: Path, name: str) -> bytes | None:
        try:
            data = path.read_bytes()
            expected = path.with_name(path.name + ".sha256").read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"reading {name}: {exc}") from exc
        if hashlib.sha256(data).hexdigest() != expected:
            log.warning("stored object %s fails its checksum; treating it as a miss", name)
            return None
        return data

    def lookup(self, name: str) -> tuple[int, int, int] | None:
        # Local reads are cheap, so a lookup verifies the bytes too: a corrupt file is a miss.
        data = self.get(name)
        return image_info(data) if data is not None else None

    def put(self, name: str, data: bytes, content_type: str, metadata: Mapping[str, str] | None = None) -> None:
        del content_type, metadata  # the extension decides the type when served; lookups read the header
        path = self._path(name)
        if self.get(name) is not None:
            return
        try:
            _atomic_write(path.with_name(path.name + ".sha256"), hashlib.sha256(data).hexdigest().encode("ascii"))
            _atomic_write(path, data)
        except OSError as exc:
            raise StoreError(f"writing {name}: {exc}") from exc

    def result_url(self, result_key: str, extension: str) -> str:
        return f"{self.link_base()}/v1/results/{result_key}.{extension}"

    def keep(self, name: str, data: bytes, content_type: str, until: dt.datetime) -> dt.datetime:
        del content_type  # the extension decides the type when served
        path = self._path(name)
        check_kept(name, data)
        with self._keep_lock:
            current = self._kept_until(path)
            if current is not None and current <= now_utc():
                current = None  # expired: kept anew from now on
            try:
                if self._read_verified(path, name) is None:  # absent, or a corrupt copy to replace
                    _atomic_write(path.with_name(path.name + ".sha256"), hashlib.sha256(data).hexdigest().encode())
                    _atomic_write(path, data)
                if current is not None and current >= until:
                    return current
                _atomic_write(path.with_name(path.name + ".until"), until.isoformat().encode("ascii"))
            except OSError as exc:
                raise StoreError(f"keeping {name}: {exc}") from exc
            return until

    def kept_url(self, name: str) -> str:
        check_kept(name)
        return f"{self.link_base()}/v1/kept/{name.removeprefix('kept/')}"

    @staticmethod
    def _kept_until(path: Path) -> dt.datetime | None:
        try:
            text = path.with_name(path.name + ".until").read_text(encoding="ascii").strip()
            return dt.datetime.fromisoformat(text)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StoreError(f"reading the retention of {path.name}: {exc}") from exc

    def close(self) -> None:
        return None


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def check_kept(name: str, data: bytes | None = None) -> str:
    """A kept object's name is the sha256 of its bytes: refuse anything else."""
    match = KEPT_NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"not a kept object name: {name!r}")
    if data is not None and hashlib.sha256(data).hexdigest() != match.group(1):
        raise ValueError(f"{name} must hold the bytes whose sha256 it names")
    return name


def image_info(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, bytes) read from an image's header."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except (OSError, ValueError):
        return None
    return width, height, len(data)


def _atomic_write(path: Path, data: bytes) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        Path(temporary).replace(path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
